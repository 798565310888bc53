"""Bring your own model, and join in one line: the README's commands, run as written, on two real daemons.

A plug-in task is written (``task new``), checked (``task check``), and founds a run with its own
options (``init --task ... --task-option``); the second node is set up only by ``init --join`` from the
first's ``invite``. Both train, converge to one state (the joiner took the pinned genesis from the
founder), the merged model is exported (``checkpoint``) with the plug-in's own tensor names, and both
daemons stop on ``meshtrain stop`` (``POST /v1/stop``: a clean drain, exit 0, no socket left).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_steps import meshtrain, wait_for

ROUNDS = 3
START_TIMEOUT_S = 180.0  # 2 cores: two daemons import torch and libp2p, each with a training child
TRAIN_TIMEOUT_S = 240.0


def test_a_plugin_run_joined_from_an_invite(
    tmp_path: Path, daemons: Callable[..., subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    loopback = "/ip4/127.0.0.1/tcp/0"

    # Bring your own model: a plug-in file, checked, founding a run with its own options.
    meshtrain("task", "new", "mymodel")
    task = "mymodel.py:MymodelTask"  # relative to the working dir, as a user types it
    assert "no problem found" in meshtrain("task", "check", task, "--task-option", "hidden=32")
    assert "hidden" in meshtrain("task", "options", task)
    meshtrain("--home", str(a), "init", "--run", "byom", "--task", task, "--task-option", "hidden=32",
              "--listen", loopback)
    founder = daemons(a, "--max-rounds", str(ROUNDS))
    (first,) = wait_for([a], lambda s: s[0].genesis is not None, timeout_s=START_TIMEOUT_S,
                        what="the founder to found the run")
    assert first.task == f"{tmp_path / 'mymodel.py'}:MymodelTask"

    # Join in one line: the second node knows nothing but the invite.
    token = meshtrain("--home", str(a), "invite", "--include-loopback").strip()
    meshtrain("--home", str(b), "init", "--join", token, "--listen", loopback)
    joiner = daemons(b, "--max-rounds", str(ROUNDS))
    statuses = wait_for(
        [a, b],
        lambda s: all(x.contributions == 2 * ROUNDS and x.round == ROUNDS for x in s)
        and s[0].state_hash == s[1].state_hash,
        timeout_s=START_TIMEOUT_S + TRAIN_TIMEOUT_S,
        what="both nodes to train and hold the same model",
    )
    assert statuses[1].genesis == first.genesis and statuses[1].join.pinned_genesis == first.genesis
    # The plug-in seeds its initialization: the joiner rebuilt the genesis instead of downloading it.
    assert statuses[1].join.rebuilt and statuses[1].join.source is None and statuses[1].run == "byom"
    assert statuses[1].join.genesis_transfer is None
    assert statuses[1].state_hash is not None
    assert statuses[1].state_hash[:16] in meshtrain("--home", str(b), "status")

    # The merged model, under the plug-in's own tensor names.
    meshtrain("--home", str(b), "checkpoint", "merged.safetensors")
    from safetensors.torch import load_file

    import training

    merged = load_file(tmp_path / "merged.safetensors")
    assert set(merged) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    training.load_task(task, hidden=32).build_model().load_state_dict(merged)  # strict: names and shapes

    # `meshtrain stop` drains both daemons: exit 0, nothing left behind.
    for home, proc in ((b, joiner), (a, founder)):
        assert "stopped" in meshtrain("--home", str(home), "stop")
        assert proc.wait(timeout=5) == 0
        assert not (home / "control.sock").exists() and not (home / "daemon.pid").exists()
