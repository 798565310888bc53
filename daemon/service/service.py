"""``meshtrain daemon``: run one node in the foreground until SIGTERM or SIGINT.

Start-up order: home dir and pid file, the node (p2p host, state, trainer), then the control socket once
the model state is loaded; then tell systemd we are ready. Shutdown is the reverse, bounded in time: the
control socket goes first so no command races the teardown, then the node stops its tasks, the trainer,
flushes the log and leaves the mesh.

SIGHUP reloads config.toml (see ``daemon.service.reload``: what can change live changes, the rest is logged as
needing a restart), bracketed by ``RELOADING=1`` / ``READY=1`` so ``systemctl reload`` waits for it.

SIGTERM (or SIGINT) drains within ``SHUTDOWN_TIMEOUT_S``: ``STOPPING=1``, close the control socket and
the HTTP sites, stop the training loop (a round in flight is abandoned: its contribution was never
signed, so nothing half-made escapes), stop the training child, fsync and close the log, publish a last
heartbeat saying "leaving", then close the libp2p host, which closes every connection so peers drop this
node at once instead of timing out. If
the drain overruns its bound (a wedged child or thread), the daemon says so and exits 1 without waiting
for more; systemd's ``TimeoutStopSec`` is a second, longer bound behind this one.

systemd integration needs no library: ``sd_notify`` is one datagram to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from daemon.config import Config
from daemon.home import Home
from daemon.node.node import Node
from daemon.service.api import open_control_site, open_tcp_control_site
from daemon.service.auth import load_or_create_token
from daemon.service.history import HISTORY_FILE, RoundLog
from daemon.service.logs import RingBufferHandler, bind_node, configure_logging
from daemon.service.metrics import NodeMetrics
from daemon.service.reload import apply_reload
from daemon.service.web import open_http_sites
from daemon.status import to_json

__all__ = ["configure_logging", "run_daemon", "sd_notify"]

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0  # < TimeoutStopSec=45 in contrib/systemd/meshtrain.service
EXIT_DRAIN_OVERRUN = 1
WATCHDOG_FRACTION = 0.5  # ping at half the watchdog interval, as sd_watchdog_enabled(3) advises


def sd_notify(message: str) -> None:
    """Send a state line to systemd when run under ``Type=notify``; a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


async def _watchdog() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    if not usec:
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 1e6 * WATCHDOG_FRACTION)


async def _run(
    home: Home, config: Config, reload_config: Callable[[], Config], ring: RingBufferHandler
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_stop_signal(signum: signal.Signals) -> None:
        received.append(signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    node = Node(home, config)
    bind_node(peer_id=node.host.peer_id, run=config.node.run)
    metrics = None
    if config.metrics.enabled:
        metrics = NodeMetrics(node, trainer_pid=lambda: node.trainer.info.get("pid"))
    round_log = RoundLog(home.path / HISTORY_FILE, session=node.started_at)
    runners: list[web.AppRunner] = []

    def on_hup() -> None:
        # MONOTONIC_USEC lets Type=notify-reload units tell this reload from an older one (sd_notify(3)).
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        report = apply_reload(node, reload_config)
        node.config_reloaded()
        summary = (
            "reload failed: " + report.error if report.error else f"reloaded {len(report.reloaded)} keys"
        )
        sd_notify(f"READY=1\nSTATUS={summary}")

    # Registered at once: SIGHUP's default action would kill a daemon that is still starting.
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def on_ready() -> None:
        runners.append(await open_control_site(
            node, home.socket_path(config), logs=ring, group=config.api.socket_group, on_stop=stop.set
        ))
        if config.api.tcp_listen:  # opt-in, bearer token required (daemon/api.py, SECURITY.md)
            token = load_or_create_token(home.path / config.api.token_file)
            runners.append(
                await open_tcp_control_site(node, config.api.tcp_listen, token, logs=ring, on_stop=stop.set)
            )
            log.info("control API on tcp listen=%s (bearer token required)", config.api.tcp_listen)
        runners.extend(
            await open_http_sites(
                config,
                status=lambda: _status_json(node),
                history=lambda: round_log.rounds(node.history()),
                metrics=metrics,
                logs=ring,
            )
        )
        log.info("ready peer_id=%s listen=%s", node.host.peer_id, " ".join(node.host.listen_addrs()))
        sd_notify(f"READY=1\nSTATUS=serving run {config.node.run} as {node.host.peer_id}")

    node_task = asyncio.create_task(node.run(on_ready=on_ready), name="node")
    watchdog = asyncio.create_task(_watchdog(), name="watchdog")
    history = asyncio.create_task(round_log.run(node.history), name="history")
    stop_wait = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({node_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        started = time.monotonic()
        sd_notify("STOPPING=1")
        log.info(
            "stopping signal=%s training=%s round=%s",
            received[0] if received else "none",
            node.training_state,
            node.rounds_done,
        )
        for runner in runners:  # one at a time, as aiohttp's own cleanup does
            await runner.cleanup()
        for task in (node_task, watchdog, history, stop_wait):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(watchdog, history, stop_wait, return_exceptions=True), 1)
        # asyncio.wait, not wait_for: on overrun it returns instead of waiting for the cancellation.
        done, _ = await asyncio.wait({node_task}, timeout=SHUTDOWN_TIMEOUT_S - (time.monotonic() - started))
        if not done:
            log.error(
                "drain overran its bound timeout_s=%.0f; exiting without a clean shutdown", SHUTDOWN_TIMEOUT_S
            )
            _remove_runtime_files(home, config)
            logging.shutdown()
            os._exit(EXIT_DRAIN_OVERRUN)
        round_log.sync_logged(node.history(), final=True)
        log.info(
            "drained: training stopped, log flushed, connections closed seconds=%.2f",
            time.monotonic() - started,
        )
    # A node that ended by itself failed: surface its exception.
    if node_task.done() and not node_task.cancelled() and node_task.exception() is not None:
        raise node_task.exception()  # type: ignore[misc]


async def _status_json(node: Node) -> dict[str, Any]:
    return to_json(await node.fresh_status())


def run_daemon(home: Home, config: Config, *, reload_config: Callable[[], Config] | None = None) -> None:
    """Run the node until SIGTERM/SIGINT. ``reload_config`` re-reads the config on SIGHUP (with the same
    command-line overrides the start used); by default it re-reads ``home``'s config.toml."""
    home.create()
    configure_logging(config.log.level, fmt=config.log.format)
    pid_file = home.pid_file
    pid_file.write_text(f"{os.getpid()}\n")
    ring = RingBufferHandler()
    logging.getLogger().addHandler(ring)
    try:
        asyncio.run(_run(home, config, reload_config or home.load_config, ring))
    finally:
        _remove_runtime_files(home, config)
        log.info("stopped")
        logging.getLogger().removeHandler(ring)


def _remove_runtime_files(home: Home, config: Config) -> None:
    with contextlib.suppress(FileNotFoundError):
        if home.pid_file.read_text().strip() == str(os.getpid()):
            home.pid_file.unlink()
    home.socket_path(config).unlink(missing_ok=True)
