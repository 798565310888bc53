"""Who may talk to this node, and how much: swarm keys, the peer allowlist, per-peer rate limits and bans.

Membership has two independent layers (use either or both):

* **Swarm key** (private network, libp2p "pnet"): a 32-byte secret shared by every member. py-libp2p 0.8.1
  wraps every raw TCP connection in a Salsa20 stream keyed with it (``new_host(psk=...)``) *before* the
  multistream and Noise handshakes, so a peer without the key sends and receives noise and the Noise
  handshake fails: it cannot open a single stream, subscribe to gossip or query the DHT. Measured on
  0.8.1 (tests/p2p/test_security.py): members connect and exchange requests; a dialer with another key or
  no key never completes a connection, in either direction. Caveats: this is py-libp2p's own pnet framing
  (8-byte nonce Salsa20), NOT wire-compatible with go/js-libp2p's pnet (24-byte nonce XSalsa20); the
  outer cipher has no MAC (Noise inside authenticates and encrypts everything, so tampering only breaks
  the handshake); a failed handshake is not closed promptly by libp2p, so the dialer's own timeout ends it.
* **Allowlist** of peer ids: a connection from a peer not on the list is closed as soon as libp2p reports
  it (a notifee), its requests are refused before their payload is read, and gossip *authored* by it is
  neither verified, delivered nor forwarded, even when a member forwards it (p2p/_gossip.py). Noise
  proves the remote peer id, so the list cannot be spoofed.
* **Gossip admission** (open runs): the daemon knows which authors belong to its run; its predicate
  (``Host.set_gossip_admission``) is asked, with the same effect, for every author the allowlist admits.

Resource limits (per remote peer, token buckets on the monotonic clock): requests served and gossip
messages verified per author. A peer over its rate has the excess refused (requests get an ERROR frame
``RateLimited``, gossip is dropped before forwarding); each request refusal is a penalty, and
``ban_after_penalties`` penalties within ``ban_window_s`` ban the peer for ``ban_s``: it is disconnected and
every connection attempt is closed until the ban expires. The daemon may add penalties for
application-level misbehaviour (invalid records) through ``Host.penalize``.

The key file format is the one go-ipfs/kubo uses for ``swarm.key``::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SWARM_KEY_BYTES",
    "GateNotifee",
    "PeerGate",
    "PeerLimits",
    "SwarmKeyError",
    "generate_swarm_key",
    "load_swarm_key",
    "parse_swarm_key",
    "write_swarm_key",
]

log = logging.getLogger(__name__)

SWARM_KEY_BYTES = 32
_HEADER = "/key/swarm/psk/1.0.0/"
_ENCODING = "/base16/"
_MAX_KEY_FILE_BYTES = 4096


class SwarmKeyError(ValueError):
    """A swarm key file is missing, malformed or readable by other users."""


def generate_swarm_key() -> str:
    """A new random swarm key in the file format (with a trailing newline)."""
    return f"{_HEADER}\n{_ENCODING}\n{secrets.token_hex(SWARM_KEY_BYTES)}\n"


def parse_swarm_key(text: str) -> bytes:
    """The 32 key bytes of a swarm key file's text. Raises SwarmKeyError naming what is wrong."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != _HEADER:
        raise SwarmKeyError(f"a swarm key has 3 lines, the first being {_HEADER!r}")
    if lines[1] != _ENCODING:
        raise SwarmKeyError(f"only the {_ENCODING!r} encoding is supported, got {lines[1]!r}")
    try:
        key = bytes.fromhex(lines[2])
    except ValueError:
        raise SwarmKeyError("the key line is not hex") from None
    if len(key) != SWARM_KEY_BYTES:
        raise SwarmKeyError(f"the key must be {SWARM_KEY_BYTES} bytes (64 hex digits), got {len(key)}")
    return key


