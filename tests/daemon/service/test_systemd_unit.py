"""contrib/systemd/meshtrain.service passes `systemd-analyze verify` (with ExecStart pointing at our venv)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "contrib" / "systemd" / "meshtrain.service"


def _meshtrain_executable() -> Path:
    path = Path(sys.executable).parent / "meshtrain"
    return path if path.exists() else Path(shutil.which("meshtrain") or "/usr/local/bin/meshtrain")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=\S+ daemon ", text, re.M)
    unit = tmp_path / "meshtrain.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={_meshtrain_executable()}", text, flags=re.M))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Any complaint (unknown directive, bad value, ExecStart not executable) fails verify or is printed.
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "meshtrain.service" in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_unit_declares_the_service_contract() -> None:
    """What the daemon implements must be what the unit asks for (notify, reload by SIGHUP, drain)."""
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM", "WatchdogSec="):
        assert line in text
    from daemon.config import EX_CONFIG

    assert f"RestartPreventExitStatus={EX_CONFIG}" in text, "a config error must not restart-loop"
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    from daemon.service.service import SHUTDOWN_TIMEOUT_S

    assert stop > SHUTDOWN_TIMEOUT_S, "systemd must not kill the daemon before its own drain bound"
