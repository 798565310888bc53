"""Run-scoped peer discovery over the Kademlia DHT (trio side).

Theory of operation
-------------------
Every node of a training run derives the same DHT key from the run id (a sha2-256 multihash of
``"meshtrain/run/<run_id>"``), announces itself as a *provider* of that key, and periodically asks the DHT
for the key's providers and dials some of the ones it is not connected to: what answers can make us dial
is bounded (per answer, per round, by address range, by age, with backoff) by the `ProviderBook`
(p2p/_providers.py), and only the addresses it picked are dialled (not whatever libp2p's peerstore
collected for that peer). A node needs only one reachable
bootstrap peer: the bootstrap peer's routing table points the newcomer at the rest, and the newcomer's
provider record lands on the peers closest to the key. Each round also re-announces (provider records
expire, peers come and go) and feeds every connected peer into the routing table, because py-libp2p 0.8.1
only adds peers to the table on *inbound* DHT requests, not on outbound connections.

Note: DHT queries themselves dial peers (the closest ones to a key), so a node also ends up connected to
DHT neighbours of *other* runs that share a bootstrap peer. `connected_peers()` is therefore not run
membership; `Host.run_peers()` (providers of our run key that are connected now) is.

The loop is one task in the node's nursery: it owns the KadDHT service (server mode, random walk off, no
persistence) and stops with the Host. Failures of one round (no peers yet, a provider that went away) are
expected and only counted; the round is retried after the base interval.

Pacing (`DiscoveryPace`, sans-IO): rounds run every ``discovery_interval_s`` while the run's view changes
(a dial succeeded, the known or connected members changed, a round failed, or no member is connected),
and the wait doubles up to ``discovery_max_interval_s`` while it is settled. At a fixed 10 s the DHT was
the second-largest cost of a 4-daemon training run on the wire (366 KB of Kademlia messages per 40
contributions, beside 566 KB of model payloads; bench/convergence, 2026-12-01). Newcomers are not slowed
by a settled mesh: a joiner dials its bootstrap peer and runs its own rounds at the base interval, and a
member lost snaps the others back to it.

Rejected alternatives: rendezvous (needs a designated rendezvous server: a single point of failure);
mDNS (LAN only, multicasts on every interface, callback on a zeroconf thread); gossip-based peer exchange
alone (needs a mesh first, which is what we are trying to build).
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import suppress
from typing import TYPE_CHECKING

import multihash
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from p2p._errors import P2PError
from p2p._providers import ProviderBook

if TYPE_CHECKING:
    from p2p._node import TrioNode

__all__ = ["DiscoveryPace", "DiscoveryStats", "run_discovery", "run_key"]

log = logging.getLogger(__name__)

PEER_QUERY_TIMEOUT_S = 5.0  # ADD_PROVIDER + GET_PROVIDERS to one connected peer (LAN: ~50 ms, notes §3)
PROVIDE_WALK_TIMEOUT_S = 30.0  # libp2p's background provide walk (its own per-peer timeout is 10 s)
# The walk dials the closest peers that *other peers* name (bounded by the DHT's k per walk), so it runs
# rarely: provider records live for hours, and ADD_PROVIDER to every connected peer happens every round.
PROVIDE_WALK_INTERVAL_S = 300.0
ROUND_TIMEOUT_S = 60.0  # backstop for a whole round: queries (5 s) + parallel dials (dial timeouts)


class DiscoveryStats:
    """Counters written by the discovery task only (trio thread)."""

    __slots__ = (
        "dials_failed",
        "dials_ok",
        "providing",
        "refused_addrs",
        "refused_providers",
        "round_errors",
        "rounds",
        "run_peers",
    )

    def __init__(self) -> None:
        self.rounds = 0
        self.round_errors = 0
        self.dials_ok = 0
        self.dials_failed = 0
        self.refused_addrs = 0  # provider addresses not dialable (private ranges, other kinds)
        self.refused_providers = 0  # new providers over the per-answer bound
        # Peer ids (base58) of the providers of our run key seen recently (p2p/_providers.py). Replaced
        # (never mutated) by the trio thread, so the asyncio side can read it without a lock.
        self.run_peers: frozenset[str] = frozenset()
        self.providing = False  # a background provide walk is running

    def as_dict(self) -> dict[str, int]:
        skip = ("run_peers", "providing")
        return {f"discovery_{name}": getattr(self, name) for name in self.__slots__ if name not in skip}


class DiscoveryPace:
    """How long discovery waits after a round: ``base_s`` while the run's view changes, doubling to
    ``max_s`` while it is settled (the module docstring says why)."""

    def __init__(self, base_s: float, max_s: float) -> None:
        if not 0 < base_s <= max_s:
            raise ValueError(f"need 0 < base_s <= max_s, got {base_s} and {max_s}")
        self.base_s, self.max_s = base_s, max_s
        self.wait_s = base_s
        self._view: tuple[frozenset[str], frozenset[str]] | None = None

    def after_round(
        self, *, known: frozenset[str], connected: frozenset[str], dialed: int, failed: bool
    ) -> float:
        """The wait before the next round. ``known``: the run's members discovery knows of; ``connected``:
        those connected now; ``dialed``: connections this round made; ``failed``: the round raised."""
        view = (known, connected)
        settled = not failed and not dialed and bool(connected) and view == self._view
        self._view = view
        self.wait_s = min(self.max_s, 2 * self.wait_s) if settled else self.base_s
        return self.wait_s


def run_key(run_id: str) -> str:
    """The DHT provider key of a run: hex of the sha2-256 multihash of ``meshtrain/run/<run_id>``."""
    digest = hashlib.sha256(f"meshtrain/run/{run_id}".encode()).digest()
    return multihash.encode(digest, "sha2-256").hex()


async def run_discovery(
    node: TrioNode,
    *,
    run_id: str | None,
    bootstrap: tuple[str, ...],
    pace: DiscoveryPace,
    stats: DiscoveryStats,
    allow_private: bool,
) -> None:
    """Connect to ``bootstrap`` and, if ``run_id`` is set, find and dial the run's other peers forever.

    ``allow_private``: dial addresses in private/loopback ranges that peers announce (p2p/_providers.py).
    """
    host = node.host
    dht = KadDHT(host, DHTMode.SERVER, enable_random_walk=False) if run_id is not None else None
    key = run_key(run_id) if run_id is not None else ""
    bootstrap_ids = {_peer_of(addr) for addr in bootstrap}
    book = ProviderBook(allow_private=allow_private)
    last_walk = -PROVIDE_WALK_INTERVAL_S
    async with trio.open_nursery() as nursery:
        if dht is not None:
            await nursery.start(_run_service, dht)
        while True:
            stats.rounds += 1
            dials_before, failed = stats.dials_ok, False
            connected = set(node.connected_peers())
            if not connected & bootstrap_ids:
                for addr in bootstrap:
                    await _dial(node, addr, stats)
            if dht is not None:
                due = trio.current_time() - last_walk >= PROVIDE_WALK_INTERVAL_S
                if due and not stats.providing and node.host.get_connected_peers():
                    stats.providing = True
                    last_walk = trio.current_time()
                    nursery.start_soon(_provide_walk, dht, key, stats)
                try:
                    with trio.fail_after(ROUND_TIMEOUT_S):  # a backstop: each step has its own bound
                        await _dht_round(node, dht, key, stats, book)
                except Exception as exc:  # TooSlowError or libp2p errors: a bad round must not end discovery
                    stats.round_errors += 1
                    failed = True
                    log.debug("discovery round failed run=%s error=%r", run_id, exc)
            members = stats.run_peers if dht is not None else bootstrap_ids
            await trio.sleep(pace.after_round(
                known=frozenset(members), connected=frozenset(members & set(node.connected_peers())),
                dialed=stats.dials_ok - dials_before, failed=failed,
            ))


async def _run_service(dht: KadDHT, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with background_trio_service(dht):
        task_status.started()
        await trio.sleep_forever()


async def _dht_round(
    node: TrioNode, dht: KadDHT, key: str, stats: DiscoveryStats, book: ProviderBook
) -> None:
    """Announce, ask, dial: each step bounded on its own, so one unreachable peer cannot eat the round.

    Why not just ``dht.provide()`` + ``dht.find_providers()`` (py-libp2p 0.8.1, see tests/p2p/test_nat.py):

    * ``find_providers`` answers from the *local* provider store when it holds any record, and
      ``provide`` always stores our own record there first: so after our first announcement it returns
      only ourselves and never asks the network. Peers that could not reach us to store their record
      (behind NAT) stay invisible forever.
    * ``provide`` first walks to the closest peers of the key and dials each one it learns of, including
      NATed peers at their private addresses; a dropped SYN holds the walk for the library's 10 s
      ``QUERY_TIMEOUT``, which used to be our whole round budget (every round timed out half-way).

    So: ADD_PROVIDER straight to every connected peer (the bootstrap node is one, and it serves
    GET_PROVIDERS), the full network ``provide`` walk in the background (bounded, one at a time, rarely),
    GET_PROVIDERS to every connected peer in parallel (each bounded), then dial what the provider book
    plans (p2p/_providers.py) in parallel.
    """
    me = node.host.get_id()
    store = dht.provider_store
    connected = [p for p in node.host.get_connected_peers() if p != me]
    for peer in connected:
        await dht.add_peer(peer)
    raw_key = bytes.fromhex(key)
    book.observe(me, [i for i in store.get_providers(raw_key) if i.peer_id != me])  # stored on us

    async def ask(peer: ID) -> None:
        with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
            with suppress(Exception):  # a peer without the DHT protocol, or gone: nothing from it
                await store._send_add_provider(peer, raw_key)
            try:
                providers, _closer = await store._get_providers_from_peer_with_closers(peer, raw_key)
            except Exception as exc:
                log.debug("get_providers failed peer=%s error=%r", peer, exc)
                return
            book.observe(peer, [i for i in providers if i.peer_id != me])

    async with trio.open_nursery() as nursery:
        for peer in connected:
            nursery.start_soon(ask, peer)
    stats.run_peers = book.members()
    stats.refused_addrs, stats.refused_providers = book.refused_addrs, book.refused_providers
    todo = book.plan(connected=set(node.host.get_connected_peers()), relay_fallback=node.nat is not None)

    async def dial(info: PeerInfo) -> None:
        try:
            await node.dial_peer_info(info)  # relayed first when it advertises circuits (p2p/_node.py)
        except Exception as exc:  # stale provider record or unreachable peer: backed off, retried later
            stats.dials_failed += 1
            book.dialed(info, ok=False)
            log.debug("discovery dial failed peer=%s error=%r", info.peer_id, exc)
        else:
            stats.dials_ok += 1
            book.dialed(info, ok=True)
            log.info("discovered peer=%s", info.peer_id)

    async with trio.open_nursery() as nursery:
        for info in todo:
            nursery.start_soon(dial, info)


async def _provide_walk(dht: KadDHT, key: str, stats: DiscoveryStats) -> None:
    """libp2p's full provide (closest-peer walk, then ADD_PROVIDER), bounded; never two at once."""
    try:
        with trio.move_on_after(PROVIDE_WALK_TIMEOUT_S):
            await dht.provide(key)
    except Exception as exc:
        log.debug("provide walk failed error=%r", exc)
    finally:
        stats.providing = False


async def _dial(node: TrioNode, addr: str, stats: DiscoveryStats) -> None:
    try:
        await node.connect(addr)
    except (P2PError, ValueError) as exc:
        stats.dials_failed += 1
        log.debug("bootstrap dial failed addr=%s error=%r", addr, exc)
    else:
        stats.dials_ok += 1


def _peer_of(addr: str) -> str:
    peer = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else ""
    if not peer:
        raise ValueError(f"bootstrap address needs a /p2p/<peer id> suffix: {addr!r}")
    return peer
