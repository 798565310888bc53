"""A userspace wide-area link emulator: delay, rate, loss and outages of every node's access link.

Theory of operation
-------------------
The WAN (wan.py) is a star: every site (a node's namespace, or the home router in front of a NATed
node) hangs off one hub namespace by a veth pair, its *access link*. The hub routes everything that
comes in from a site into a TUN device (policy routing: ``ip rule iif h<i> lookup 100``, table 100's
default route is the TUN); this process reads each IPv4 packet from the TUN, decides when it arrives,
and writes it back into the TUN, from where the hub's main table routes it out to the destination site.

A packet from site A to site B crosses A's uplink and then B's downlink. Each direction of each access
link is a FIFO with a rate (serialization time ``size / rate``), a drop-tail buffer (``queue_bytes``), a
one-way propagation delay and an independent per-packet loss probability; an outage drops everything.
Two events per packet, in time order from one heap: *arrive* at B's downlink (after A's uplink queue,
its transmission, and both propagation delays), then *deliver* (after B's downlink queue). Computing the
downlink at the arrive event, not when the packet was read, keeps packets from near and far sources in
true arrival order. The path's round-trip time is ``2 * (delay_A + delay_B)`` plus queueing.

:class:`LinkModel` is the whole model, pure (time is an argument, randomness a seeded generator), and
tested without a kernel (test_wan_emulator.py); :func:`serve` is the loop around it. Control commands
(change a link, read counters) arrive as JSON lines on stdin and are answered on stdout, so a test can
cut a link or collapse its bandwidth mid-run.

Rejected: ``tc netem`` (the natural tool: this machine's kernel has no sch_netem, nor fq for eBPF
departure times; only tbf/htb/pfifo), NFQUEUE (needs a binding library, and gives no way to delay a
verdict without holding kernel queue slots), a TCP proxy per link (changes the addresses libp2p dials and
observes, which is what NAT traversal and identify depend on).

Run inside the hub namespace: ``python wan_emulator.py '<json: {"tun", "seed", "links": {addr: link}}>'``.
It creates the TUN (gone when it exits), prints ``{"ready": true}``, then serves commands until stdin
closes.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import random
import selectors
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Link", "LinkModel", "serve"]

TUNSETIFF = 0x400454CA  # linux/if_tun.h: _IOW('T', 202, int)
IFF_TUN = 0x0001  # layer-3 packets, no Ethernet header
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix: each read() is exactly one IP packet
MAX_PACKET = 65535  # the TUN's MTU is 1500; an IPv4 packet can never exceed this
READ_BURST = 256  # packets read per wake-up before the heap is served again (bounds scheduling lag)
DEFAULT_QUEUE_BYTES = 256 * 1024  # a home router's buffer: 0.2 s at 10 Mbit/s, 2 s at 1 Mbit/s (bufferbloat)


@dataclass
class Link:
    """One site's access link; each field applies to each direction separately."""

    delay_ms: float
    rate_mbit: float
    loss: float = 0.0
    """Probability that a packet crossing this link (in either direction) is lost."""
    up: bool = True
    """False: an outage, every packet to or from the site is dropped."""
    queue_bytes: int = DEFAULT_QUEUE_BYTES

    def __post_init__(self) -> None:
        if not (self.delay_ms >= 0 and self.rate_mbit > 0 and 0 <= self.loss <= 1 and self.queue_bytes > 0):
            raise ValueError(f"not a link: {self}")
        if not isinstance(self.up, bool):
            raise ValueError(f"up must be true or false, got {self.up!r}")