def load_swarm_key(path: Path) -> bytes:
    """Read a swarm key file; refuse one that group or others may read (it is a shared secret)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SwarmKeyError(f"{path} is readable by other users (mode {mode & 0o777:o}); chmod 600 it")
        with path.open("rb") as f:
            raw = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise SwarmKeyError(f"cannot read swarm key {path}: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise SwarmKeyError(f"{path} is too large to be a swarm key")
    try:
        return parse_swarm_key(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise SwarmKeyError(f"{path} is not a text swarm key") from None
    except SwarmKeyError as exc:
        raise SwarmKeyError(f"{path}: {exc}") from None


def write_swarm_key(path: Path) -> None:
    """Create a new swarm key file with mode 0600; refuses to overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_swarm_key())


# ---------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerLimits:
    """Per-peer and total resource bounds (the Host applies them; defaults suit a LAN training run)."""

    max_connections: int = 256
    """Established connections in total (libp2p ConnectionConfig.max_connections)."""
    max_inbound_connections: int = 128
    """Established inbound connections (libp2p resource manager)."""
    request_rate_per_s: float = 50.0
    """Sustained requests served per peer per second (anti-entropy pulls are ~1/s per peer)."""
    request_burst: int = 100
    gossip_rate_per_s: float = 50.0
    """Sustained gossip messages delivered per *author* per second (announcements are ~1 per round)."""
    gossip_burst: int = 200
    ban_after_penalties: int = 50
    """Penalties (rate-limit refusals, invalid records reported by the daemon) that get a peer banned."""
    ban_window_s: float = 60.0
    ban_s: float = 300.0

    def __post_init__(self) -> None:
        if min(self.request_rate_per_s, self.gossip_rate_per_s, self.ban_window_s, self.ban_s) <= 0:
            raise ValueError("rates and durations must be positive")
        if min(self.request_burst, self.gossip_burst, self.ban_after_penalties, self.max_connections) < 1:
            raise ValueError("bursts, ban_after_penalties and max_connections must be >= 1")


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


#: Bound on per-peer bookkeeping entries: a peer-id flood must not grow memory without limit.
MAX_TRACKED_PEERS = 4096


