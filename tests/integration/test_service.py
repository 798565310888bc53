"""The daemon as a service, against one real daemon process (task digits).

One daemon serves the whole module (starting one costs seconds of torch imports on 2 cores); the tests
run in file order and the last one stops it. The daemon runs with ``$NOTIFY_SOCKET`` pointing at a
datagram socket this test listens on, as systemd would, and with the metrics and dashboard server on
one loopback port.

What is proven: READY=1 arrives once the control socket answers; ``POST /v1/limits`` reaches the
training child; ``/v1/logs`` returns the daemon's own logfmt lines, each naming the node; stderr is JSON
(``[log] format = "json"``); ``/metrics`` scrapes with rounds, merge and round timings, and the memory of
both the daemon and its training process; the dashboard draws a loss chart, the mesh and recent log lines
in headless Chromium; SIGHUP applies reloadable keys (status shows them, max_rounds stops training and,
raised, restarts it) and reports the rest as needing a restart; SIGTERM drains to exit code 0 within the
bound, sends STOPPING=1, writes the round history to history.jsonl, and leaves no socket or pid file
behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from daemon.cli.client import ControlClient, DaemonNotRunning
from daemon.cli.cluster import Cluster, _free_port
from daemon.home import Home
from daemon.service.service import SHUTDOWN_TIMEOUT_S

START_TIMEOUT_S = 120.0
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    home: Home
    client: ControlClient
    http: str
    notify: socket.socket
    messages: list[str]
    log: Path

    def notifications(self) -> list[str]:
        """Every sd_notify datagram received so far (non-blocking drain of the socket)."""
        while True:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 60
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = self.client.get("/v1/status")
            except DaemonNotRunning:
                status = {}
            if status and predicate(status):
                return status
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status: {status}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("svc")
    (info,) = Cluster(directory / "cluster").create(
        1, task="digits", training={"max_rounds": 1000, "eval_every": 2}
    )
    home = Home(Path(info.home))
    config = tomllib.loads(home.config_file.read_text())
    port = _free_port()
    config["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{port}"}
    config["dashboard"] = {"enabled": True, "listen": f"127.0.0.1:{port}"}  # one server for both
    config["log"] = {"format": "json"}  # stderr; the ring of /v1/logs stays logfmt
    home.config_file.write_text(tomli_w.dumps(config))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify.sock"))
    notify.setblocking(False)
    log = home.path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "daemon", "--home", str(home.path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "NOTIFY_SOCKET": str(directory / "notify.sock"), "PYTHONUNBUFFERED": "1"},
        )
    daemon = Daemon(
        proc,
        home,
        ControlClient(home.socket_path(), timeout_s=10),
        f"http://127.0.0.1:{port}",
        notify,
        [],
        log,
    )
    try:
        yield daemon
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        print("===== daemon.log (tail) =====")
        print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))


def test_ready_notification_once_serving(node: Daemon) -> None:
    node.wait_status(lambda s: s["training"] == "running", "the node to start training", START_TIMEOUT_S)
    deadline = time.monotonic() + 10
    while not any(m.startswith("READY=1") for m in node.notifications()):
        assert time.monotonic() < deadline, node.messages
        time.sleep(0.05)
    assert "STATUS=serving run cluster" in node.messages[0]


def test_limits_reach_the_training_process_and_logs_show_it(node: Daemon) -> None:
    answer = node.client.post("/v1/limits", {"threads": 2, "bandwidth_bytes_per_s": 250_000})
    assert answer["threads"] == 2 and answer["bandwidth_bytes_per_s"] == 250_000
    status = node.wait_status(lambda s: s["limits"]["threads_applied"] == 2, "threads to apply")
    assert status["limits"]["bandwidth_bytes_per_s"] == 250_000
    lines = node.client.get("/v1/logs?lines=200")["lines"]
    assert any("training threads applied" in line and "threads=2" in line for line in lines), lines[-10:]
    assert all(line.startswith("ts=") and " level=" in line for line in lines)
    peer_id = node.client.get("/v1/status")["peer_id"]
    ready = next(i for i, line in enumerate(lines) if "msg=ready" in line)
    assert all(f" node={peer_id}" in line and " run=cluster" in line for line in lines[ready:]), lines[
        ready:
    ][:3]
    with pytest.raises(Exception, match="threads"):
        node.client.post("/v1/limits", {"threads": 0})


def test_metrics_scrape(node: Daemon) -> None:
    node.wait_status(lambda s: s["round"] >= 3 and s["eval"].get("val_loss") is not None, "3 rounds")
    text = urllib.request.urlopen(f"{node.http}/metrics", timeout=10).read().decode()
    samples = {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples["meshtrain_rounds_total[]"] >= 3
    assert samples["meshtrain_contributions[]"] >= 3
    assert samples["meshtrain_contributions_processed_total[('result', 'accepted')]"] >= 3
    assert samples["meshtrain_received_bytes_total[]"] == 0  # no peers (it still publishes gossip)
    assert samples["meshtrain_peers[('connection', 'direct')]"] == 0
    assert samples["meshtrain_merge_seconds_count[]"] >= 3
    assert samples["meshtrain_round_seconds_count[]"] >= 3
    assert samples["meshtrain_val_loss[]"] > 0
    assert samples["meshtrain_training_threads[]"] == 2
    assert samples["meshtrain_training_state[('state', 'running')]"] == 1
    assert samples["process_resident_memory_bytes[]"] > 20e6  # the daemon: libp2p, aiohttp, no torch
    assert samples["meshtrain_trainer_process_resident_memory_bytes[]"] > 100e6  # the child: torch
    assert samples["meshtrain_trainer_process_cpu_seconds_total[]"] > 0
    assert any(k.startswith("meshtrain_build_info[") for k in samples)


def test_dashboard_draws_the_loss_chart_in_chromium(node: Daemon, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    node.wait_status(lambda s: s["round"] >= 2, "2 rounds")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [chromium, *flags, "--virtual-time-budget=3000", "--dump-dom", f"{node.http}/"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    loss = re.search(r'id="loss-chart"[^>]*data-points="(\d+)"', dom)
    bytes_chart = re.search(r'id="bytes-chart"[^>]*data-points="(\d+)"', dom)
    assert loss and bytes_chart, dom[:2000]
    assert int(loss.group(1)) >= 2 and int(bytes_chart.group(1)) >= 2
    logs = re.search(r'id="logs" data-lines="(\d+)"', dom)
    assert logs and int(logs.group(1)) > 5 and "msg=ready" in dom
    assert re.search(r'id="mesh" data-peers="0"', dom) and "this node" in dom
    assert "<path" in dom and "state-running" in dom
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1280,800", f"--screenshot={shot}", f"{node.http}/"],
        capture_output=True,
        timeout=60,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    if out := os.environ.get("MESHTRAIN_SCREENSHOT"):
        shutil.copy(shot, out)  # for a human to look at


def test_sighup_reloads_live_keys_and_reports_the_rest(node: Daemon) -> None:
    rounds = node.client.get("/v1/status")["round"]
    config = tomllib.loads(node.home.config_file.read_text())
    config["training"]["threads"] = 3
    config["training"]["max_rounds"] = rounds + 2
    config["log"]["level"] = "DEBUG"
    config["sync"]["max_batch"] = 32  # reloadable
    config["api"] = {"socket": "other.sock"}  # needs a restart
    node.home.config_file.write_text(tomli_w.dumps(config))
    node.proc.send_signal(signal.SIGHUP)
    status = node.wait_status(
        lambda s: s["config"]["max_rounds"] == rounds + 2 and s["config"]["log_level"] == "DEBUG",
        "the reload to show in status",
    )
    assert status["limits"]["threads"] == 3
    assert status["limits"]["bandwidth_bytes_per_s"] == 250_000  # set at runtime, not in the file
    status = node.wait_status(lambda s: s["training"] == "done", "max_rounds to stop training")
    assert status["round"] >= rounds + 2  # a round in flight during the reload may finish
    lines = node.client.get("/v1/logs?lines=500")["lines"]
    reload_line = next(line for line in lines if "configuration reloaded" in line)
    assert "training.max_rounds=" in reload_line and "needs_restart=api.socket" in reload_line
    assert any("RELOADING=1" in m for m in node.notifications())
    assert node.home.socket_path().name == "other.sock"  # the file says so; the running socket stays
    # Raising max_rounds on a finished node restarts its training, up to the new limit.
    done = status["round"]
    config["training"]["max_rounds"] = done + 1
    node.home.config_file.write_text(tomli_w.dumps({**config, "api": {"socket": "control.sock"}}))
    node.proc.send_signal(signal.SIGHUP)
    node.wait_status(
        lambda s: s["round"] == done + 1 and s["training"] == "done", "a raised max_rounds to train again"
    )


def test_sigterm_drains_exits_zero_and_cleans_up(node: Daemon) -> None:
    assert node.home.pid_file.exists() and (node.home.path / "control.sock").exists()
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 15)
    took = time.monotonic() - started
    assert code == 0, node.log.read_text()[-3000:]
    assert took < SHUTDOWN_TIMEOUT_S
    assert not node.home.pid_file.exists()
    assert not (node.home.path / "control.sock").exists()
    messages = node.notifications()
    ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert messages[-1] == "STOPPING=1" and ready < len(messages) - 1
    events = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    stopping = next(e for e in events if e.get("msg") == "stopping")
    assert stopping["signal"] == "SIGTERM" and stopping["node"] and stopping["run"] == "cluster"
    assert any(e.get("msg", "").startswith("drained:") for e in events)
    history = [json.loads(line) for line in (node.home.path / "history.jsonl").read_text().splitlines()]
    rounds = [r["round"] for r in history]
    assert rounds == sorted(set(rounds)) and rounds[-1] == stopping["round"]  # every round, the last one too
