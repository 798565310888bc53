"""daemon.cli.render: the human panels, on a real node's status; parsing of human byte rates."""

from __future__ import annotations

import msgspec
import pytest
from rich.console import Console

from daemon.cli import render
from daemon.status import Evaluation, LimitsStatus, Status, TrainingState


@pytest.mark.parametrize(
    ("text", "rate"), [("0", 0), ("500000", 500000), ("250K", 250_000), ("2M", 2_000_000), ("1MiB/s", 2**20)]
)
def test_parse_rate(text: str, rate: int) -> None:
    assert render.parse_rate(text) == rate


def test_status_panel_and_peers_table_render(node_status: Status) -> None:
    peer = node_status.peers[0]
    status = msgspec.structs.replace(
        node_status,
        round=3,
        training=TrainingState.PAUSED,
        train_loss=0.5,
        eval=Evaluation(val_loss=0.4, val_accuracy=0.9),
        initial_eval=Evaluation(val_loss=2.3),
        bytes_sent=2048,
        bytes_received=10,
        uptime_s=3700,
        limits=LimitsStatus(threads=2, threads_applied=2, bandwidth_bytes_per_s=1000),
        suspects=["12D3KooWbad"],
        diverged_from=["12D3KooWother"],
    )
    console = Console(record=True, width=120, color_system=None)
    console.print(render.status_panel(status))
    console.print(render.peers_table(status))
    text = console.export_text()
    for fragment in (
        "paused, round 3",
        "(from 2.3000)",
        "2.0 KB / 10 B",
        "1000 B/s sync cap",
        peer,
        "direct",
        "suspects         12D3KooWbad",
        "diverged from    12D3KooWother",
    ):
        assert fragment in text
