"""`meshtrain doctor` with no daemon (daemon.cli.checkup's local checks) and the daemon-side findings of
daemon.cli.doctor (relay service, full disk, refused genesis offers)."""

from __future__ import annotations

import datetime
import json
import socket
from collections import namedtuple
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from daemon.cli import checkup
from daemon.cli.doctor import diagnose
from daemon.cli.main import main
from daemon.home import Home
from daemon.status import JoinStatus, NatStatus, RelayService, Status

Usage = namedtuple("Usage", "total used free")


def _by_name(checks: list[checkup.Check]) -> dict[str, checkup.Check]:
    return {check.name: check for check in checks}


def test_doctor_without_a_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    init = CliRunner().invoke(main, ["--home", str(home), "init", "--listen", "/ip4/127.0.0.1/tcp/0"])
    assert init.exit_code == 0
    (home / "daemon.pid").write_text("999999\n")  # left by a daemon that was killed
    (home / "daemon.log").write_text("ts=1 level=info msg=ready\nts=2 level=error msg=boom\n")
    result = CliRunner().invoke(main, ["--home", str(home), "doctor", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["connectivity"] is None
    assert checks["daemon"]["verdict"] == "warn" and "Start one with" in checks["daemon"]["detail"]
    assert checks["config"]["verdict"] == "ok" and checks["identity"]["verdict"] == "ok"
    assert checks["ports"]["verdict"] == "ok"
    assert checks["torch"]["verdict"] == "ok" and "torch" in checks["torch"]["detail"]
    assert checks["last run"]["verdict"] == "warn"
    assert "did not exit cleanly" in checks["last run"]["detail"]
    assert "ends with errors" in checks["last run"]["detail"]
    assert checks["last run"]["lines"][-1] == "ts=2 level=error msg=boom"
    assert report["verdict"] == "warn"
    monkeypatch.setattr(checkup, "_torch", lambda: checkup.Check("torch", "ok", "probed above"))
    human = CliRunner().invoke(main, ["--home", str(home), "doctor"])
    assert "verdict: warn" in human.output and "| ts=2 level=error msg=boom" in human.output


def test_a_bad_config_and_no_identity(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[training]\nthreads = 0\n")
    checks = _by_name(checkup.local_checks(Home(tmp_path), daemon_running=False))
    assert checks["config"].verdict == "problem" and "training.threads" in checks["config"].detail
    assert "ports" not in checks  # nothing to check them against
    assert checks["identity"].verdict == "warn" and "meshtrain init" in checks["identity"].detail
    assert "journalctl" in checks["last run"].detail


def test_a_taken_port_is_a_problem(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "config.toml").write_text(f'[node]\nlisten = ["/ip4/127.0.0.1/tcp/{port}"]\n')
        checks = _by_name(checkup.local_checks(Home(tmp_path), daemon_running=False))
    assert checks["ports"].verdict == "problem" and str(port) in checks["ports"].detail


@pytest.mark.parametrize(
    ("free", "verdict"), [(100 * 2**30, "ok"), (2 * 2**30, "warn"), (100 * 2**20, "problem")]
)
def test_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int, verdict: str) -> None:
    monkeypatch.setattr(checkup.shutil, "disk_usage", lambda path: Usage(free * 2, free, free))
    assert checkup._disk(Home(tmp_path / "not" / "yet")).verdict == verdict


def test_torch_that_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkup, "_TORCH_PROBE", "import torch_that_is_not_there")
    check = checkup._torch()
    assert check.verdict == "problem" and "torch_that_is_not_there" in check.detail


def test_clock() -> None:
    now = datetime.datetime(2026, 12, 1, 12, tzinfo=datetime.UTC)
    assert checkup._clock(now, True).verdict == "ok"
    assert checkup._clock(now, None).verdict == "ok"
    assert "timedatectl set-ntp" in checkup._clock(now, False).detail
    assert checkup._clock(datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC), True).verdict == "problem"


def test_doctor_names_a_full_disk_and_refused_geneses(node_status: Status) -> None:
    refused = {"12D3KooWPeer": "genesis 1111 is not the pinned 2222 ([node] genesis)"}
    status = msgspec.structs.replace(
        node_status, disk_full=True, genesis=None, join=JoinStatus(pinned_genesis="22" * 32, refused=refused)
    )
    report = diagnose(status)
    assert report.verdict == "problem"
    assert any("disk full" in line for line in report.findings)
    assert "  12D3KooWPeer: genesis 1111 is not the pinned 2222 ([node] genesis)" in report.findings
    assert any("meshtrain init --join" in line for line in report.advice)
    assert any(f"Free space on the disk of {status.home}" in line for line in report.advice)


def test_doctor_on_the_relay_service(node_status: Status) -> None:
    on = RelayService(mode="on", active=True, reservations=2)
    public = msgspec.structs.replace(node_status, reachability="public",
                                     nat=NatStatus(reachability="public", relay_service=on))
    assert any("relaying for peers behind NAT: 2 slot(s)" in line for line in diagnose(public).findings)
    private = msgspec.structs.replace(node_status, reachability="private",
                                      nat=NatStatus(reachability="private", relay_service=on))
    assert any('set relay_service = "auto"' in line for line in diagnose(private).advice)
    off = msgspec.structs.replace(
        public, nat=NatStatus(reachability="public", relay_service=RelayService())
    )
    assert any("does not relay" in line for line in diagnose(off).advice)

