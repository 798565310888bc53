"""A wide-area network on one machine: a namespace per node, shaped access links, some nodes behind NATs.

Topology (private test ranges, only inside namespaces this code creates and always deletes)::

                          [hub]  routes every packet through wan_emulator.py (TUN), which applies
                            |    each site's delay, rate, loss and outages
      h1 10.201.1.1 ... hN 10.201.N.1      (one veth per site: the site's access link)
            |                    |
    [n1] 10.201.1.2       [r3] 10.201.3.2  -- masquerade --  10.202.3.1 -- [n3] 10.202.3.2
    public node           home router (nftables NAT, drops unsolicited inbound)   NATed node

A public site is the node's own namespace; a NATed site is a router namespace with the node behind it
(netns_testlib.nat_router, the NAT test's routers). ``eim`` NAT keeps source ports (hole punching can
succeed), ``symmetric`` randomizes them (the node stays relayed). The path between two sites has
round-trip time ``2 * (delay_ms_A + delay_ms_B)``, the smaller of their rates, and both links' loss.

:func:`open_wan` is a context manager: on exit (or on a failure half-way through building) the emulator
stops and every namespace is deleted, which takes the veths, routes and NAT tables with it. Daemons run
inside ``Wan.namespaces[i]`` listening on ``Wan.hosts[i]`` (``daemon.cli.cluster.Cluster.create(hosts=,
netns=)``); a test changes links with :meth:`Wan.set_link` and puts them back with :meth:`Wan.reset`.

Rejected: one bridge for everyone with ``tc netem`` on each veth (the NAT test's layout, and the obvious
design; this kernel has no sch_netem, see wan_emulator.py), shaping inside each node's namespace (a
NATed node's link is its router's uplink, as on a real home connection).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from netns_testlib import Namespaces, nat_router, veth
from wan_emulator import Link

from daemon.cli.cluster import Cluster

__all__ = ["DEFAULT_SITES", "Site", "Wan", "open_wan", "open_wan_cluster"]

EMULATOR = Path(__file__).with_name("wan_emulator.py")
TUN = "wan0"
ROUTE_TABLE = "100"  # the hub's table that sends every site's packets into the emulator
REPLY_TIMEOUT_S = 30.0  # the emulator answers in milliseconds; a loaded 2-core machine can stall it
LOSS = 0.0025  # per link and direction: a path crosses two links, so ~0.5 % per packet end to end
START_TIMEOUT_S = 300.0  # N daemons importing torch on 2 shared cores, then AutoNAT and relays over the WAN
LOG_TAIL_LINES = 60


@dataclass(frozen=True)
class Site:
    """One node's place on the WAN."""

    delay_ms: float
    """One-way propagation delay of the access link (each direction)."""
    rate_mbit: float
    """Rate of the access link (each direction)."""
    loss: float = LOSS
    nat: str = ""
    """"" (public address), "eim" (home NAT, port-preserving) or "symmetric" (random ports)."""


# Five sites: RTTs from 20 ms (0-3) to 200 ms (2-4), rates 10-100 Mbit/s, one slow link (2: 10 Mbit/s,
# 50 ms), two NATed nodes (one that can be hole-punched, one that stays relayed). Node 0 founds the run.
DEFAULT_SITES = (
    Site(delay_ms=5, rate_mbit=100),
    Site(delay_ms=15, rate_mbit=50),
    Site(delay_ms=50, rate_mbit=10),
    Site(delay_ms=5, rate_mbit=100, nat="eim"),
    Site(delay_ms=50, rate_mbit=30, nat="symmetric"),
)


