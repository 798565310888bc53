"""Which discovered peers to dial, and when: the provider book of run discovery (sans-IO, clock injected).

Theory of operation
-------------------
Every discovery round (p2p/_discovery.py) asks each connected peer for the providers of our run key, and
each answer is a list of (peer id, addresses) that *the answering peer* chose. Dialling whatever comes back,
every round, lets one peer with throwaway keys point the whole run at a target of its choice (a denial of
service by proxy, or a scan of the run's private networks). So what an answer can make us do is bounded:

* **per answer**: at most `MAX_NEW_PER_ANSWER` providers we did not know are taken from one answer, with at
  most `MAX_ADDRS_PER_PROVIDER` usable addresses each;
* **which addresses**: TCP over IPv4/IPv6, or a ``/p2p-circuit`` through such an address (or through a relay
  named only by peer id); other kinds (DNS names, QUIC, ...) are dropped. Addresses in non-global ranges
  (private, loopback, link-local, CGNAT, ...) are dropped too unless ``allow_private`` (LAN clusters,
  tests on loopback): a peer on the internet has no business sending us to 10.0.0.1;
* **by age**: a provider not reported again within `PROVIDER_TTL_S` is forgotten, and the book holds at
  most `MAX_PROVIDERS` (the least recently reported go first);
* **per round**: `plan` picks at most `MAX_DIALS_PER_ROUND` providers, at most `MAX_DIALS_PER_REPORTER`
  of those reported by a single peer only, and never two direct dials to one IP; providers reported by
  more peers go first (fake ones have one reporter), then the most recently reported;
* **after failure**: a failed dial backs off the provider and each address it tried, from
  `BACKOFF_S[0]` doubling to `BACKOFF_S[1]`, so a target named by many fake providers is still dialled
  at most once per backoff period per address.

Rejected alternatives: trusting only providers whose records are signed (a throwaway key signs anything);
dialling providers only after they dial us (NATed peers never could); a global connection gate on every
dial (it would also refuse the operator's own bootstrap addresses on a LAN).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import multiaddr
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

__all__ = ["ProviderBook", "dialable"]

MAX_NEW_PER_ANSWER = 16  # a run has tens of peers; an honest answer repeats known ones after round one
MAX_ADDRS_PER_PROVIDER = 4  # a node listens on one or two addresses, plus a relayed one per relay
MAX_PROVIDERS = 512  # book size; well above a run's size
PROVIDER_TTL_S = 600.0  # answers repeat every round (10 s): ten minutes of silence means gone
MAX_DIALS_PER_ROUND = 8  # new connections a round may open (others also dial us)
MAX_DIALS_PER_REPORTER = 4  # of which providers known from one peer only
BACKOFF_S = (30.0, 1800.0)  # first retry after a failed dial, doubling up to the cap
MAX_BACKOFF_ENTRIES = 4096  # bounded memory; forgetting a backoff only makes a retry come sooner
MAX_REPORTERS_KEPT = 8  # per provider: enough to rank by


@dataclass(slots=True)
class _Provider:
    addrs: list[multiaddr.Multiaddr]
    seen: float
    reporters: set[ID] = field(default_factory=set)


@dataclass(slots=True)
class _Backoff:
    until: float
    delay: float


class ProviderBook:
    """Providers of the run key seen in DHT answers; `plan` says whom to dial this round (see module doc)."""

    def __init__(self, *, allow_private: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.allow_private = allow_private
        self._clock = clock
        self._providers: dict[ID, _Provider] = {}
        self._backoff: dict[str, _Backoff] = {}
        self.refused_addrs = 0  # addresses dropped by `dialable` (counted for stats)
        self.refused_providers = 0  # new providers over the per-answer bound

    def observe(self, reporter: ID, providers: Iterable[PeerInfo]) -> None:
        """Record one answer from ``reporter`` (our own id for records peers stored on us)."""
        now = self._clock()
        self._expire(now)
        new = 0
        for info in providers:
            addrs = []
            for addr in info.addrs:
                if dialable(addr, info.peer_id, allow_private=self.allow_private):
                    addrs.append(addr)
                else:
                    self.refused_addrs += 1
            known = self._providers.get(info.peer_id)
            if known is None:
                if new >= MAX_NEW_PER_ANSWER:
                    self.refused_providers += 1
                    continue
                new += 1
                if len(self._providers) >= MAX_PROVIDERS:
                    oldest = min(self._providers, key=lambda p: self._providers[p].seen)
                    del self._providers[oldest]
                known = self._providers[info.peer_id] = _Provider(addrs=[], seen=now)
            known.seen = now
            if len(known.reporters) < MAX_REPORTERS_KEPT:
                known.reporters.add(reporter)
            merged = {str(a): a for a in [*known.addrs, *addrs]}  # no duplicates; newest last
            known.addrs = list(reversed(merged.values()))[:MAX_ADDRS_PER_PROVIDER]

    def members(self) -> frozenset[str]:
        """Peer ids (base58) of the providers not yet expired."""
        self._expire(self._clock())
        return frozenset(p.to_base58() for p in self._providers)

    def plan(self, *, connected: set[ID], relay_fallback: bool) -> list[PeerInfo]:
        """Whom to dial this round, with which addresses (public ones first).

        ``relay_fallback``: we can reach a peer with no usable address through our own relays (NAT on).
        """
        now = self._clock()
        self._expire(now)
        order = sorted(
            (p for p in self._providers.items() if p[0] not in connected),
            key=lambda item: (-len(item[1].reporters), -item[1].seen),
        )
        plans: list[PeerInfo] = []
        per_reporter: dict[ID, int] = {}
        used_ips: set[str] = set()
        for peer_id, provider in order:
            if len(plans) >= MAX_DIALS_PER_ROUND:
                break
            if self._backed_off(_peer_key(peer_id), now):
                continue
            sole = next(iter(provider.reporters)) if len(provider.reporters) == 1 else None
            if sole is not None and per_reporter.get(sole, 0) >= MAX_DIALS_PER_REPORTER:
                continue
            addrs = [
                a
                for a in provider.addrs
                if not self._backed_off(str(a), now) and _direct_ip(a) not in used_ips
            ]
            if not addrs and (provider.addrs or not relay_fallback):
                continue
            addrs.sort(key=lambda a: not _is_global(_direct_ip(a)))
            used_ips.update(ip for ip in map(_direct_ip, addrs) if ip is not None)
            if sole is not None:
                per_reporter[sole] = per_reporter.get(sole, 0) + 1
            plans.append(PeerInfo(peer_id, addrs))
        return plans

    def dialed(self, info: PeerInfo, *, ok: bool) -> None:
        """The outcome of dialling a planned ``info``: success clears backoffs, failure extends them."""
        keys = [_peer_key(info.peer_id), *(str(a) for a in info.addrs)]
        if ok:
            for key in keys:
                self._backoff.pop(key, None)
            return
        now = self._clock()
        if len(self._backoff) + len(keys) > MAX_BACKOFF_ENTRIES:
            self._backoff = {k: b for k, b in self._backoff.items() if b.until > now}
            if len(self._backoff) + len(keys) > MAX_BACKOFF_ENTRIES:
                self._backoff.clear()
        for key in keys:
            previous = self._backoff.get(key)
            delay = BACKOFF_S[0] if previous is None else min(BACKOFF_S[1], previous.delay * 2)
            self._backoff[key] = _Backoff(until=now + delay, delay=delay)

    def _backed_off(self, key: str, now: float) -> bool:
        entry = self._backoff.get(key)
        return entry is not None and now < entry.until

    def _expire(self, now: float) -> None:
        for peer_id in [p for p, v in self._providers.items() if now - v.seen >= PROVIDER_TTL_S]:
            del self._providers[peer_id]


# ---------------------------------------------------------------------------------------------- addresses


def dialable(addr: multiaddr.Multiaddr, peer_id: ID, *, allow_private: bool) -> bool:
    """Whether discovery may dial ``addr`` for ``peer_id`` (see the module docstring)."""
    try:
        text = str(addr)
        names = [p.name for p in addr.protocols()]
        if "p2p-circuit" in names:
            relay_part, _, rest = text.partition("/p2p-circuit")
            if rest not in ("", f"/p2p/{peer_id.to_base58()}"):
                return False
            relay = multiaddr.Multiaddr(relay_part)
            if [p.name for p in relay.protocols()] == ["p2p"]:
                return True  # a relay named by peer id only: dialled over an existing connection
            return _direct_ok(relay, None, allow_private)
        return _direct_ok(addr, peer_id, allow_private)
    except Exception:  # malformed: never dial it
        return False


def _direct_ok(addr: multiaddr.Multiaddr, peer_id: ID | None, allow_private: bool) -> bool:
    names = [p.name for p in addr.protocols()]
    if names[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or names[2:] not in ([], ["p2p"]):
        return False
    if peer_id is not None and names[2:] == ["p2p"] and addr.value_for_protocol("p2p") != peer_id.to_base58():
        return False
    return allow_private or _is_global(addr.value_for_protocol(names[0]))


def _direct_ip(addr: multiaddr.Multiaddr) -> str | None:
    """The IP a direct dial to ``addr`` connects to; None for a circuit (the relay is usually connected)."""
    if "/p2p-circuit" in str(addr):
        return None
    for name in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(name))
        except Exception:
            continue
    return None


def _is_global(ip: str | None) -> bool:
    if ip is None:
        return True  # a circuit: its relay address was checked by `dialable`
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def _peer_key(peer_id: ID) -> str:
    return f"peer:{peer_id.to_base58()}"
