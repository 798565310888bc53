"""`meshtrain init`: task options checked against the task's Config, a founding checkpoint, and joining
from an invite (what the token says lands in config.toml; a damaged token writes nothing)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from daemon.cli.invite import Invite, encode_invite
from daemon.cli.main import main
from daemon.config import load_config

PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def _init(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--home", str(home), "init", *args])
    return result.exit_code, result.output


def test_task_options_are_checked_and_written(tmp_path: Path) -> None:
    code, output = _init(tmp_path / "a", "--task", "digits", "--task-option", "hidden=16",
                         "--task-option", "val_fraction=0.25")
    assert code == 0, output
    config = load_config(tmp_path / "a")
    assert config.training.task == "digits" and config.task == {"hidden": 16, "val_fraction": 0.25}
    code, output = _init(tmp_path / "b", "--task", "digits", "--task-option", "hiden=16")
    assert code == 2 and "task.hiden" in output and "hidden" in output
    code, output = _init(tmp_path / "b", "--task", "digits", "--task-option", "hidden=wide")
    assert code == 2 and "task.hidden must be an integer" in output
    code, output = _init(tmp_path / "b", "--task", "digits", "--task-option", "hidden")
    assert code == 2 and "KEY=VALUE" in output
    assert not (tmp_path / "b" / "config.toml").exists()


def test_a_plugin_file_relative_to_the_working_dir_is_written_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["task", "new", "mine"]).exit_code == 0
    code, output = _init(tmp_path / "home", "--task", "mine.py:MineTask", "--task-option", "hidden=8")
    assert code == 0, output
    assert load_config(tmp_path / "home").training.task == f"{tmp_path / 'mine.py'}:MineTask"


def test_from_checkpoint_writes_its_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import save_file

    monkeypatch.chdir(tmp_path)
    save_file({"weight": np.zeros(4, dtype=np.float32)}, "model.safetensors")
    code, output = _init(tmp_path / "a", "--from-checkpoint", "model.safetensors")
    assert code == 0, output
    assert load_config(tmp_path / "a").training.init_from == str(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    code, output = _init(tmp_path / "b", "--from-checkpoint", "junk.safetensors")
    assert code == 2 and "not a safetensors file" in output
    code, output = _init(tmp_path / "b", "--from-checkpoint", "absent.safetensors")
    assert code == 2 and "does not exist" in output


def _token(**overrides: object) -> str:
    fields = {
        "run": "theirs",
        "genesis": "0f" * 32,
        "task": "digits",
        "task_options": {"hidden": 32},
        "bootstrap": [f"/ip4/192.0.2.7/tcp/4001/p2p/{PEER}", f"/dns4/mt.example/tcp/4001/p2p/{PEER}"],
        "private": False,
    }
    return encode_invite(Invite(**(fields | overrides)))  # type: ignore[arg-type]


def test_join_writes_the_run_pinned_to_its_genesis(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "init", "--join", _token(),
                                       "--listen", "/ip4/127.0.0.1/tcp/0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["joined"] is True and data["run"] == "theirs"
    config = load_config(tmp_path)
    assert config.node.run == "theirs" and config.node.genesis == "0f" * 32
    assert config.node.bootstrap == (
        f"/ip4/192.0.2.7/tcp/4001/p2p/{PEER}", f"/dns4/mt.example/tcp/4001/p2p/{PEER}"
    )
    assert config.node.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert config.training.task == "digits" and config.task == {"hidden": 32}
    assert "swarm" not in tomllib.loads((tmp_path / "config.toml").read_text())["node"]


def test_join_says_what_the_token_cannot_carry(tmp_path: Path) -> None:
    token = _token(task="models/lm.py:LM", private=True)
    code, output = _init(tmp_path, "--join", token)
    assert code == 0, output
    assert f"{tmp_path / 'models' / 'lm.py'} (MISSING" in output
    assert "swarm key" in output and "--swarm-key" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--join", "mtinv1-AAAA"], "copy the whole token again"),
        (["--join", "https://example.com"], "not a meshtrain invite"),
        (["--join", "TOKEN", "--run", "x"], "--join takes --run from the invite"),
        (["--join", "TOKEN", "--task-option", "a=1"], "--task-option"),
    ],
)
def test_join_refuses_a_bad_token_or_clashing_flags(tmp_path: Path, args: list[str], message: str) -> None:
    args = [_token() if a == "TOKEN" else a for a in args]
    code, output = _init(tmp_path, *args)
    assert code == 2 and message in output
    assert not (tmp_path / "config.toml").exists()