class Wan:
    """A built WAN (use :func:`open_wan`)."""

    def __init__(self, sites: tuple[Site, ...] | list[Site], *, seed: int, log_dir: Path) -> None:
        self.sites = list(sites)
        self.hosts: list[str] = []
        """Address node i listens on (a LAN address behind a NAT)."""
        self.namespaces: list[str] = []
        """Namespace node i runs in."""
        self.edges = [f"10.201.{i + 1}.2" for i in range(len(self.sites))]
        """Site i's address on its access link (the router's public address for a NATed node)."""
        self._ns = Namespaces()
        self._seed = seed
        self._log_dir = log_dir
        self._emulator: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    # -- building ---------------------------------------------------------------------------------------

    def build(self) -> None:
        run = Namespaces.run
        self.hub = self._ns.add("hub")
        for key in ("ip_forward", "conf.all.rp_filter", "conf.default.rp_filter"):
            # packets come back from the TUN with the sites' source addresses: no reverse-path check
            run(self.hub, "sysctl", "-qw", f"net.ipv4.{key}={int(key == 'ip_forward')}")
        for i, site in enumerate(self.sites, start=1):
            edge = self._ns.add(f"s{i}")
            veth(self.hub, f"h{i}", f"10.201.{i}.1/24", edge, "up0", f"10.201.{i}.2/24")
            run(edge, "ip", "route", "add", "default", "via", f"10.201.{i}.1")
            run(self.hub, "ip", "rule", "add", "iif", f"h{i}", "lookup", ROUTE_TABLE)
            if not site.nat:
                self.namespaces.append(edge)
                self.hosts.append(f"10.201.{i}.2")
                continue
            node = self._ns.add(f"n{i}")
            veth(edge, "lan0", f"10.202.{i}.1/24", node, "eth0", f"10.202.{i}.2/24")
            run(node, "ip", "route", "add", "default", "via", f"10.202.{i}.1")
            nat_router(edge, wan_if="up0", symmetric=site.nat == "symmetric")
            self.namespaces.append(node)
            self.hosts.append(f"10.202.{i}.2")
        links = {edge: asdict(self._link(site)) for edge, site in zip(self.edges, self.sites, strict=True)}
        config = {"tun": TUN, "seed": self._seed, "links": links}
        with open(self._log_dir / "wan_emulator.log", "ab") as log:
            self._emulator = subprocess.Popen(
                ["ip", "netns", "exec", self.hub, sys.executable, str(EMULATOR), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._reply()  # {"ready": true}: the TUN exists
        run(self.hub, "ip", "link", "set", TUN, "up")
        run(self.hub, "ip", "route", "add", "default", "dev", TUN, "table", ROUTE_TABLE)

    @staticmethod
    def _link(site: Site) -> Link:
        return Link(delay_ms=site.delay_ms, rate_mbit=site.rate_mbit, loss=site.loss)

    # -- faults -----------------------------------------------------------------------------------------

    @property
    def created(self) -> list[str]:
        """Every namespace of this WAN that exists now (hub, sites, nodes behind NATs)."""
        return list(self._ns.names)

    def set_link(
        self,
        index: int,
        *,
        up: bool | None = None,
        rate_mbit: float | None = None,
        loss: float | None = None,
        delay_ms: float | None = None,
    ) -> None:
        """Change node ``index``'s access link now (None: leave as is)."""
        changes = {"up": up, "rate_mbit": rate_mbit, "loss": loss, "delay_ms": delay_ms}
        changes = {k: v for k, v in changes.items() if v is not None}
        self._call({"op": "set", "addr": self.edges[index], "changes": changes})

    def reset(self) -> None:
        """Every link back to its site's settings."""
        for index, site in enumerate(self.sites):
            self._call({"op": "set", "addr": self.edges[index], "changes": asdict(self._link(site))})

    def stats(self) -> dict[str, Any]:
        """Per site (by index): the link now and, per direction, packets, bytes and drops by reason."""
        reply = self._call({"op": "stats"})
        return {i: reply["links"][edge] for i, edge in enumerate(self.edges)}

    # -- the emulator process ---------------------------------------------------------------------------

    def _call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._emulator is not None and self._emulator.stdin is not None
        self._emulator.stdin.write((json.dumps(command) + "\n").encode())
        self._emulator.stdin.flush()
        reply = self._reply()
        if not reply.get("ok"):
            raise RuntimeError(f"wan emulator refused {command}: {reply}")
        return reply

    def _reply(self) -> dict[str, Any]:
        assert self._emulator is not None and self._emulator.stdout is not None
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self._emulator.poll() is not None:
                raise RuntimeError(
                    f"wan emulator: no reply (exit code {self._emulator.poll()}; see wan_emulator.log)"
                )
            ready, _, _ = select.select([self._emulator.stdout], [], [], left)
            if ready:
                chunk = os.read(self._emulator.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"wan emulator exited (code {self._emulator.wait(5)})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        try:
            if self._emulator is not None:
                if self._emulator.stdin is not None:
                    self._emulator.stdin.close()  # its loop ends when stdin does
                try:
                    self._emulator.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._emulator.kill()
                    self._emulator.wait()
        finally:
            self._ns.close()


@contextmanager
def open_wan(
    sites: tuple[Site, ...] | list[Site] = DEFAULT_SITES, *, seed: int = 0, log_dir: Path
) -> Iterator[Wan]:
    """Build the WAN; on exit, or on any failure, stop the emulator and delete every namespace."""
    wan = Wan(sites, seed=seed, log_dir=log_dir)
    try:
        wan.build()
        yield wan
    finally:
        wan.close()


@contextmanager
def open_wan_cluster(
    directory: Path,
    sites: tuple[Site, ...] | list[Site] = DEFAULT_SITES,
    *,
    seed: int = 0,
    show_logs: bool = True,
    **create_options: Any,
) -> Iterator[tuple[Wan, Cluster]]:
    """A WAN with one real daemon per site (``Cluster.create`` options), started and connected. On exit
    the daemons stop (with ``show_logs``, their log tails are printed: pytest shows them when a test
    failed), then the WAN goes."""
    directory.mkdir(parents=True, exist_ok=True)
    with open_wan(sites, seed=seed, log_dir=directory) as wan:
        group = Cluster(directory / "cluster")
        group.create(len(wan.sites), hosts=wan.hosts, netns=wan.namespaces, **create_options)
        try:
            for index in range(len(wan.sites)):
                group.start(index)
            group.wait_connected(timeout_s=START_TIMEOUT_S)
            yield wan, group
        finally:
            group.down()
            for log in sorted(group.dir.glob("node*/daemon.log")) if show_logs else ():
                lines = log.read_text(errors="replace").splitlines()
                news = [line for line in lines if "level=info logger=daemon.node.rounds round=" not in line]
                print(f"===== {log} (tail, without round lines: {len(lines) - len(news)} of them) =====")
                print("\n".join(news[-LOG_TAIL_LINES:]))
