"""daemon.service.metrics on a real node's status: names and labels, every status field accounted for,
the daemon's and the training process's process metrics, bounded labels against a hostile peer, and the
Grafana dashboard and alert rules in contrib/ naming only metrics the daemon exports."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.service.metrics import NodeMetrics
from daemon.status import Counters, PeerInfo, Status

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "contrib" / "grafana" / "meshtrain.json"
RULES = ROOT / "contrib" / "prometheus" / "meshtrain.rules.yml"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself records for each target
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}

# Every field of Status: the metric that carries it, or why none does. A new field fails
# test_every_status_field_is_accounted_for until someone decides.
STATUS_FIELDS = {
    "peer_id": "meshtrain_node_info",
    "pid": "process_resident_memory_bytes",
    "home": None,  # a path: `meshtrain status`
    "run": "meshtrain_node_info",
    "task": "meshtrain_node_info",
    "listen_addrs": None,  # addresses: `meshtrain status`
    "peers": "meshtrain_peers",
    "round": "meshtrain_rounds_total",
    "training": "meshtrain_training_state",
    "shard": None,  # the local cluster harness only
    "contributions": "meshtrain_contributions",
    "state_hash": None,  # a hash; disagreement is meshtrain_diverged_peers
    "genesis": "meshtrain_node_info",
    "version_vector": None,  # per author: unbounded labels
    "bytes_sent": "meshtrain_sent_bytes_total",
    "bytes_received": "meshtrain_received_bytes_total",
    "train_loss": "meshtrain_train_loss",
    "eval": "meshtrain_val_loss",
    "initial_eval": None,  # one fixed point at the start of the curve
    "counters": "meshtrain_contributions_processed_total",
    "retained_contributions": "meshtrain_retained_contributions",
    "blocked_peers": "meshtrain_blocked_peers",
    "p2p": "meshtrain_p2p_requests_total",
    "peer_info": "meshtrain_mesh_peers",
    "reachability": "meshtrain_reachability",
    "connections": "meshtrain_peers",
    "nat": "meshtrain_relay_service",
    "suspects": "meshtrain_suspects",
    "equivocators": "meshtrain_equivocators",
    "diverged_from": "meshtrain_diverged_peers",
    "clip_norm": None,  # fixed by the genesis
    "influence_window": None,  # fixed by the genesis
    "admission_bits": None,  # fixed by the genesis
    "join": "meshtrain_genesis_refusals",
    "disk_full": "meshtrain_disk_full",
    "uptime_s": "process_start_time_seconds",
    "limits": "meshtrain_bandwidth_limit_bytes_per_second",
    "config": None,  # settings, not measurements: `meshtrain status`
}
COUNTER_FIELDS = {
    "accepted": "meshtrain_contributions_processed_total",
    "duplicates": "meshtrain_contributions_processed_total",
    "rejected": "meshtrain_rejected_inputs_total",
    "rejected_reasons": "meshtrain_rejected_inputs_total",
    "pulls": "meshtrain_pulls_total",
    "pull_failures": "meshtrain_pull_failures_total",
    "pushed": "meshtrain_pushed_total",
    "pushes_received": "meshtrain_pushes_received_total",
    "announced": "meshtrain_announced_total",
    "stale_rounds_skipped": "meshtrain_stale_rounds_skipped_total",
    "snapshots_written": "meshtrain_snapshots_written_total",
    "snapshots_installed": "meshtrain_snapshots_installed_total",
    "snapshots_served": "meshtrain_snapshots_served_total",
    "equivocations": "meshtrain_equivocations_total",
    "refused_disk_full": "meshtrain_contributions_processed_total",
}


class _Node:
    def __init__(self, status: Status) -> None:
        self.on_timing: Callable[[str, float], None] = lambda name, seconds: None
        self._status = status

    def status(self) -> Status:
        return self._status

    async def fresh_status(self) -> Status:
        return self._status


async def test_a_scrape_has_the_state_hash_computed_off_the_loop_first(node_status: Status) -> None:
    """``status()`` hashes the model on the loop when the hash is not known (1.6 s at 100M parameters);
    a scrape asks for ``fresh_status()`` first, which hashes in a worker thread."""
    asked: list[str] = []

    class Node(_Node):
        def status(self) -> Status:
            asked.append("status")
            return self._status

        async def fresh_status(self) -> Status:
            asked.append("fresh_status")
            return self._status

    text = (await NodeMetrics(Node(node_status)).scrape()).decode()
    assert asked[0] == "fresh_status" and "status" in asked[1:]
    assert "meshtrain_node_info" in text


def _scrape(metrics: NodeMetrics) -> tuple[dict[str, float], set[str]]:
    """Samples as ``name{labels}`` -> value, and every series name the exposition declares."""
    samples: dict[str, float] = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        for sample in family.samples:
            names.add(sample.name)
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples, names


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in training process: a Python child blocked on its stdin until the test ends.

    It says when it is up: a child still importing grows between the scrape and the test's own reading."""
    script = "import sys; print('up', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    try:
        yield proc
    finally:
        proc.communicate(b"", timeout=30)


