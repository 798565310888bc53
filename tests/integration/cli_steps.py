"""The CLI as a user types it, against real daemons started from their homes (not through `cluster`).

`meshtrain(...)` runs one command in-process (click's runner) and fails the test on a non-zero exit;
`wait_for(...)` polls the nodes' control sockets; the `daemons` fixture (conftest.py) starts
`meshtrain --home H daemon` processes and stops them at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from daemon.cli.client import ControlClient, ControlError
from daemon.cli.main import main
from daemon.status import Status

POLL_S = 0.25


def meshtrain(*args: str) -> str:
    """One command, as a user types it; its stdout (fails the test on a non-zero exit)."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, f"meshtrain {' '.join(args)}:\n{result.output}"
    return result.stdout


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
