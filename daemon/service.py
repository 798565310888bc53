"""``meshtrain daemon``: run one node in the foreground until SIGTERM or SIGINT.

Start-up order: home dir and pid file, the node (p2p host, state, trainer), then the control socket once
the model state is loaded; then tell systemd we are ready. Shutdown is the reverse, bounded in time: the
control socket goes first so no command races the teardown, then the node stops its tasks, the trainer,
flushes the log and leaves the mesh.

systemd integration needs no library: ``sd_notify`` is one datagram to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from daemon.api import open_control_site
from daemon.config import Config
from daemon.home import Home
from daemon.node import Node

__all__ = ["configure_logging", "run_daemon"]

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0
WATCHDOG_FRACTION = 0.5  # ping at half the watchdog interval, as sd_watchdog_enabled(3) advises


def configure_logging(level: str = "INFO") -> None:
    """One line per event, key=value context, no colours: readable in a terminal and in journald."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("libp2p", "multiaddr", "async_service", "aioquic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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


async def _run(home: Home, config: Config) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    node = Node(home, config)
    runner = None

    async def on_ready() -> None:
        nonlocal runner
        runner = await open_control_site(node, home.socket_path(config))
        log.info("ready peer_id=%s listen=%s", node.host.peer_id, " ".join(node.host.listen_addrs()))
        sd_notify(f"READY=1\nSTATUS=serving run {config.node.run} as {node.host.peer_id}")

    node_task = asyncio.create_task(node.run(on_ready=on_ready), name="node")
    watchdog = asyncio.create_task(_watchdog(), name="watchdog")
    stop_wait = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({node_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sd_notify("STOPPING=1")
        log.info("stopping")
        if runner is not None:
            await runner.cleanup()
        for task in (node_task, watchdog, stop_wait):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(watchdog, stop_wait, return_exceptions=True), 1)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(node_task, SHUTDOWN_TIMEOUT_S)
    # A node that ended by itself failed: surface its exception.
    if node_task.done() and not node_task.cancelled() and node_task.exception() is not None:
        raise node_task.exception()  # type: ignore[misc]


def run_daemon(home: Home, config: Config) -> None:
    home.create()
    pid_file = home.pid_file
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        asyncio.run(_run(home, config))
    finally:
        with contextlib.suppress(FileNotFoundError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        home.socket_path(config).unlink(missing_ok=True)
        log.info("stopped")
