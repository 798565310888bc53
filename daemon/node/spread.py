"""Spreading this node's own new contributions: pushed to connected members, announced for the rest.

Theory of operation
-------------------
A new contribution of ours (:meth:`Spreader.announce`, called by the round once it is logged) is pushed to
every connected member (``/meshtrain/push/3``, on a kept stream: the record, and our digest when the
member has not had one from us within the anti-entropy period, so that it knows what we hold as often as
a pull would tell it: compaction waits for members by it, and a node that only receives pushes never
compacted; in every push the digest was about 190 bytes, 1.3 % of a 0.28M-parameter run's bytes, for
news a few seconds fresher than compaction needs. The answer is empty, after which we know the member
holds the record, and the rest of what it holds from its own pushes and pulls), and announced on gossip only
if some member that must hear of it (:attr:`Spreader.must_reach`: heartbeats heard lately,
daemon/node/membership.py) was not reached that way: a member two hops away, a push that failed, a record
too big for one request. In a run whose members are all connected nothing goes through gossip and nobody
pulls: the announcement's gossip (forwarded through the mesh, about three copies per member) and each
pull's request were half of a 4-daemon run's bytes beside its model payloads (bench/convergence,
2026-12-01). Receiving a push is daemon/node/sync.py's.

A push never makes us pull from the member: what it holds beyond us is mostly other authors' pushes to
us, still in flight (pulling on version 1's digest answers made 114 duplicates in a 320-record benchmark
run); anti-entropy and announcements cover the rest. Spreading runs in its own task, one contribution at a
time, so a round never waits on a slow member.

Rejected: sending the record itself on gossip (every member would receive it about three times through
the mesh) and pushing to every connected peer (peers of other runs refuse it; members are the peers that
synced with our genesis or authored our records).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import crdt
import p2p
from daemon.config import SyncConfig
from daemon.node import wire
from daemon.node.replica import Replica

__all__ = ["Spreader"]

log = logging.getLogger(__name__)


class Spreader:
    """Pushes and announces this node's new contributions, in the background."""

    def __init__(
        self,
        host: p2p.Host,
        replica: Replica,
        *,
        run: str,
        members: set[str],
        settings: Callable[[], SyncConfig],
        blocked: Callable[[], frozenset[str]],
        reject: Callable[[str, Exception], None],
    ) -> None:
        self.host = host
        self.replica = replica
        self.run_name = run
        self.members = members
        """Peers known to be of this run (shared with Sync): the only ones pushed to."""
        self.settings = settings
        self.blocked = blocked
        self.reject = reject
        self.must_reach: Callable[[], set[str]] | None = None
        """Members a new contribution must reach (the node sets it to Membership.heard_members); None: every
        contribution is announced on gossip besides its pushes."""
        self._queue: asyncio.Queue[crdt.Contribution] = asyncio.Queue()
        self._digest_sent: dict[str, float] = {}  # member -> when it last took a push with our digest

    async def announce(self, contribution: crdt.Contribution) -> None:
        """Spread a new contribution of ours in the background: the round goes on."""
        self._queue.put_nowait(contribution)

    async def spread(self) -> None:
        """Wait until every contribution handed to :meth:`announce` so far is pushed (and announced if
        need be)."""
        await self._queue.join()

    async def run(self) -> None:
        while True:
            contribution = await self._queue.get()
            try:
                await self._spread(contribution)
            finally:
                self._queue.task_done()

    async def _spread(self, contribution: crdt.Contribution) -> None:
        reached = await self._push(contribution)
        must_reach = self.must_reach() if self.must_reach is not None else None
        if must_reach is not None and must_reach <= reached:
            return
        announcement = wire.Announcement(
            author=contribution.author,
            seq=contribution.seq,
            fragment=contribution.fragment,
            size=len(contribution.payload),
            id=contribution.id,
        )
        try:
            await self.host.publish(wire.announce_topic(self.run_name), announcement.encode())
        except p2p.P2PError as exc:  # no mesh peer: the others pull it in their anti-entropy
            log.info("announcement not published seq=%d error=%s", contribution.seq, exc)
            return
        self.replica.counters.announced += 1

    async def _push(self, contribution: crdt.Contribution) -> set[str]:
        """Send ``contribution`` to every connected member at once; the members that took it. Our digest
        rides along to the members not sent one within the anti-entropy period (hashed only then: at
        100M parameters a fresh state hash is ~1.7 s of a worker thread), if it fits the push."""
        record = contribution.encode()
        without = wire.Push(b"", record).encode()
        if len(without) > wire.MAX_PUSH_BYTES:
            return set()
        reached: set[str] = set()
        now, period = time.monotonic(), self.settings().interval_s
        targets = (set(self.host.connected_peers()) & self.members) - self.blocked() - {self.host.peer_id}
        self._digest_sent = {p: t for p, t in self._digest_sent.items() if p in targets}  # bounded
        due = {p for p in targets if now - self._digest_sent.get(p, -math.inf) >= period}
        with_digest = without
        if due:
            encoded = wire.Push((await self.replica.digest()).encode(), record).encode()
            with_digest = encoded if len(encoded) <= wire.MAX_PUSH_BYTES else without

        async def push(peer: str) -> None:
            data = with_digest if peer in due else without
            try:
                answer = await self.host.request(peer, wire.PUSH_PROTOCOL, data, keep_stream=True,
                                                 timeout_s=self.settings().request_timeout_s)
            except p2p.P2PError as exc:
                log.info("push failed peer=%s seq=%d error=%s", peer, contribution.seq, exc)
                return
            if answer:
                self.reject(peer, wire.WireError("a push is answered with nothing"))
                return
            if data is not without:
                self._digest_sent[peer] = now
            reached.add(peer)
            self.replica.counters.pushed += 1
            self.replica.holdings.note_holds(peer, contribution)

        async with asyncio.TaskGroup() as tasks:
            for peer in targets:
                tasks.create_task(push(peer))
        return reached
