"""Bring your own model, and join in one line: the README's commands, run as written, on two real daemons.

A plug-in task is written (``task new``), checked (``task check``), and founds a run with its own
options (``init --task ... --task-option``); the second node is set up only by ``init --join`` from the
first's ``invite``. Both train, converge to one state (the joiner took the pinned genesis from the
founder), the merged model is exported (``checkpoint``) with the plug-in's own tensor names, and both
daemons stop on ``meshtrain stop`` (``POST /v1/stop``: a clean drain, exit 0, no socket left).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli.client import ControlClient, ControlError
from daemon.cli.main import main
from daemon.status import Status

ROUNDS = 3
START_TIMEOUT_S = 180.0  # 2 cores: two daemons import torch and libp2p, each with a training child
TRAIN_TIMEOUT_S = 240.0
POLL_S = 0.25


def meshtrain(*args: str) -> str:
    """One command, as a user types it; its stdout (fails the test on a non-zero exit)."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, f"meshtrain {' '.join(args)}:\n{result.output}"
    return result.stdout


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """Starts `meshtrain --home H daemon --max-rounds ROUNDS` in the background; all are stopped at the
    end, and their logs shown if the test failed."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(home: Path) -> subprocess.Popen[bytes]:
        with open(home / "daemon.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "--home", str(home), "daemon", "--max-rounds",
                 str(ROUNDS)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started.append((proc, home))
        return proc

    yield start
    for proc, home in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"===== {home}/daemon.log (tail) =====")
        print("\n".join((home / "daemon.log").read_text(errors="replace").splitlines()[-40:]))


def wait_for(
    homes: list[Path], done: Callable[[list[Status]], bool], *, timeout_s: float, what: str
) -> list[Status]:
    """Poll the nodes' status until ``done`` holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            statuses = [ControlClient.for_home(home, timeout_s=10).status() for home in homes]
        except ControlError:
            statuses = []
        if statuses and done(statuses):
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}: {statuses}")
        time.sleep(POLL_S)


def test_a_plugin_run_joined_from_an_invite(
    tmp_path: Path, daemons: Callable[[Path], subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
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
    founder = daemons(a)
    (first,) = wait_for([a], lambda s: s[0].genesis is not None, timeout_s=START_TIMEOUT_S,
                        what="the founder to found the run")
    assert first.task == f"{tmp_path / 'mymodel.py'}:MymodelTask"

    # Join in one line: the second node knows nothing but the invite.
    token = meshtrain("--home", str(a), "invite", "--include-loopback").strip()
    meshtrain("--home", str(b), "init", "--join", token, "--listen", loopback)
    joiner = daemons(b)
    statuses = wait_for(
        [a, b],
        lambda s: all(x.contributions == 2 * ROUNDS and x.round == ROUNDS for x in s)
        and s[0].state_hash == s[1].state_hash,
        timeout_s=START_TIMEOUT_S + TRAIN_TIMEOUT_S,
        what="both nodes to train and hold the same model",
    )
    assert statuses[1].genesis == first.genesis and statuses[1].join.pinned_genesis == first.genesis
    assert statuses[1].join.source == first.peer_id and statuses[1].run == "byom"
    assert statuses[1].state_hash is not None
    assert statuses[1].state_hash[:16] in meshtrain("--home", str(b), "status")

    # The merged model, under the plug-in's own tensor names.
    meshtrain("--home", str(b), "checkpoint", "merged.safetensors")
    from safetensors.numpy import load_file

    assert set(load_file(tmp_path / "merged.safetensors")) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                               "3.weight", "3.bias"}

    # `meshtrain stop` drains both daemons: exit 0, nothing left behind.
    for home, proc in ((b, joiner), (a, founder)):
        assert "stopped" in meshtrain("--home", str(home), "stop")
        assert proc.wait(timeout=5) == 0
        assert not (home / "control.sock").exists() and not (home / "daemon.pid").exists()
