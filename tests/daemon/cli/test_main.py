"""CLI behaviour that needs no running daemon: global options, environment, completion, help, and a clear
error when none is running (naming the system service when that is what runs)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import common
from daemon.cli.main import EXIT_NOT_RUNNING, main
from daemon.config import ConfigError


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


def test_global_options_and_short_help(tmp_path: Path) -> None:
    for args in (["-h"], ["--help"], ["status", "-h"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage: " in result.output, args
    before = CliRunner().invoke(main, ["--home", str(tmp_path), "status", "--json"])
    after = CliRunner().invoke(main, ["status", "--home", str(tmp_path), "--json"])
    assert before.exit_code == after.exit_code == EXIT_NOT_RUNNING
    assert json.loads(before.output) == json.loads(after.output)
    assert str(tmp_path / "control.sock") in json.loads(before.output)["error"]


def test_environment_variables(tmp_path: Path) -> None:
    init = CliRunner().invoke(main, ["init", "--json"], env={"MESHTRAIN_HOME": str(tmp_path / "h")})
    assert init.exit_code == 0 and json.loads(init.output)["home"] == str(tmp_path / "h")
    socket = tmp_path / "elsewhere.sock"
    env = {"MESHTRAIN_SOCKET": str(socket), "MESHTRAIN_JSON": "1"}
    result = CliRunner().invoke(main, ["status"], env=env)
    assert result.exit_code == EXIT_NOT_RUNNING and str(socket) in json.loads(result.output)["error"]


def test_shell_completion(tmp_path: Path) -> None:
    script = CliRunner().invoke(main, [], prog_name="meshtrain", env={"_MESHTRAIN_COMPLETE": "bash_source"})
    assert script.exit_code == 0 and "_MESHTRAIN_COMPLETE=bash_complete" in script.output
    words = CliRunner().invoke(
        main, [], prog_name="meshtrain",
        env={"_MESHTRAIN_COMPLETE": "bash_complete", "COMP_WORDS": "meshtrain sta", "COMP_CWORD": "1"},
    )
    assert words.exit_code == 0 and "plain,status" in words.output.splitlines()
    words = CliRunner().invoke(
        main, [], prog_name="meshtrain",
        env={"_MESHTRAIN_COMPLETE": "bash_complete", "COMP_WORDS": "meshtrain task o", "COMP_CWORD": "2"},
    )
    assert "plain,options" in words.output.splitlines()


def test_a_system_service_is_named_not_a_second_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meshtrain status` as a user whose own home has no daemon, while the system service runs."""
    run_dir, state_dir = tmp_path / "run" / "meshtrain", tmp_path / "lib" / "meshtrain"
    run_dir.mkdir(parents=True)
    state_dir.mkdir(parents=True)
    (run_dir / "control.sock").touch()
    monkeypatch.setattr(common, "SYSTEM_SOCKET", run_dir / "control.sock")
    monkeypatch.setattr(common, "SYSTEM_HOME", state_dir)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "user"))
    monkeypatch.delenv("MESHTRAIN_HOME", raising=False)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == EXIT_NOT_RUNNING
    assert f"--socket {run_dir / 'control.sock'}" in result.output and str(state_dir) in result.output
    assert "meshtrain.service" in result.output and "meshtrain daemon" not in result.output
    (run_dir / "control.sock").unlink()  # the service is stopped
    result = CliRunner().invoke(main, ["status"])
    assert "is it stopped?" in result.output and "meshtrain daemon" not in result.output
    # A home chosen on purpose gets the plain advice.
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "mine"), "status"])
    assert "Start one with `meshtrain daemon --home" in result.output


def test_logs_follow_is_not_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["logs", "-f", "--json", "--home", str(tmp_path)])
    assert result.exit_code == 2 and "--follow" in result.output


def test_another_users_home_points_to_its_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member of the service's group cannot read its home (0700; root reads anything, so the error is
    injected) but may use its socket: the error says so."""

    def unreadable(self: object, config: object = None) -> Path:
        raise ConfigError(f"{tmp_path}/config.toml: cannot read the config file: Permission denied")

    monkeypatch.setattr("daemon.home.Home.socket_path", unreadable)
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "status"])
    assert result.exit_code == 1 and "--socket /run/meshtrain/control.sock" in result.output
