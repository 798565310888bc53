"""daemon.status: one typed status, produced by a real node, read by every consumer, documented in the
OpenAPI document. A renamed or retyped field breaks one of these tests."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import yaml
from prometheus_client import generate_latest
from rich.console import Console

import daemon.service
from daemon.cli import demo, render
from daemon.cli.cluster import converged
from daemon.cli.doctor import diagnose
from daemon.service.metrics import NodeMetrics
from daemon.status import Status, TrainingState, openapi_schemas, openapi_yaml, parse_status, to_json

SPEC = Path(daemon.service.__file__).parent / "openapi.yaml"


def _over_the_wire(status: Status) -> dict:
    """What a client of ``GET /v1/status`` receives."""
    return json.loads(json.dumps(to_json(status)))


def test_status_survives_json_both_ways(node_status: Status) -> None:
    data = _over_the_wire(node_status)
    assert parse_status(data) == node_status
    assert data["eval"]["contributions"] == 4 and data["training"] == "done"
    assert data["counters"]["rejected"] == 0 and data["counters"]["equivocations"] == 0  # zeros are shown
    with pytest.raises(msgspec.ValidationError, match="round"):
        parse_status({**data, "round": "three"})


def test_openapi_document_holds_the_generated_schemas() -> None:
    generated = openapi_schemas()
    text = SPEC.read_text()
    documented = yaml.safe_load(text)["components"]["schemas"]
    assert {name: documented.get(name) for name in generated} == generated, "run `make openapi`"
    assert openapi_yaml(text) == text, "run `make openapi`"


def test_every_consumer_reads_a_real_status(node_status: Status) -> None:
    data = _over_the_wire(node_status)
    console = Console(record=True, width=160, color_system=None)
    console.print(render.status_panel(parse_status(data)))
    console.print(render.peers_table(parse_status(data)))
    down = {"index": 1, "peer_id": "x" * 8, "error": "down"}
    console.print(render.cluster_table([{"index": 0, **data}, down]))
    text = console.export_text()
    assert node_status.peer_id in text and "done, round 2" in text and "down" in text
    assert diagnose(parse_status(data)).lines[0].startswith("verdict: ")
    assert converged([{"index": 0, **data}, {"index": 1, **data}], contributions=4)
    summary = demo._summary([parse_status(data)], [[]], wall_s=1.0)
    assert summary["contributions"] == 4 and summary["final_val_loss"] == node_status.eval.val_loss


def test_metrics_read_the_status_and_label_every_training_state(node_status: Status) -> None:
    class _Node:
        on_timing = None

        def status(self) -> Status:
            return node_status

    text = generate_latest(NodeMetrics(_Node()).registry).decode()
    assert "meshtrain_contributions 4.0" in text
    for state in TrainingState:
        assert f'meshtrain_training_state{{state="{state.value}"}}' in text
