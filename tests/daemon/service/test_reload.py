"""daemon.service.reload: SIGHUP applies what can change live and reports the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config, load_config
from daemon.node.limits import Limits
from daemon.service.reload import apply_reload, plan_reload


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
