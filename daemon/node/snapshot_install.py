"""Installing a peer's attested snapshot: ask for offers, fetch the file from every peer offering it,
adopt it through the replica.

Theory of operation
-------------------
The replication machine (daemon/node/replication.py) decides *when* a snapshot is needed (a peer answered
``snapshot_required`` and nothing else can bring us up to date); :meth:`SnapshotInstaller.install_from`
does it. It asks that peer and up to ``MAX_SNAPSHOT_SOURCES - 1`` other connected members for their
snapshot offer (``/meshtrain/snapshot/2``), keeps the offers of the same file (manifest root), checks the
attestation quorum on the offer before a byte moves (``offers.check_snapshot_offer``), skips a state it
already holds or one whose adoption would drop history we compacted, then fetches the file as a blob from
all of them at once and hands it to ``Replica.adopt`` (which checks the quorum against the stream's header
again). One install runs at a time: downloads share a part file, and the machine may hand out several.

A peer whose offer does not decode, or whose file matched its root but not its attestation, is rejected
(counted and penalized); one that is unreachable or holds no attested snapshot is not hostile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import crdt
import p2p
from daemon.config import SyncConfig
from daemon.node import wire
from daemon.node.offers import Offered, check_snapshot_offer, fetch_snapshot
from daemon.node.replica import Replica
from daemon.status import JoinStatus

__all__ = ["MAX_SNAPSHOT_SOURCES", "SnapshotInstaller"]

log = logging.getLogger(__name__)

MAX_SNAPSHOT_SOURCES = 4  # peers asked for the same snapshot at once: more add little on one link


class SnapshotInstaller:
    """Fetches and adopts attested snapshots for one node (its sync's members, settings and rejections)."""

    def __init__(
        self,
        host: p2p.Host,
        replica: Replica,
        *,
        members: set[str],
        settings: Callable[[], SyncConfig],
        reject: Callable[[str, Exception], None],
        join: JoinStatus,
        rng: random.Random,
    ) -> None:
        self.host = host
        self.replica = replica
        self.members = members
        self.settings = settings
        self.reject = reject
        self.join = join
        self._rng = rng
        self._installing = asyncio.Lock()

    async def install_from(self, peer: str) -> None:
        """Catch up through ``peer``'s attested snapshot, fetched from every peer offering the same file
        (adopted only if a quorum of the run's signers vouches for it and nothing held is lost: see the
        replica)."""
        async with self._installing:  # the machine may hand out several: the next finds it caught up
            offered = await self._snapshot_offers(peer)
            if offered:
                await self._fetch_and_adopt(offered)

    async def _snapshot_offers(self, peer: str) -> Offered:
        """``peer``'s snapshot offer, if attested and of use here, and the same offer from the other
        connected members (a few at most: more sources for the download)."""
        others = [p for p in self.host.connected_peers() if p in self.members and p != peer]
        candidates = [peer, *self._rng.sample(others, min(len(others), MAX_SNAPSHOT_SOURCES - 1))]
        answers = await asyncio.gather(*(self._snapshot_offer(p) for p in candidates))
        first = answers[0]
        if first is None:
            return {}
        root = first[0].ref.root
        pairs = zip(candidates, answers, strict=True)
        return {p: a for p, a in pairs if a is not None and a[0].ref.root == root}

    async def _snapshot_offer(self, peer: str) -> tuple[wire.SnapshotOffer, list[crdt.Checkpoint]] | None:
        replica = self.replica
        request = wire.SyncRequest(genesis=replica.state.genesis.id, digest=b"")
        try:
            data = await self.host.request(
                peer, wire.SNAPSHOT_PROTOCOL, request.encode(), timeout_s=self.settings().request_timeout_s
            )
        except p2p.P2PError as exc:  # unreachable, or it holds no attested snapshot: not hostile
            replica.counters.pull_failures += 1
            log.info("snapshot offer failed peer=%s error=%s", peer, exc)
            return None
        try:
            offer, checkpoints = check_snapshot_offer(data, replica.state, replica.attestations)
        except (wire.WireError, crdt.CrdtError) as exc:
            self.reject(peer, exc)
            return None
        vector = checkpoints[0].version_vector
        if replica.state.version_vector.dominates(vector):
            return None  # caught up meanwhile (another snapshot, or records)
        if not replica.state.can_serve(vector):
            log.info("not fetching the snapshot of peer=%s: it would drop history we compacted", peer)
            return None
        return offer, checkpoints

    async def _fetch_and_adopt(self, offered: Offered) -> None:
        replica = self.replica
        peers = ",".join(offered)
        try:
            snapshot, checkpoints = await fetch_snapshot(self.host, offered, replica.state,
                                                         replica.store.path, join=self.join)
            adopted = await replica.adopt(snapshot, checkpoints)
        except (p2p.P2PError, OSError) as exc:  # each dropped peer's reason is in join.dropped
            replica.counters.pull_failures += 1
            log.info("snapshot download failed peers=%s error=%s", peers, exc)
            return
        except crdt.CrdtError as exc:  # the bytes matched the root they offered: they offered junk
            for peer in offered:
                self.reject(peer, exc)
            return
        if not adopted:
            log.warning("not adopting the snapshot of peers=%s: it would drop history we compacted", peers)
            return
        state = replica.state
        log.info("installed snapshot from peers=%s contributions=%d state_hash=%s", peers,
                 state.contribution_count, state.state_hash[:16])