class PeerGate:
    """Decides, per remote peer, whether to accept a connection, a request or a gossip message.

    Pure bookkeeping (no I/O); thread-confined to the Host's trio thread except for reads of ``stats()``.
    ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        *,
        allow_peers: frozenset[str] | None = None,
        limits: PeerLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allow_peers = allow_peers
        self.limits = limits or PeerLimits()
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._gossip: dict[str, _Bucket] = {}
        self._penalties: dict[str, list[float]] = {}
        self._banned_until: dict[str, float] = {}
        self.gossip_admission: Callable[[str], bool] | None = None
        """Open runs: the daemon's membership test for gossip authors (sync, cheap; None admits all)."""
        self.counters: dict[str, int] = {
            "refused_connections": 0,
            "refused_requests_not_member": 0,
            "refused_requests_rate": 0,
            "refused_requests_banned": 0,
            "dropped_gossip_not_member": 0,
            "dropped_gossip_banned": 0,
            "dropped_gossip_not_admitted": 0,
            "dropped_gossip_rate": 0,
            "penalties": 0,
            "bans": 0,
        }

    # -- membership -------------------------------------------------------------------------------------

    def is_member(self, peer: str) -> bool:
        return self.allow_peers is None or peer in self.allow_peers

    def is_banned(self, peer: str) -> bool:
        until = self._banned_until.get(peer)
        if until is None:
            return False
        if self._clock() >= until:
            del self._banned_until[peer]
            return False
        return True

    def admit_connection(self, peer: str) -> bool:
        ok = self.is_member(peer) and not self.is_banned(peer)
        if not ok:
            self.counters["refused_connections"] += 1
        return ok

    # -- rates ------------------------------------------------------------------------------------------

    def admit_request(self, peer: str) -> str | None:
        """None to serve the request, else the refusal reason (the peer is penalized for rate excess)."""
        if not self.is_member(peer):
            self.counters["refused_requests_not_member"] += 1
            return "NotMember"
        if self.is_banned(peer):
            self.counters["refused_requests_banned"] += 1
            return "Banned"
        if not self._take(self._requests, peer, self.limits.request_rate_per_s, self.limits.request_burst):
            self.counters["refused_requests_rate"] += 1
            self.penalize(peer)
            return "RateLimited"
        return None

    def refuse_gossip_author(self, author: str) -> str | None:
        """Why gossip claiming ``author`` is refused before its signature is even checked, or None.

        "not_member": not on the allowlist (a member that forwards it is faulty: the caller penalizes it);
        "banned"; "not_admitted": the admission hook (`Host.set_gossip_admission`) said no, or raised.
        Pure lookups: this runs on the libp2p read path for every message (p2p/_gossip.py).
        """
        if not self.is_member(author):
            self.counters["dropped_gossip_not_member"] += 1
            return "not_member"
        if self.is_banned(author):
            self.counters["dropped_gossip_banned"] += 1
            return "banned"
        admission = self.gossip_admission
        if admission is not None:
            try:
                admitted = bool(admission(author))
            except Exception:  # a daemon bug must not reach libp2p's read loop; refusing is the safe side
                log.warning("gossip admission hook raised author=%s", author, exc_info=True)
                admitted = False
            if not admitted:
                self.counters["dropped_gossip_not_admitted"] += 1
                return "not_admitted"
        return None

    def admit_gossip_rate(self, author: str) -> bool:
        """Take one token from ``author``'s gossip budget (call only for signature-checked messages)."""
        if self._take(self._gossip, author, self.limits.gossip_rate_per_s, self.limits.gossip_burst):
            return True
        # Dropped, not penalized: gossip is best effort (anti-entropy repairs what it misses), and a
        # fast-training honest peer can outrun the budget in a burst. Banning it for that partitioned
        # a soak cluster; a real flooder is held to the budget all the same.
        self.counters["dropped_gossip_rate"] += 1
        return False

    def penalize(self, peer: str) -> bool:
        """Count one penalty; True if it got the peer banned just now (the caller disconnects it)."""
        self.counters["penalties"] += 1
        now = self._clock()
        recent = [t for t in self._penalties.get(peer, ()) if now - t < self.limits.ban_window_s]
        recent.append(now)
        if len(recent) >= self.limits.ban_after_penalties:
            self._penalties.pop(peer, None)
            if len(self._banned_until) >= MAX_TRACKED_PEERS:
                self._expire()
            self._banned_until[peer] = now + self.limits.ban_s
            self.counters["bans"] += 1
            return True
        if peer not in self._penalties and len(self._penalties) >= MAX_TRACKED_PEERS:
            self._penalties.clear()  # crude but bounded: forgetting penalties only delays a ban
        self._penalties[peer] = recent
        return False

    def banned_peers(self) -> list[str]:
        return [p for p in list(self._banned_until) if self.is_banned(p)]

    def stats(self) -> dict[str, int]:
        return dict(self.counters, banned_peers=len(self._banned_until))

    def _take(self, buckets: dict[str, _Bucket], peer: str, rate: float, burst: int) -> bool:
        now = self._clock()
        bucket = buckets.get(peer)
        if bucket is None:
            if len(buckets) >= MAX_TRACKED_PEERS:
                buckets.clear()  # bounded memory; a reset only refills buckets
            bucket = buckets[peer] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def _expire(self) -> None:
        now = self._clock()
        for peer in [p for p, until in self._banned_until.items() if until <= now]:
            del self._banned_until[peer]


class GateNotifee:
    """libp2p network notifee: closes a connection the gate does not admit (non-member or banned).

    Runs in the trio thread. The close is spawned rather than awaited inline: libp2p awaits notifees on
    its connection-setup path.
    """

    def __init__(self, gate: PeerGate, nursery: Any) -> None:
        self._gate = gate
        self._nursery = nursery

    async def connected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        if not self._gate.admit_connection(peer):
            log.info("closing connection from non-member or banned peer=%s", peer)
            self._nursery.start_soon(_close_quietly, conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        return None

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception as exc:  # already closing; nothing more to do
        log.debug("closing refused connection failed error=%r", exc)
