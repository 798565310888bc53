"""contrib/systemd: both units and the idle drop-in pass `systemd-analyze verify`, declare what the daemon
implements, and share one hardening; the sysusers.d file makes the user and group; and, where systemd is
PID 1, the installed template unit runs a real daemon through the administrator's first five minutes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[3]
SYSTEMD = ROOT / "contrib" / "systemd"
UNIT = SYSTEMD / "meshtrain.service"
TEMPLATE = SYSTEMD / "meshtrain@.service"
SYSUSERS = ROOT / "contrib" / "sysusers.d" / "meshtrain.conf"
HAS_ANALYZE = shutil.which("systemd-analyze") is not None
# Keys that differ between the two units by design (the instance's name in paths and the description).
PER_INSTANCE = {
    "Description",
    "Environment",
    "EnvironmentFile",
    "ExecStart",
    "StateDirectory",
    "RuntimeDirectory",
    "ReadWritePaths",
}


def _meshtrain_executable() -> Path:
    path = Path(sys.executable).parent / "meshtrain"
    return path if path.exists() else Path(shutil.which("meshtrain") or "/usr/local/bin/meshtrain")


def _verify(unit: Path, *, as_name: str, drop_in: Path | None = None, tmp_path: Path) -> None:
    """`systemd-analyze verify` of ``unit`` installed as ``as_name`` (ExecStart pointing at our venv),
    with ``drop_in`` in its ``.d`` directory; any complaint about it fails."""
    directory = tmp_path / "units"
    directory.mkdir(exist_ok=True)
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={_meshtrain_executable()}", unit.read_text(), flags=re.M)
    (directory / unit.name).write_text(text)
    if as_name != unit.name:
        (directory / as_name).symlink_to(unit.name)
    if drop_in is not None:
        (directory / f"{unit.name}.d").mkdir()
        shutil.copy(drop_in, directory / f"{unit.name}.d" / drop_in.name)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(directory / as_name)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},  # drop-ins from here, then the defaults
    )
    # An unknown directive, a bad value, a non-executable ExecStart: each is printed with the file's name.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "meshtrain" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@pytest.mark.skipif(not HAS_ANALYZE, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    _verify(UNIT, as_name="meshtrain.service", drop_in=SYSTEMD / "idle.conf", tmp_path=tmp_path)


@pytest.mark.skipif(not HAS_ANALYZE, reason="systemd-analyze is not installed")
def test_template_unit_verifies_for_an_instance(tmp_path: Path) -> None:
    _verify(TEMPLATE, as_name="meshtrain@gpu0.service", drop_in=SYSTEMD / "idle.conf", tmp_path=tmp_path)


def _directives(path: Path) -> list[tuple[str, str]]:
    return re.findall(r"^(\w+)=(.*)$", path.read_text(), re.M)


@pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_unit_declares_the_service_contract(unit: Path) -> None:
    """What the daemon implements must be what the unit asks for (notify, reload by SIGHUP, drain)."""
    text = unit.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM", "WatchdogSec="):
        assert line in text
    from daemon.config import EX_CONFIG
    from daemon.service.service import SHUTDOWN_TIMEOUT_S

    assert f"RestartPreventExitStatus={EX_CONFIG}" in text, "a config error must not restart-loop"
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    assert stop > SHUTDOWN_TIMEOUT_S, "systemd must not kill the daemon before its own drain bound"
    assert re.search(r"^ExecStart=/opt/meshtrain/bin/meshtrain daemon --home /var/lib/meshtrain", text, re.M)
    hardening = (
        "User=meshtrain",
        "Group=meshtrain",
        "RuntimeDirectoryMode=0750",
        "StateDirectoryMode=0700",
        "SystemCallFilter=@system-service",
        "ProtectProc=invisible",
        "StartLimitBurst=",
        "MemoryMax=",
        "TasksMax=",
    )
    for line in hardening:
        assert line in text, line


def test_both_units_share_one_hardening() -> None:
    plain = [d for d in _directives(UNIT) if d[0] not in PER_INSTANCE]
    template = [d for d in _directives(TEMPLATE) if d[0] not in PER_INSTANCE]
    assert plain == template
    assert dict(_directives(TEMPLATE))["EnvironmentFile"] == "-/etc/meshtrain/%i.env"
    assert "--home /var/lib/meshtrain/%i" in dict(_directives(TEMPLATE))["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_makes_the_user_and_its_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True, capture_output=True)
    user = next(
        line for line in (tmp_path / "etc/passwd").read_text().splitlines() if line.startswith("meshtrain:")
    )
    _, _, uid, gid, _, home, shell = user.split(":")
    assert home == "/var/lib/meshtrain" and shell == "/usr/sbin/nologin" and int(uid) < 1000
    assert f"meshtrain:x:{gid}:" in (tmp_path / "etc/group").read_text()


# -- under systemd as PID 1 ---------------------------------------------------------------------------

SYSTEMD_IS_PID1 = Path("/run/systemd/system").is_dir()  # sd_booted(3)
INSTANCE = "pytest"


def _sh(
    *argv: str, check: bool = True, user: tuple[int, int] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run an administrator's command; ``user`` (uid, gid) runs it as that user with only that group."""
    if user is not None:
        argv = ("setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=check)


@pytest.fixture
def installed() -> Iterator[tuple[str, Path]]:
    """contrib/install.sh for real (root, systemd as PID 1) as meshtrain@pytest with metrics on; removed
    afterwards. The meshtrain user and group stay (as after an uninstall)."""
    if Path("/opt/meshtrain").exists():
        pytest.skip("/opt/meshtrain exists: this test installs its own and would replace it")
    unit, home = f"meshtrain@{INSTANCE}", Path("/var/lib/meshtrain") / INSTANCE
    try:
        _sh(str(ROOT / "contrib" / "install.sh"), "--instance", INSTANCE, "--run", "pytest")
        config = tomllib.loads((home / "config.toml").read_text())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{port}"}
        config["training"]["max_rounds"] = 3
        (home / "config.toml").write_text(tomli_w.dumps(config))
        yield unit, home
    finally:
        _sh("systemctl", "disable", "--now", unit, check=False)
        installed_files = (
            "/opt/meshtrain",
            "/usr/local/bin/meshtrain",
            str(home),
            "/etc/sysusers.d/meshtrain.conf",
            "/etc/systemd/system/meshtrain.service",
            "/etc/systemd/system/meshtrain@.service",
        )
        for path in installed_files:
            _sh("rm", "-rf", path, check=False)
        _sh("systemctl", "daemon-reload", check=False)


@pytest.mark.slow
@pytest.mark.skipif(not SYSTEMD_IS_PID1, reason="systemd is not PID 1 here (a container or sandbox)")
@pytest.mark.skipif(os.geteuid() != 0, reason="installing and starting a unit needs root")
def test_the_first_five_minutes_under_systemd(installed: tuple[str, Path]) -> None:
    unit, home = installed
    sock = f"/run/meshtrain/{INSTANCE}/control.sock"
    _sh("systemctl", "enable", "--now", unit)  # Type=notify: returns once the daemon said READY=1
    status = _sh("systemctl", "status", unit, check=False).stdout
    assert "active (running)" in status and "serving run pytest" in status, status
    group = int(_sh("getent", "group", "meshtrain").stdout.split(":")[2])
    member, outsider = (65534, group), (65534, 65534)  # nobody, with and without the meshtrain group
    shown = json.loads(_sh("meshtrain", "--socket", sock, "--json", "status", user=member).stdout)
    assert shown["run"] == "pytest" and shown["home"] == str(home)
    assert _sh("meshtrain", "--socket", sock, "status", user=outsider, check=False).returncode != 0
    lines = _sh("meshtrain", "--socket", sock, "logs", "-n", "20", user=member).stdout
    assert "level=info" in lines and "run=pytest" in lines
    deadline = time.monotonic() + 120
    while "meshtrain_rounds_total 3.0" not in (metrics := _scrape(home)):
        assert time.monotonic() < deadline, metrics[-2000:]
        time.sleep(1)
    assert "meshtrain_trainer_process_resident_memory_bytes" in metrics
    _sh("systemctl", "reload", unit)
    journal = [
        json.loads(line)
        for line in _sh("journalctl", "-u", unit, "-o", "json", "--no-pager").stdout.splitlines()
    ]
    ours = [e for e in journal if "logger=" in str(e.get("MESSAGE", ""))]
    assert ours and all(not str(e["MESSAGE"]).startswith("<") for e in ours)  # the prefix became PRIORITY
    assert {e["PRIORITY"] for e in ours} >= {"6"} and any(
        "configuration reloaded" in e["MESSAGE"] for e in ours
    )
    assert _sh("journalctl", "-u", unit, "-p", "warning", "--no-pager").returncode == 0
    _sh("systemctl", "stop", unit)
    properties = _sh("systemctl", "show", unit, "-p", "ActiveState", "-p", "ExecMainStatus").stdout
    shown = dict(line.split("=", 1) for line in properties.split())
    assert shown == {"ActiveState": "inactive", "ExecMainStatus": "0"} and not Path(sock).exists()


def _scrape(home: Path) -> str:
    listen = tomllib.loads((home / "config.toml").read_text())["metrics"]["listen"]
    try:
        return urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    except OSError:
        return ""
