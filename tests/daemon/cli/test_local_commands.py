"""`id`, `config show` (the effective config and each value's source), `swarm-key generate`, and the
daemon reading the same overrides as `config show`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from daemon.cli.main import main


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--json"], env=env)
    return result.exit_code, json.loads(result.stdout)


def test_id_reads_the_identity_and_creates_none(tmp_path: Path) -> None:
    code, data = _run("--home", str(tmp_path / "h"), "id")
    assert code == 1 and "no identity" in data["error"] and "meshtrain init" in data["error"]
    assert not (tmp_path / "h").exists()
    _, made = _run("--home", str(tmp_path / "h"), "init")
    code, data = _run("--home", str(tmp_path / "h"), "id")
    assert code == 0 and data["peer_id"] == made["peer_id"]
    (tmp_path / "h" / "identity.key").write_bytes(b"short")
    code, data = _run("--home", str(tmp_path / "h"), "id")
    assert code == 1 and "32 bytes" in data["error"]


def test_config_show_names_each_values_source(tmp_path: Path) -> None:
    file = '[node]\nrun = "mine"\n[training]\nmax_rounds = 5\n[task]\nhidden = 8\n'
    (tmp_path / "config.toml").write_text(file)
    code, data = _run(
        "--home", str(tmp_path), "--socket", "rel.sock", "config", "show", "--max-rounds", "7",
        env={"MESHTRAIN_LOG_LEVEL": "debug", "MESHTRAIN_BOOTSTRAP": ""},
    )
    assert code == 0
    values = data["values"]
    assert values["node.run"] == {"value": "mine", "source": "file"}
    assert values["training.max_rounds"] == {"value": 7, "source": "flag"}
    assert values["log.level"] == {"value": "DEBUG", "source": "environment"}
    assert values["api.socket"] == {"value": str(Path.cwd() / "rel.sock"), "source": "flag"}
    assert values["sync.fanout"] == {"value": 1, "source": "default"}
    assert values["node.bootstrap"] == {"value": [], "source": "default"}  # an empty variable is unset
    assert values["task.hidden"] == {"value": 8, "source": "file"}
    # The global socket from the environment counts as the environment.
    _, data = _run("--home", str(tmp_path), "config", "show", env={"MESHTRAIN_SOCKET": "/run/x.sock"})
    assert data["values"]["api.socket"] == {"value": "/run/x.sock", "source": "environment"}


def test_config_show_reports_errors_naming_the_key(tmp_path: Path) -> None:
    code, data = _run("--home", str(tmp_path), "config", "show", "--bootstrap", "/ip4/1.2.3.4/tcp/1")
    assert code == 1 and "node.bootstrap" in data["error"]
    human = CliRunner().invoke(main, ["--home", str(tmp_path), "config", "show"])
    assert human.exit_code == 0 and "training.task" in human.output and "default" in human.output


def test_the_daemon_reads_the_same_environment(tmp_path: Path) -> None:
    """A bad override from the environment stops the daemon before it starts, naming the key."""
    result = CliRunner().invoke(
        main, ["--home", str(tmp_path), "daemon"], env={"MESHTRAIN_BOOTSTRAP": "/ip4/1.2.3.4/tcp/1"}
    )
    assert result.exit_code == 78 and "node.bootstrap" in result.output


def test_swarm_key_generate_never_overwrites(tmp_path: Path) -> None:
    code, data = _run("swarm-key", "generate", str(tmp_path / "k"))
    assert code == 0 and data == {"path": str(tmp_path / "k"), "written": True}
    before = (tmp_path / "k").read_bytes()
    code, data = _run("swarm-key", "generate", str(tmp_path / "k"))
    assert code == 1 and "never overwritten" in data["error"]
    assert (tmp_path / "k").read_bytes() == before
