"""Prometheus metrics of one node, read from its status at scrape time, and of its two processes.

Theory of operation
-------------------
Every value an operator would graph or alert on already exists in the node's typed
:class:`~daemon.status.Status`; a custom collector reads one status per scrape, so the node keeps one
source of truth and pays nothing between scrapes. Durations that only exist as events (merging a
contribution, pulling from a peer, training a round) come through ``node.on_timing`` into histograms.
prometheus_client's ``ProcessCollector`` reports the daemon's own CPU, memory and file descriptors
(``process_*``), and a second one pointed at the training child's pid reports the child's
(``meshtrain_trainer_process_*``: torch's memory lives there, not in the daemon).

Names follow the Prometheus conventions: ``meshtrain_`` prefix, the unit before ``_total``
(``meshtrain_sent_bytes_total``), counters for what only grows, one family with a ``result`` or
``reason`` label rather than one name per outcome. ``contrib/grafana/meshtrain.json`` is built on these
names; ``tests/daemon/service/test_metrics.py`` checks every expression in it against a scrape of a real
node, so a rename here fails there.

Label values are bounded: reasons and NAT events are names from our code, training states come from
:class:`TrainingState`, and a state a peer reports that this build does not know counts as
``unknown`` (a peer chooses that string; it must not choose our series). No metric is labelled by peer
id: the number of peers is not ours to bound (the dashboard and ``meshtrain status`` list them).

Each node gets its own ``CollectorRegistry``: no process-global state, and tests may build several. The
registry is served by :mod:`daemon.service.web` (aiohttp, same loop) rather than prometheus_client's own
threaded HTTP server, so the daemon has one HTTP stack and one shutdown path.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from daemon.status import Status, TrainingState

__all__ = ["NodeMetrics"]

# Buckets in seconds: merges are sub-millisecond to milliseconds, pulls milliseconds to the request
# timeout, rounds seconds to minutes (stdlib-lm on CPU).
MERGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
PULL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TRAINER_NAMESPACE = "meshtrain_trainer"  # -> meshtrain_trainer_process_resident_memory_bytes, ...
NO_PROCESS = -1  # a pid /proc never has: the trainer collector reports nothing while there is no child
CONNECTION_KINDS = ("direct", "relayed")  # p2p.Host.peer_connections
REACHABILITY = ("public", "private", "unknown")  # p2p.Host.reachability
BUILD_PACKAGES = ("meshtrain", "libp2p", "torch")  # versions in meshtrain_build_info (metadata, no import)


class _Node(Protocol):
    on_timing: Callable[[str, float], None]

    def status(self) -> Status: ...

    async def fresh_status(self) -> Status: ...


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=float(value))


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=float(value))


def _labelled(
    family: GaugeMetricFamily | CounterMetricFamily, values: Iterable[tuple[str, float]]
) -> GaugeMetricFamily | CounterMetricFamily:
    for label, value in values:
        family.add_metric([label], float(value))
    return family


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in BUILD_PACKAGES:
        try:
            versions["version" if package == "meshtrain" else package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions["version" if package == "meshtrain" else package] = "unknown"
    return versions


class _NodeCollector:
    def __init__(self, node: _Node) -> None:
        self._node = node
        self._build = _versions()

    def collect(self) -> Iterator[Metric]:
        s = self._node.status()
        yield InfoMetricFamily("meshtrain_build", "Versions of this daemon and its stack.", value=self._build)
        yield InfoMetricFamily(
            "meshtrain_node",
            "This node: its peer id, run, task and genesis.",
            value={"peer_id": s.peer_id, "run": s.run, "task": s.task, "genesis": s.genesis or ""},
        )
        yield from self._training(s)
        yield from self._model(s)
        yield from self._security(s)
        yield from self._network(s)

    def _training(self, s: Status) -> Iterator[Metric]:
        yield _counter("meshtrain_rounds", "Local training rounds contributed by this node.", s.round)
        yield _labelled(
            GaugeMetricFamily(
                "meshtrain_training_state", "1 for the current training state.", labels=["state"]
            ),
            ((state.value, float(s.training is state)) for state in TrainingState),
        )
        yield _counter(
            "meshtrain_stale_rounds_skipped",
            "Local rounds not contributed: too many others landed while they trained.",
            s.counters.stale_rounds_skipped,
        )
        for name, value, help_text in (
            ("meshtrain_train_loss", s.train_loss, "Training loss of the last local round."),
            ("meshtrain_val_loss", s.eval.val_loss, "Validation loss of the merged model."),
            ("meshtrain_val_accuracy", s.eval.val_accuracy, "Validation accuracy of the merged model."),
            ("meshtrain_val_bits_per_byte", s.eval.val_bpb, "Validation bits per byte of the merged model."),
        ):
            if value is not None:
                yield _gauge(name, help_text, value)
        yield _gauge(
            "meshtrain_training_threads", "Threads the training process runs with.", s.limits.threads_applied
        )

    def _model(self, s: Status) -> Iterator[Metric]:
        c = s.counters
        yield _gauge("meshtrain_contributions", "Contributions in the model (all authors).", s.contributions)
        yield _gauge(
            "meshtrain_retained_contributions",
            "Contributions still held to serve peers (the rest are compacted into a snapshot).",
            s.retained_contributions,
        )
        yield _labelled(
            CounterMetricFamily(
                "meshtrain_contributions_processed",
                "Contributions this node took in (local and remote), by result.",
                labels=["result"],
            ),
            (
                ("accepted", c.accepted),
                ("duplicate", c.duplicates),
                ("refused_disk_full", c.refused_disk_full),
            ),
        )
        yield _labelled(
            CounterMetricFamily(
                "meshtrain_rejected_inputs",
                "Invalid input from peers (records, requests, gossip, genesis), by reason.",
                labels=["reason"],
            ),
            sorted(c.rejected_reasons.items()),
        )
        yield _counter("meshtrain_pulls", "Anti-entropy pull requests sent.", c.pulls)
        yield _counter("meshtrain_pull_failures", "Anti-entropy pulls that failed.", c.pull_failures)
        yield _counter("meshtrain_pushed", "Own contributions pushed straight to a member.", c.pushed)
        yield _counter("meshtrain_pushes_received", "Contributions their authors pushed here.",
                       c.pushes_received)
        yield _counter("meshtrain_announced", "Own contributions announced on gossip.", c.announced)
        for event, value in (
            ("written", c.snapshots_written),
            ("installed", c.snapshots_installed),
            ("served", c.snapshots_served),
        ):
            yield _counter(f"meshtrain_snapshots_{event}", f"Model state snapshots {event}.", value)

    def _security(self, s: Status) -> Iterator[Metric]:
        yield _gauge(
            "meshtrain_suspects", "Authors whose updates look Byzantine (and equivocators).", len(s.suspects)
        )
        yield _gauge(
            "meshtrain_equivocators", "Authors caught signing two records for one seq.", len(s.equivocators)
        )
        yield _counter(
            "meshtrain_equivocations",
            "Equivocations caught (proofs kept in the store).",
            s.counters.equivocations,
        )
        yield _gauge(
            "meshtrain_diverged_peers",
            "Peers holding our version vector with another state hash.",
            len(s.diverged_from),
        )
        yield _gauge("meshtrain_disk_full", "1 while the store cannot log contributions.", float(s.disk_full))
        yield _gauge(
            "meshtrain_genesis_refusals",
            "Peers whose genesis this node refused (another run, task or model layout).",
            len(s.join.refused),
        )
        yield _gauge("meshtrain_blocked_peers", "Peers blocked by fault injection.", len(s.blocked_peers))

    def _network(self, s: Status) -> Iterator[Metric]:
        kinds = [s.connections.get(peer, "direct") for peer in s.peers]
        yield _labelled(
            GaugeMetricFamily(
                "meshtrain_peers", "Connected peers, by connection kind.", labels=["connection"]
            ),
            ((kind, kinds.count(kind)) for kind in CONNECTION_KINDS),
        )
        states = {state.value for state in TrainingState}
        heard = [info.training if info.training in states else "unknown" for info in s.peer_info.values()]
        yield _labelled(
            GaugeMetricFamily(
                "meshtrain_mesh_peers",
                "Peers of the run heard from (heartbeats), by their training state.",
                labels=["training"],
            ),
            ((state, heard.count(state)) for state in sorted(states | {"unknown"})),
        )
        yield _labelled(
            GaugeMetricFamily(
                "meshtrain_reachability", "1 for AutoNAT's verdict on this node.", labels=["state"]
            ),
            ((state, float(s.reachability == state)) for state in REACHABILITY),
        )
        relay = s.nat.relay_service
        yield _gauge("meshtrain_relay_service", "1 when this node relays for peers behind NAT.", relay.active)
        yield _gauge("meshtrain_relay_served_reservations", "Relay slots taken on us.", relay.reservations)
        yield _gauge("meshtrain_relay_served_circuits", "Circuits relayed through this node.", relay.circuits)
        yield _gauge(
            "meshtrain_relay_reservations", "Relays holding a reservation for this node.", len(s.nat.relays)
        )
        yield _labelled(
            CounterMetricFamily("meshtrain_nat_events", "NAT traversal events, by kind.", labels=["event"]),
            sorted(s.nat.counters.items()),
        )
        yield _counter("meshtrain_sent_bytes", "Payload bytes sent to peers.", s.bytes_sent)
        yield _counter("meshtrain_received_bytes", "Payload bytes received from peers.", s.bytes_received)
        p2p = s.p2p
        yield _labelled(
            CounterMetricFamily(
                "meshtrain_p2p_requests", "Requests to and from peers.", labels=["direction"]
            ),
            (("sent", p2p.get("requests_sent", 0)), ("received", p2p.get("requests_received", 0))),
        )
        yield _counter(
            "meshtrain_p2p_request_failures", "Requests to peers that failed.", p2p.get("requests_failed", 0)
        )
        yield _labelled(
            CounterMetricFamily(
                "meshtrain_gossip_messages", "Gossip messages, by direction.", labels=["direction"]
            ),
            (("published", p2p.get("gossip_published", 0)), ("received", p2p.get("gossip_received", 0))),
        )
        yield _counter(
            "meshtrain_gossip_dropped",
            "Gossip messages dropped on a full queue.",
            p2p.get("gossip_dropped_queue_full", 0),
        )
        yield _gauge(
            "meshtrain_bandwidth_limit_bytes_per_second",
            "Cap on sync bytes sent per second, 0 when uncapped.",
            s.limits.bandwidth_bytes_per_s,
        )
        yield _counter(
            "meshtrain_bandwidth_limit_wait_seconds",
            "Time sync responses waited on the bandwidth cap.",
            s.limits.waited_s,
        )


class NodeMetrics:
    """The registry of one node; hooks itself into ``node.on_timing``. ``trainer_pid`` names the training
    process (None while there is none)."""

    def __init__(self, node: _Node, *, trainer_pid: Callable[[], int | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()  # no auto_describe: it would read the node before it runs
        self.registry.register(_NodeCollector(node))
        ProcessCollector(registry=self.registry)  # process_*: the daemon's CPU, memory, open files
        PlatformCollector(registry=self.registry)  # python_info
        GCCollector(registry=self.registry)  # python_gc_*
        ProcessCollector(
            namespace=TRAINER_NAMESPACE,
            pid=lambda: trainer_pid() or NO_PROCESS,
            registry=self.registry,
        )
        self._node = node
        self._histograms = {
            "merge": Histogram(
                "meshtrain_merge_seconds",
                "Time to validate and apply one contribution to the model state.",
                buckets=MERGE_BUCKETS,
                registry=self.registry,
            ),
            "pull": Histogram(
                "meshtrain_pull_seconds",
                "Round-trip time of one anti-entropy pull (request to decoded response).",
                buckets=PULL_BUCKETS,
                registry=self.registry,
            ),
            "round": Histogram(
                "meshtrain_round_seconds",
                "Time the training child spends on one local round.",
                buckets=ROUND_BUCKETS,
                registry=self.registry,
            ),
        }
        node.on_timing = self.observe

    def observe(self, name: str, seconds: float) -> None:
        histogram = self._histograms.get(name)
        if histogram is not None:
            histogram.observe(seconds)

    async def scrape(self) -> bytes:
        """The exposition text. The node's state hash is computed first, off the loop, if it is not known
        (``fresh_status``); the collector's ``status()`` right after, with no await between, finds it.
        A scrape after each change hashed the whole model on the event loop: 1.6 s at 100M parameters."""
        await self._node.fresh_status()
        return generate_latest(self.registry)
