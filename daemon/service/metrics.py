"""Prometheus metrics of one node, read from the node at scrape time.

Most values already exist on the node (rounds, losses, byte counters, peers, contributions); a custom
collector reads them when Prometheus scrapes, so the node keeps one source of truth and pays nothing
between scrapes. Durations that only exist as events (merging a contribution, pulling from a peer,
training a round) come through ``node.on_timing`` into histograms.

Each node gets its own ``CollectorRegistry``: no process-global state, and tests may build several.
The registry is served by :mod:`daemon.service.web` (aiohttp, same loop) rather than prometheus_client's own
threaded HTTP server, so the daemon has one HTTP stack and one shutdown path.

Metric names follow the Prometheus conventions: ``meshtrain_`` prefix, base units (seconds, bytes),
``_total`` on counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemon.status import Status, TrainingState

__all__ = ["NodeMetrics"]

# Buckets in seconds: merges are sub-millisecond to milliseconds, pulls milliseconds to the request
# timeout, rounds seconds to minutes (stdlib-lm on CPU).
MERGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
PULL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Node(Protocol):
    on_timing: Callable[[str, float], None]

    def status(self) -> Status: ...


class _NodeCollector:
    def __init__(self, node: _Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        s = self._node.status()
        counters = s.counters
        yield _counter("meshtrain_rounds", "Local training rounds contributed by this node.", s.round)
        yield _counter("meshtrain_bytes_sent", "Payload bytes sent to peers.", s.bytes_sent)
        yield _counter("meshtrain_bytes_received", "Payload bytes received from peers.", s.bytes_received)
        yield _gauge("meshtrain_peers", "Connected peers.", len(s.peers))
        yield _gauge("meshtrain_contributions", "Contributions applied to the model.", s.contributions)
        for key, value, help_text in (
            ("accepted", counters.accepted, "Contributions accepted (local and remote)."),
            ("duplicates", counters.duplicates, "Contributions received that were already applied."),
            ("rejected", counters.rejected, "Contributions rejected as invalid."),
            ("pulls", counters.pulls, "Anti-entropy pull requests sent."),
            ("pull_failures", counters.pull_failures, "Anti-entropy pulls that failed."),
        ):
            yield _counter(f"meshtrain_contributions_{key}", help_text, value)
        for name, gauge, help_text in (
            ("meshtrain_train_loss", s.train_loss, "Training loss of the last local round."),
            ("meshtrain_val_loss", s.eval.val_loss, "Validation loss of the merged model."),
            ("meshtrain_val_accuracy", s.eval.val_accuracy, "Validation accuracy, merged model."),
        ):
            if gauge is not None:
                yield _gauge(name, help_text, gauge)
        state = GaugeMetricFamily(
            "meshtrain_training_state", "1 for the current training state.", labels=["state"]
        )
        for name in TrainingState:
            state.add_metric([name.value], 1.0 if s.training is name else 0.0)
        yield state
        limits = s.limits
        yield _gauge("meshtrain_limit_threads", "Training threads (applied).", limits.threads_applied)
        yield _gauge(
            "meshtrain_limit_bandwidth_bytes_per_second",
            "Sync bandwidth cap, 0 when uncapped.",
            limits.bandwidth_bytes_per_s,
        )
        yield _counter(
            "meshtrain_ratelimit_wait_seconds",
            "Time sync responses waited on the bandwidth cap.",
            limits.waited_s,
        )


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=float(value))


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=float(value))


class NodeMetrics:
    """The registry of one node; hooks itself into ``node.on_timing``."""

    def __init__(self, node: _Node) -> None:
        self.registry = CollectorRegistry()  # no auto_describe: it would read the node before it runs
        self.registry.register(_NodeCollector(node))
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