def test_a_real_status_scrapes_under_the_conventional_names(node_status: Status) -> None:
    metrics = NodeMetrics(_Node(node_status))
    samples, _ = _scrape(metrics)
    assert samples["meshtrain_rounds_total"] == 2 and samples["meshtrain_contributions"] == 4
    assert samples['meshtrain_contributions_processed_total{result="accepted"}'] == 4
    assert (
        samples['meshtrain_peers{connection="direct"}'] == 1
        and samples['meshtrain_peers{connection="relayed"}'] == 0
    )
    assert (
        samples['meshtrain_mesh_peers{training="done"}'] + samples['meshtrain_mesh_peers{training="running"}']
        == 1
    )
    assert samples["meshtrain_sent_bytes_total"] == node_status.bytes_sent > 0
    assert samples['meshtrain_training_state{state="done"}'] == 1
    assert samples['meshtrain_reachability{state="unknown"}'] == 1 and samples["meshtrain_disk_full"] == 0
    build = next(k for k in samples if k.startswith("meshtrain_build_info{"))
    assert f'version="{importlib.metadata.version("meshtrain")}"' in build and 'libp2p="0.8.1"' in build
    assert f'peer_id="{node_status.peer_id}"' in next(
        k for k in samples if k.startswith("meshtrain_node_info{")
    )
    assert samples["process_resident_memory_bytes"] > 0 and "python_info" in "".join(samples)
    assert not any(k.startswith("meshtrain_trainer_process") for k in samples)  # no training process known
    metrics.observe("round", 1.5)
    assert _scrape(metrics)[0]["meshtrain_round_seconds_count"] == 1


def test_every_status_field_is_accounted_for(node_status: Status, child: subprocess.Popen[bytes]) -> None:
    assert set(STATUS_FIELDS) == set(Status.__struct_fields__), "decide how the new status field is exported"
    assert set(COUNTER_FIELDS) == set(Counters.__struct_fields__)
    _, names = _scrape(NodeMetrics(_Node(node_status), trainer_pid=lambda: child.pid))
    assert {m for m in [*STATUS_FIELDS.values(), *COUNTER_FIELDS.values()] if m} <= names


def test_the_training_process_is_measured_by_its_pid(
    node_status: Status, child: subprocess.Popen[bytes]
) -> None:
    samples, _ = _scrape(NodeMetrics(_Node(node_status), trainer_pid=lambda: child.pid))
    with open(f"/proc/{child.pid}/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert samples["meshtrain_trainer_process_resident_memory_bytes"] == pytest.approx(resident, rel=0.2)
    assert samples["meshtrain_trainer_process_start_time_seconds"] >= samples["process_start_time_seconds"]
    assert samples["meshtrain_trainer_process_cpu_seconds_total"] >= 0


def test_a_peer_cannot_choose_our_label_values(node_status: Status) -> None:
    info = PeerInfo(round=1, contributions=1, training='x"}\n# evil', reachability="public", task="t",
                    device="cpu", throughput_bps=0, age_s=1.0)  # fmt: skip
    hostile = msgspec.structs.replace(node_status, peer_info={f"p{i}": info for i in range(3)})
    samples, _ = _scrape(NodeMetrics(_Node(hostile)))
    assert samples['meshtrain_mesh_peers{training="unknown"}'] == 3
    assert not any("evil" in key for key in samples)


def test_rejections_carry_their_reason(node_status: Status) -> None:
    counters = msgspec.structs.replace(
        node_status.counters, rejected=3, rejected_reasons={"BadSignature": 2, "X": 1}
    )
    samples, _ = _scrape(NodeMetrics(_Node(msgspec.structs.replace(node_status, counters=counters))))
    assert samples['meshtrain_rejected_inputs_total{reason="BadSignature"}'] == 2
    assert samples['meshtrain_rejected_inputs_total{reason="X"}'] == 1


# -- contrib/grafana and contrib/prometheus ---------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label) is Grafana's, not PromQL
            exprs.append(re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])[1])
    return exprs


def _rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _metric_names(expr: str) -> set[str]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"select by metric name in {expr!r}"
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~"$instance"}[$__rate_interval]))) / on() b'
    assert _metric_names(expr) == {"a_bucket", "b"}


def test_grafana_and_alert_rules_name_only_exported_metrics(
    node_status: Status, child: subprocess.Popen[bytes]
) -> None:
    _, exported = _scrape(NodeMetrics(_Node(node_status), trainer_pid=lambda: child.pid))
    dashboard = [(e, _metric_names(e)) for e in _dashboard_expressions()]
    rules = [(e, _metric_names(e)) for e in _rule_expressions()]
    assert len(dashboard) > 40 and len(rules) >= 10
    for expr, names in dashboard + rules:
        assert names and names <= exported | PROMETHEUS_OWN, (expr, names - exported)
    shown = set().union(*(names for _, names in dashboard))
    alerts = {
        "meshtrain_disk_full",
        "meshtrain_suspects",
        "meshtrain_equivocators",
        "meshtrain_diverged_peers",
        "meshtrain_genesis_refusals",
        "meshtrain_stale_rounds_skipped_total",
    }
    processes = {"process_resident_memory_bytes", "meshtrain_trainer_process_resident_memory_bytes"}
    assert alerts | processes <= shown
    ids = [p["id"] for p in _panels(json.loads(DASHBOARD.read_text())["panels"])]
    assert len(ids) == len(set(ids))
