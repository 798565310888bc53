"""Run-scoped peer discovery over the Kademlia DHT (trio side).

Theory of operation
-------------------
Every node of a training run derives the same DHT key from the run id (a sha2-256 multihash of
``"meshtrain/run/<run_id>"``), announces itself as a *provider* of that key, and periodically asks the DHT
for the key's providers and dials the ones it is not connected to. A node needs only one reachable
bootstrap peer: the bootstrap peer's routing table points the newcomer at the rest, and the newcomer's
provider record lands on the peers closest to the key. Each round also re-announces (provider records
expire, peers come and go) and feeds every connected peer into the routing table, because py-libp2p 0.8.1
only adds peers to the table on *inbound* DHT requests, not on outbound connections.

Note: DHT queries themselves dial peers (the closest ones to a key), so a node also ends up connected to
DHT neighbours of *other* runs that share a bootstrap peer. `connected_peers()` is therefore not run
membership; `Host.run_peers()` (providers of our run key that are connected now) is.

The loop is one task in the node's nursery: it owns the KadDHT service (server mode, random walk off, no
persistence) and stops with the Host. Failures of one round (no peers yet, a provider that went away) are
expected and only counted; the round is retried after `interval_s`.

Rejected alternatives: rendezvous (needs a designated rendezvous server: a single point of failure);
mDNS (LAN only, multicasts on every interface, callback on a zeroconf thread); gossip-based peer exchange
alone (needs a mesh first, which is what we are trying to build).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import multihash
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from p2p._errors import P2PError

if TYPE_CHECKING:
    from p2p._node import TrioNode

__all__ = ["DiscoveryStats", "run_discovery", "run_key"]

log = logging.getLogger(__name__)

MAX_PROVIDERS_PER_ROUND = 64  # a training run has tens of peers; the DHT returns duplicates anyway
DHT_QUERY_TIMEOUT_S = 10.0  # one provide/find round on a LAN takes ~50 ms (notes §3); WAN is slower


class DiscoveryStats:
    """Counters written by the discovery task only (trio thread)."""

    __slots__ = ("dials_failed", "dials_ok", "round_errors", "rounds", "run_peers")

    def __init__(self) -> None:
        self.rounds = 0
        self.round_errors = 0
        self.dials_ok = 0
        self.dials_failed = 0
        # Peer ids (base58) seen as providers of our run key. Replaced (never mutated) by the trio thread,
        # so the asyncio side can read it without a lock.
        self.run_peers: frozenset[str] = frozenset()

    def as_dict(self) -> dict[str, int]:
        return {f"discovery_{name}": getattr(self, name) for name in self.__slots__ if name != "run_peers"}


def run_key(run_id: str) -> str:
    """The DHT provider key of a run: hex of the sha2-256 multihash of ``meshtrain/run/<run_id>``."""
    digest = hashlib.sha256(f"meshtrain/run/{run_id}".encode()).digest()
    return multihash.encode(digest, "sha2-256").hex()


async def run_discovery(
    node: TrioNode,
    *,
    run_id: str | None,
    bootstrap: tuple[str, ...],
    interval_s: float,
    stats: DiscoveryStats,
) -> None:
    """Connect to ``bootstrap`` and, if ``run_id`` is set, find and dial the run's other peers forever."""
    host = node.host
    dht = KadDHT(host, DHTMode.SERVER, enable_random_walk=False) if run_id is not None else None
    key = run_key(run_id) if run_id is not None else ""
    bootstrap_ids = {_peer_of(addr) for addr in bootstrap}
    async with trio.open_nursery() as nursery:
        if dht is not None:
            await nursery.start(_run_service, dht)
        while True:
            stats.rounds += 1
            connected = set(node.connected_peers())
            if not connected & bootstrap_ids:
                for addr in bootstrap:
                    await _dial(node, addr, stats)
            if dht is not None:
                try:
                    with trio.fail_after(DHT_QUERY_TIMEOUT_S):
                        await _dht_round(node, dht, key, stats)
                except Exception as exc:  # TooSlowError or libp2p errors: a bad round must not end discovery
                    stats.round_errors += 1
                    log.debug("discovery round failed run=%s error=%r", run_id, exc)
            await trio.sleep(interval_s)


async def _run_service(dht: KadDHT, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with background_trio_service(dht):
        task_status.started()
        await trio.sleep_forever()


async def _dht_round(node: TrioNode, dht: KadDHT, key: str, stats: DiscoveryStats) -> None:
    me = node.host.get_id()
    for peer in node.host.get_connected_peers():
        await dht.add_peer(peer)
    await dht.provide(key)
    providers = await dht.find_providers(key, MAX_PROVIDERS_PER_ROUND)
    seen: set[ID] = set()
    connected = set(node.host.get_connected_peers())
    stats.run_peers = stats.run_peers | {p.peer_id.to_base58() for p in providers if p.peer_id != me}
    for info in providers:  # the DHT returns the same provider several times: dedupe by peer id
        if info.peer_id in seen or info.peer_id == me or info.peer_id in connected:
            continue
        seen.add(info.peer_id)
        if not info.addrs and node.nat is None:  # with NAT traversal on, a relay may still reach it
            continue
        try:
            await node.dial_peer_info(info)  # direct addrs, then /p2p-circuit ones (p2p/_nat.py)
        except Exception as exc:  # stale provider record or unreachable peer: try again next round
            stats.dials_failed += 1
            log.debug("discovery dial failed peer=%s error=%r", info.peer_id, exc)
        else:
            stats.dials_ok += 1
            log.info("discovered peer=%s", info.peer_id)


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
