"""Fixtures that run real daemon processes on loopback through the cluster harness."""

from __future__ import annotations

from collections.abc import Iterator
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
