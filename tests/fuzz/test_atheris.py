"""Every wire and disk decoder under coverage-guided fuzzing (atheris), seeded with valid encodings.

Bounded (``MESHTRAIN_FUZZ_RUNS`` inputs per target, default 30,000) so it fits the default run; the
harness and how to run one target for longer are in ``atheris_targets.py``. Skipped where atheris does
not install (it ships wheels for CPython on x86-64 Linux).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).with_name("atheris_targets.py")
RUNS = int(os.environ.get("MESHTRAIN_FUZZ_RUNS", "30000"))


def test_every_decoder_survives_coverage_guided_fuzzing(tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, HARNESS, "--list"], capture_output=True, text=True, check=True)
    targets = listed.stdout.split()
    assert len(targets) >= 19  # every decoder in the harness, not an empty loop

    def fuzz(target: str) -> str | None:
        run = subprocess.run(
            [sys.executable, HARNESS, target, tmp_path / target, f"-runs={RUNS}", "-max_len=4096"],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # crash-* reproducers land here
            timeout=600,
        )
        if run.returncode != 0 or "DONE" not in run.stderr:
            return f"{target}: exit {run.returncode}\n{run.stderr[-3000:]}"
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one target per core
        failures = [failure for failure in pool.map(fuzz, targets) if failure is not None]
    assert not failures, "\n\n".join(failures)
