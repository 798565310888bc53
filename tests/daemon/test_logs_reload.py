"""logfmt formatting, the ring buffer, SIGHUP reload planning, and the CLI's human renderers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from daemon import render
from daemon.config import Config, ConfigError, load_config
from daemon.logs import KeyValueFormatter, RingBufferHandler
from daemon.ratelimit import Limits
from daemon.reload import apply_reload, plan_reload


def _record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("daemon.node", level, __file__, 1, msg, args, None)


def test_logfmt_splits_text_from_pairs() -> None:
    line = KeyValueFormatter().format(_record("model state loaded genesis=%s contributions=%d", "ab12", 3))
    assert line.startswith("ts=")
    assert line.endswith(
        'level=info logger=daemon.node msg="model state loaded" genesis=ab12 contributions=3'
    )


def test_logfmt_message_made_only_of_pairs_has_no_msg() -> None:
    line = KeyValueFormatter().format(_record("round=%d train_loss=%.2f", 3, 0.5))
    assert line.endswith("logger=daemon.node round=3 train_loss=0.50")


def test_journald_lines_carry_the_priority_and_no_timestamp_and_no_colour() -> None:
    line = KeyValueFormatter(journald=True).format(_record("peer gone peer=x", level=logging.WARNING))
    assert line == '<4>level=warning logger=daemon.node msg="peer gone" peer=x'
    assert "\x1b" not in line


def test_ring_buffer_keeps_the_last_lines() -> None:
    ring = RingBufferHandler(capacity=3)
    for i in range(5):
        ring.handle(_record("tick i=%d", i))
    assert [line.rsplit(" ", 1)[-1] for line in ring.tail(10)] == ["i=2", "i=3", "i=4"]
    assert len(ring.tail(1)) == 1 and ring.tail(0) == []


def test_plan_reload_separates_live_keys_from_restart_keys() -> None:
    running = Config.from_dict({"training": {"threads": 1, "task": "digits"}})
    loaded = Config.from_dict(
        {"training": {"threads": 4, "task": "stdlib-lm", "max_rounds": 9}, "log": {"level": "debug"}}
    )
    merged, report = plan_reload(running, loaded)
    assert report.reloaded == {
        "training.threads": (1, 4),
        "training.max_rounds": (0, 9),
        "log.level": ("INFO", "DEBUG"),
    }
    assert report.needs_restart == ["training.task"]
    assert merged.training.task == "digits" and merged.training.threads == 4


@dataclass
class FakeNode:
    config: Config
    limits: Limits


def test_apply_reload_changes_limits_and_keeps_config_on_error(tmp_path: Path) -> None:
    node = FakeNode(Config(), Limits(threads=1, bandwidth_bytes_per_s=0))
    (tmp_path / "config.toml").write_text("[limits]\nbandwidth_bytes_per_s = 5000\n[training]\nthreads = 2\n")
    report = apply_reload(node, lambda: load_config(tmp_path))
    assert report.error is None
    assert node.limits.bandwidth_bytes_per_s == 5000 and node.limits.threads == 2
    (tmp_path / "config.toml").write_text("[limits]\nbandwidth_bytes_per_s = 'fast'\n")
    before = node.config
    report = apply_reload(node, lambda: load_config(tmp_path))
    assert report.error and "bandwidth_bytes_per_s" in report.error
    assert node.config is before


@pytest.mark.parametrize(
    ("section", "body", "fragment"),
    [
        ("dashboard", {"listen": "0.0.0.0:8465"}, "loopback"),
        ("metrics", {"listen": "9464"}, "host:port"),
        ("log", {"level": "LOUD"}, "log.level"),
    ],
)
def test_new_sections_validate(section: str, body: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Config.from_dict({section: body})


@pytest.mark.parametrize(
    ("text", "rate"), [("0", 0), ("500000", 500000), ("250K", 250_000), ("2M", 2_000_000), ("1MiB/s", 2**20)]
)
def test_parse_rate(text: str, rate: int) -> None:
    assert render.parse_rate(text) == rate


def test_status_panel_and_peers_table_render() -> None:
    status = {
        "peer_id": "12D3KooWself",
        "pid": 1,
        "run": "r",
        "task": "digits",
        "listen_addrs": ["/ip4/127.0.0.1/tcp/1"],
        "peers": ["12D3KooWpeer"],
        "round": 3,
        "training": "paused",
        "contributions": 7,
        "state_hash": "ab" * 32,
        "train_loss": 0.5,
        "eval": {"val_loss": 0.4, "val_accuracy": 0.9},
        "initial_eval": {"val_loss": 2.3},
        "bytes_sent": 2048,
        "bytes_received": 10,
        "uptime_s": 3700,
        "version_vector": {"12D3KooWpeer": 4},
        "limits": {"threads": 2, "threads_applied": 2, "bandwidth_bytes_per_s": 1000},
        "reachability": "public",
        "connections": {"12D3KooWpeer": "direct"},
        "suspects": ["12D3KooWbad"],
        "diverged_from": ["12D3KooWother"],
    }
    console = Console(record=True, width=120, color_system=None)
    console.print(render.status_panel(status))
    console.print(render.peers_table(status))
    text = console.export_text()
    for fragment in (
        "paused, round 3",
        "(from 2.3000)",
        "2.0 KB / 10 B",
        "1000 B/s sync cap",
        "12D3KooWpeer",
        "direct",
        "suspects         12D3KooWbad",
        "diverged from    12D3KooWother",
    ):
        assert fragment in text
