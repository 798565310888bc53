"""CLI behaviour that needs no running daemon: init, and a clear error when none is running."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from daemon.cli.main import EXIT_NOT_RUNNING, main


def test_init_writes_config_and_identity(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = CliRunner().invoke(main, ["init", "--home", str(home), "--task", "digits", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["peer_id"].startswith("12D3Koo")
    assert stat.S_IMODE((home / "identity.key").stat().st_mode) == 0o600
    again = CliRunner().invoke(main, ["init", "--home", str(home), "--json"])
    assert again.exit_code == 1 and "exists" in json.loads(again.output)["error"]
    forced = CliRunner().invoke(main, ["init", "--home", str(home), "--force", "--json"])
    assert json.loads(forced.output)["peer_id"] == data["peer_id"]  # the identity survives


def test_status_without_daemon_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--home", str(tmp_path), "--json"])
    assert result.exit_code == EXIT_NOT_RUNNING
    assert "no daemon is running" in json.loads(result.output)["error"]


def test_bad_config_is_reported_by_daemon(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[training]\nthreads = 'many'\n")
    result = CliRunner().invoke(main, ["daemon", "--home", str(tmp_path)])
    assert result.exit_code == 78  # EX_CONFIG: the unit's RestartPreventExitStatus stops a restart loop
    assert "training.threads must be an integer" in result.output


def test_cluster_commands_explain_bad_input(tmp_path: Path) -> None:
    missing = CliRunner().invoke(main, ["cluster", "status", "--dir", str(tmp_path), "--json"])
    assert missing.exit_code == 1 and "no cluster" in json.loads(missing.output)["error"]
    bad = CliRunner().invoke(main, ["cluster", "partition", "--dir", str(tmp_path), "0,a", "1", "--json"])
    assert bad.exit_code == 1 and "comma-separated" in json.loads(bad.output)["error"]