@dataclass
class _Direction:
    free_at: float = 0.0  # when the link finishes transmitting what is queued
    packets: int = 0
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class LinkModel:
    """When each packet arrives, or that it is lost. Pure: ``now`` is passed in, randomness is seeded."""

    def __init__(self, links: dict[str, Link], *, seed: int) -> None:
        self.links = links
        self._rng = random.Random(seed)
        self._up = {addr: _Direction() for addr in links}
        self._down = {addr: _Direction() for addr in links}
        self.unrouted = 0

    def upload(self, src: str, dst: str, size: int, now: float) -> float | None:
        """A packet from ``src`` to ``dst`` read at ``now``: the time it reaches ``dst``'s downlink."""
        a, b = self.links.get(src), self.links.get(dst)
        if a is None or b is None:
            self.unrouted += 1
            return None
        up = self._up[src]
        if not (a.up and b.up):
            up.drop("outage")
            return None
        if self._rng.random() < a.loss:
            up.drop("loss")
            return None
        sent = self._transmit(up, a, size, now)
        if sent is None:
            return None
        return sent + (a.delay_ms + b.delay_ms) / 1000

    def download(self, dst: str, size: int, now: float) -> float | None:
        """A packet reaching ``dst``'s downlink at ``now``: the time it is delivered."""
        b = self.links[dst]
        down = self._down[dst]
        if not b.up:
            down.drop("outage")
            return None
        if self._rng.random() < b.loss:
            down.drop("loss")
            return None
        return self._transmit(down, b, size, now)

    @staticmethod
    def _transmit(direction: _Direction, link: Link, size: int, now: float) -> float | None:
        bytes_per_s = link.rate_mbit * 1e6 / 8
        start = max(now, direction.free_at)
        if round((start - now) * bytes_per_s) + size > link.queue_bytes:  # bytes still queued, this one
            direction.drop("queue")
            return None
        direction.free_at = start + size / bytes_per_s
        direction.packets += 1
        direction.bytes += size
        return direction.free_at

    def set_link(self, addr: str, **changes: Any) -> None:
        """Change some fields of ``addr``'s link (validated as a whole; nothing changes on an error)."""
        unknown = set(changes) - set(Link.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown link fields {sorted(unknown)}")
        self.links[addr] = Link(**{**asdict(self.links[addr]), **changes})

    def stats(self) -> dict[str, Any]:
        """Per site: the link as set now, and packets, bytes and drops (by reason) in each direction."""
        return {
            "unrouted": self.unrouted,
            "links": {
                addr: {"link": asdict(link), "up": asdict(self._up[addr]), "down": asdict(self._down[addr])}
                for addr, link in self.links.items()
            },
        }


# ---- the loop around the model -------------------------------------------------------------------------


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (it disappears when the last descriptor closes); non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def _addresses(packet: bytes) -> tuple[str, str] | None:
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None  # not IPv4 (the hub routes only IPv4 into the TUN)
    return ".".join(map(str, packet[12:16])), ".".join(map(str, packet[16:20]))


def serve(tun: int, model: LinkModel) -> None:
    """Shuttle packets through ``model`` and answer stdin's commands until stdin closes."""
    heap: list[tuple[float, int, str, bytes]] = []  # (due, tie-break, destination or "" when delivered)
    seq = 0
    selector = selectors.DefaultSelector()
    selector.register(tun, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else None
        for key, _ in selector.select(timeout):
            if key.fileobj is sys.stdin:
                line = sys.stdin.readline()
                if not line:
                    return
                _answer(model, json.loads(line))
                continue
            for _ in range(READ_BURST):
                try:
                    packet = os.read(tun, MAX_PACKET)
                except BlockingIOError:
                    break
                addrs = _addresses(packet)
                if addrs is None:
                    model.unrouted += 1
                    continue
                arrive = model.upload(addrs[0], addrs[1], len(packet), time.monotonic())
                if arrive is not None:
                    seq += 1
                    heapq.heappush(heap, (arrive, seq, addrs[1], packet))
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            due, _, dst, packet = heapq.heappop(heap)
            if not dst:
                try:
                    os.write(tun, packet)
                except BlockingIOError:  # the kernel's backlog is full: a drop, as a real link would
                    model.unrouted += 1
                continue
            deliver = model.download(dst, len(packet), due)  # in arrival order: due, not the loop's now
            if deliver is not None:
                seq += 1
                heapq.heappush(heap, (deliver, seq, "", packet))


def _answer(model: LinkModel, command: dict[str, Any]) -> None:
    try:
        if command["op"] == "set":
            model.set_link(command["addr"], **command.get("changes", {}))
            reply: dict[str, Any] = {"ok": True}
        elif command["op"] == "stats":
            reply = {"ok": True, **model.stats()}
        else:
            reply = {"ok": False, "error": f"unknown op {command['op']!r}"}
    except (KeyError, ValueError, TypeError) as exc:
        reply = {"ok": False, "error": repr(exc)}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def main() -> None:
    config = json.loads(sys.argv[1])
    links = {addr: Link(**spec) for addr, spec in config["links"].items()}
    tun = open_tun(config["tun"])
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    serve(tun, LinkModel(links, seed=config["seed"]))


if __name__ == "__main__":
    main()
