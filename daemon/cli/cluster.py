"""A local cluster: N real daemon processes on loopback, one home dir each, under one directory.

Used by ``meshtrain cluster ...``, by ``make demo`` and by the integration and fault tests, so what the
tests prove is what users run. The cluster directory holds ``cluster.json`` (the manifest: each node's home
and port) and ``node<I>/`` homes; each daemon logs to ``node<I>/daemon.log``.

Ports are chosen once at ``up`` (free, and outside the kernel's ephemeral range) and kept in the
manifest, so a restarted node comes back on the same address and its peers' bootstrap entries stay
valid. Node 0 founds the run; the others bootstrap from it.

A node may instead live at an address of its own inside a network namespace (``create(hosts=,
netns=)``): it is started under ``ip netns exec`` and listens on that address; its control socket is a
file in its home, reachable from every namespace. tests/netns/wan.py builds such a WAN.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w

from daemon.cli.client import ControlClient, ControlError, process_alive
from daemon.home import Home
from daemon.status import parse_status

__all__ = ["Cluster", "ClusterError", "NodeInfo"]

MANIFEST = "cluster.json"
START_TIMEOUT_S = 180.0  # 2 cores, N processes importing torch and libp2p at once
POLL_S = 0.25
PORT_FLOOR = 20000  # cluster ports come from [PORT_FLOOR, start of the ephemeral range)


class ClusterError(RuntimeError):
    """The cluster is not in the state the command needs (no manifest, node not running, timeout)."""


@dataclass(frozen=True)
class NodeInfo:
    index: int
    home: str
    port: int
    peer_id: str
    host: str = "127.0.0.1"
    """The IPv4 address the node listens on."""
    netns: str = ""
    """Network namespace the daemon runs in ("": the caller's)."""

    @property
    def addr(self) -> str:
        return f"/ip4/{self.host}/tcp/{self.port}/p2p/{self.peer_id}"


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()

    # -- manifest -------------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def nodes(self) -> list[NodeInfo]:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no cluster in {self.dir} (run `meshtrain cluster up` first)") from exc
        return [NodeInfo(**n) for n in data["nodes"]]

    def node(self, index: int) -> NodeInfo:
        nodes = self.nodes()
        if not 0 <= index < len(nodes):
            raise ClusterError(f"no node {index}: the cluster has nodes 0..{len(nodes) - 1}")
        return nodes[index]

    def client(self, index: int, *, timeout_s: float = 10.0) -> ControlClient:
        home = Home(Path(self.node(index).home))
        return ControlClient(home.socket_path(), timeout_s=timeout_s)

    # -- lifecycle ------------------------------------------------------------------------------------

    def create(
        self,
        nodes: int,
        *,
        task: str = "digits",
        run: str = "cluster",
        training: dict[str, Any] | None = None,
        diloco: dict[str, Any] | None = None,
        sync: dict[str, Any] | None = None,
        hosts: list[str] | None = None,
        netns: list[str] | None = None,
    ) -> list[NodeInfo]:
        """Write N homes and the manifest; start nothing. ``hosts``/``netns``: node i listens on
        ``hosts[i]`` inside namespace ``netns[i]`` (default: all on 127.0.0.1 in the caller's)."""
        import p2p

        if nodes < 1:
            raise ClusterError("a cluster needs at least one node")
        hosts = hosts or ["127.0.0.1"] * nodes
        netns = netns or [""] * nodes
        if len(hosts) != nodes or len(netns) != nodes:
            raise ClusterError(f"hosts and netns need one entry per node ({nodes})")
        if self.manifest_path.exists():
            raise ClusterError(f"{self.dir} already holds a cluster (`meshtrain cluster down` first)")
        self.dir.mkdir(parents=True, exist_ok=True)
        infos: list[NodeInfo] = []
        for index in range(nodes):
            home = Home(self.dir / f"node{index}")
            home.create()
            identity = p2p.load_or_create_identity(home.identity_file)
            infos.append(
                NodeInfo(index, str(home.path), _free_port(), identity.peer_id, hosts[index], netns[index])
            )
        for info in infos:
            config = {
                "node": {
                    "run": run,
                    "listen": [f"/ip4/{info.host}/tcp/{info.port}"],
                    "bootstrap": [] if info.index == 0 else [infos[0].addr],
                    "dial_private_addrs": True,  # loopback, or the private ranges of test namespaces
                },
                "training": {"task": task, "shard": info.index, "num_shards": nodes, **(training or {})},
                "sync": sync or {},
                "diloco": {"expected_peers": nodes, **(diloco or {})},
            }
            Home(Path(info.home)).config_file.write_text(tomli_w.dumps(config))
        self.manifest_path.write_text(json.dumps({"nodes": [asdict(i) for i in infos]}, indent=2))
        return infos

    def set_training_option(self, index: int, **values: Any) -> None:
        """Change ``[training]`` keys of one node's config (takes effect when it next starts)."""
        home = Home(Path(self.node(index).home))
        config = tomllib.loads(home.config_file.read_text())
        config.setdefault("training", {}).update(values)
        home.config_file.write_text(tomli_w.dumps(config))

    def start(self, index: int) -> int:
        """Start node ``index`` as a detached daemon process; returns its pid."""
        info = self.node(index)
        home = Home(Path(info.home))
        if self._running_pid(home) is not None:
            raise ClusterError(f"node {index} is already running")
        home.socket_path().unlink(missing_ok=True)
        command = [sys.executable, "-m", "daemon.cli", "daemon", "--home", info.home]
        if info.netns:  # `ip netns exec` execs the daemon in place: the pid is the daemon's
            command = ["ip", "netns", "exec", info.netns, *command]
        log = open(home.path / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal does not reach the nodes
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return proc.pid

    def stop(self, index: int, *, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 60.0) -> None:
        """Signal node ``index`` and wait until its process is gone."""
        home = Home(Path(self.node(index).home))
        pid = self._running_pid(home)
        if pid is None:
            raise ClusterError(f"node {index} is not running")
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while process_alive(pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"node {index} (pid {pid}) did not exit within {timeout_s:.0f} s")
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            _clear_leftovers(home)

    def up(self, nodes: int, *, timeout_s: float = START_TIMEOUT_S, **create_options: Any) -> list[NodeInfo]:
        infos = self.create(nodes, **create_options)
        try:
            for info in infos:
                self.start(info.index)
            self.wait_connected(timeout_s=timeout_s)
        except BaseException:
            self.down()  # a half-started cluster is not left running behind the error
            raise
        return infos

    def down(self, *, grace_s: float = 30.0) -> None:
        """Stop every running node: SIGTERM to all at once, SIGKILL to any still alive after the grace."""
        running = {}
        for info in self.nodes():
            home = Home(Path(info.home))
            if (pid := self._running_pid(home)) is not None:
                os.kill(pid, signal.SIGTERM)
                running[pid] = home
        deadline = time.monotonic() + grace_s
        while (alive := [pid for pid in running if process_alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
            while process_alive(pid):
                time.sleep(0.05)
            _clear_leftovers(running[pid])

    def partition(self, groups: list[list[int]]) -> None:
        """Split the mesh: nodes exchange model data only within their group (fault injection)."""
        nodes = self.nodes()
        group_of = {index: g for g, members in enumerate(groups) for index in members}
        if sorted(group_of) != [n.index for n in nodes]:
            raise ClusterError("every node must be in exactly one group")
        for info in nodes:
            others = [n.peer_id for n in nodes if group_of[n.index] != group_of[info.index]]
            self.client(info.index).post("/v1/faults", {"block": others})

    def heal(self) -> None:
        """Undo :meth:`partition` on every running node."""
        for info in self.nodes():
            self.client(info.index).post("/v1/faults", {"block": []})

    # -- observation ----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each node's status object; a node that does not answer gets ``{"error": ...}``."""
        result = []
        for info in self.nodes():
            try:
                status = self.client(info.index).get("/v1/status")
            except ControlError as exc:
                status = {"peer_id": info.peer_id, "home": info.home, "error": str(exc)}
            result.append({"index": info.index, **status})
        return result

    def wait_until(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        timeout_s: float,
        what: str,
    ) -> list[dict[str, Any]]:
        """Poll status until ``predicate(statuses)`` holds; raise ClusterError naming ``what`` on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.status()
            if predicate(statuses):
                return statuses
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}; last status:\n"
                    + json.dumps(statuses, indent=1)[:4000]
                )
            time.sleep(POLL_S)

    def wait_connected(self, *, timeout_s: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Until every node has loaded its model state and is connected to at least one peer (all nodes,
        for N <= 8)."""
        n = len(self.nodes())
        want = min(n - 1, 7)

        def connected(statuses: list[dict[str, Any]]) -> bool:
            if any("error" in s for s in statuses):
                return False
            parsed = [parse_status(s) for s in statuses]
            return all(s.state_hash is not None and len(s.peers) >= want for s in parsed)

        return self.wait_until(connected, timeout_s=timeout_s, what="all nodes to connect")

    @staticmethod
    def _running_pid(home: Home) -> int | None:
        try:
            pid = int(home.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_alive(pid) else None


def converged(statuses: list[dict[str, Any]], *, contributions: int | None = None) -> bool:
    """All nodes answer and report one state hash (and, if given, that many contributions)."""
    if any("error" in s for s in statuses):
        return False
    parsed = [parse_status(s) for s in statuses]
    if any(s.state_hash is None for s in parsed):
        return False
    if contributions is not None and any(s.contributions != contributions for s in parsed):
        return False
    return len({s.state_hash for s in parsed}) == 1


def _clear_leftovers(home: Home) -> None:
    """Remove the pid file and control socket a SIGKILLed daemon could not clean up itself."""
    home.pid_file.unlink(missing_ok=True)
    home.socket_path().unlink(missing_ok=True)


def _free_port() -> int:
    """A free port outside the kernel's ephemeral range.

    A port the OS hands out for ``bind(0)`` comes from the ephemeral range, where any outgoing connection
    may take it while its node is down; a restarted node would then find its address in use.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(PORT_FLOOR, max(low, PORT_FLOOR + 1000)))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ClusterError("no free TCP port below the ephemeral range")
