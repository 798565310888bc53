"""Fixtures that run real daemon processes on loopback: through the cluster harness, or one by one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.cli.cluster import Cluster


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    """A cluster directory whose nodes are always stopped at the end, pass or fail."""
    directory = tmp_path / "cluster"
    yield directory
    group = Cluster(directory)
    if group.manifest_path.exists():
        group.down()
        for log in sorted(directory.glob("node*/daemon.log")):
            # Shown by pytest only when the test failed: the daemons' own account of what happened.
            print(f"===== {log} (tail) =====")
            print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))


@pytest.fixture
def daemons() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """`start(home, *args)` runs `meshtrain --home HOME daemon ARGS` in the background (its log in
    HOME/daemon.log); all are stopped at the end, and their logs shown if the test failed."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(home: Path, *args: str) -> subprocess.Popen[bytes]:
        with open(home / "daemon.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "--home", str(home), "daemon", *args],
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
