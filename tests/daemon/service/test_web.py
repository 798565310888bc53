"""daemon.service.web and dashboard.html: the loopback HTTP sites on a real node's status, the thinned
history, recent log lines, and the dashboard drawn in headless Chromium with alerts, the mesh, restarts
and a hostile peer's strings shown as text."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from daemon.config import Config
from daemon.service.logs import RingBufferHandler
from daemon.service.metrics import NodeMetrics
from daemon.service.web import HISTORY_POINTS, open_http_sites, thin
from daemon.status import Counters, JoinStatus, PeerInfo, Status, to_json

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def _alarming(status: Status) -> Status:
    """The node's status with every alert raised, and one heard-from peer whose strings are HTML."""
    evil, suspect = "12D3KooWevil" + "x" * 40, status.peers[0]
    info = PeerInfo(round=7, contributions=9, training=HOSTILE, reachability="public", task="t",
                    device=HOSTILE, throughput_bps=0, age_s=2.0)  # fmt: skip
    counters = Counters(accepted=4, rejected=2, rejected_reasons={"BadSignature": 2}, stale_rounds_skipped=1)
    return msgspec.structs.replace(
        status,
        peer_info={**status.peer_info, evil: info},
        suspects=[suspect],
        equivocators={evil: [3]},
        diverged_from=[suspect],
        disk_full=True,
        join=JoinStatus(refused={evil: f"another run {HOSTILE}"}),
        counters=counters,
    )


def _rounds(sessions: int, per_session: int) -> list[dict[str, Any]]:
    """What RoundLog.rounds returns: ``per_session`` rounds for each of ``sessions`` daemon starts."""
    out = []
    for session in range(sessions):
        for i in range(per_session):
            loss = 2.0 / (session * per_session + i + 1)
            out.append(
                {
                    "session": float(session),
                    "round": session * per_session + i + 1,
                    "time_s": float(i),
                    "train_loss": loss,
                    "val_loss": loss * 1.05,
                    "bytes_sent": 100 * i,
                    "bytes_received": 90 * i,
                }
            )
    return out


@pytest.fixture
async def site(node_status: Status) -> AsyncIterator[str]:
    """The dashboard and /metrics on one loopback port, for an alarming status with two sessions."""
    ring = RingBufferHandler()
    for i in range(30):
        ring.handle(logging.LogRecord("daemon.node", logging.WARNING, __file__, 1, "tick i=%d", (i,), None))
    status = _alarming(node_status)
    config = Config.from_dict(
        {
            "metrics": {"enabled": True, "listen": "127.0.0.1:0"},
            "dashboard": {"enabled": True, "listen": "127.0.0.1:0"},
        }
    )

    class _Node:
        on_timing = None

        def status(self) -> Status:
            return status

        async def fresh_status(self) -> Status:
            return status

    runners = await open_http_sites(
        config,
        status=_json_of(status),
        history=lambda: _rounds(2, 6),
        metrics=NodeMetrics(_Node()),
        logs=ring,
    )
    try:
        (runner,) = runners
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        for runner in runners:
            await runner.cleanup()


def test_thin_keeps_the_shape_and_the_newest() -> None:
    records = [{"round": i} for i in range(10_000)]
    thinned = thin(records, HISTORY_POINTS)
    assert len(thinned) == HISTORY_POINTS and thinned[0]["round"] == 0 and thinned[-1]["round"] == 9_999
    assert thin(records[:5], HISTORY_POINTS) == records[:5]


async def test_one_port_serves_the_page_the_views_and_metrics(site: str) -> None:
    async with aiohttp.ClientSession() as http:
        page = await (await http.get(f"{site}/")).text()
        assert "</script>" not in page.split("const INITIAL = ", 1)[1].split(";\n", 1)[0]  # no early close
        logs = await (await http.get(f"{site}/api/logs")).json()
        assert len(logs["lines"]) == 30 and logs["lines"][-1].endswith("i=29")
        history = await (await http.get(f"{site}/api/history")).json()
        assert [r["round"] for r in history["rounds"]] == list(range(1, 13))
        metrics = await (await http.get(f"{site}/metrics")).text()
        assert "meshtrain_disk_full 1.0" in metrics
        assert (await http.post(f"{site}/api/status")).status == 405  # read-only


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium")
async def test_the_dashboard_draws_the_mesh_alerts_restarts_and_logs(site: str, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]

    dom = await _chromium(chromium, *flags, "--virtual-time-budget=2000", "--dump-dom", f"{site}/")
    counts = {k: int(v) for k, v in re.findall(r'data-(points|sessions|bars|count|lines|peers)="(\d+)"', dom)}
    assert counts["sessions"] == 2 and counts["points"] >= 12 and counts["bars"] == 3, counts
    assert counts["count"] >= 7 and counts["lines"] == 30 and counts["peers"] == 2, counts
    assert 'class="marker"' in dom  # the restart
    body = re.sub(r"<script>.*?</script>", "", dom, flags=re.S)  # the embedded JSON holds the text too
    assert "<img" not in body and "&lt;img src=x" in body and "<title>meshtrain node</title>" in dom
    for text in (
        "Disk full",
        "Equivocator",
        "State diverged",
        "Suspect author",
        "Genesis refused",
        "BadSignature",
    ):
        assert text in dom
    shot = tmp_path / "dashboard.png"
    await _chromium(chromium, *flags, "--window-size=1280,1400", f"--screenshot={shot}", f"{site}/")
    assert shot.stat().st_size > 30_000
    if out := os.environ.get("MESHTRAIN_SCREENSHOT"):
        shutil.copy(shot, out)  # for a human to look at


async def _chromium(*argv: str) -> str:
    """Run Chromium without blocking the loop that serves it; its stdout."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return out.decode()


def _json_of(status: Status) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def json_status() -> dict[str, Any]:
        return to_json(status)

    return json_status
