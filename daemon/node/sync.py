"""Serving and pulling contributions: the async driver of :mod:`daemon.node.replication`.

Theory of operation
-------------------
Serving (``/meshtrain/sync/1``, ``/meshtrain/snapshot/2``, see ``daemon/node/wire.py``): a peer of this
run (same genesis, not blocked by a partition drill) sends its digest; the answer is what it lacks, at
most ``[sync] max_batch`` records, lowest seqs first, or ``snapshot_required`` when part of it was
compacted here. The bandwidth cap (``daemon/node/limits.py``) paces answers. A request that does not
decode is counted by reason and its sender penalized (:meth:`Sync.reject`).

Spreading this node's own new contributions (pushes, and gossip announcements for members out of their
reach) is daemon/node/spread.py's; receiving a push is served here: a receiver takes a pushed record
through the same door as a pulled one, and only records its sender authored.

Pulling: gossip announcements, the anti-entropy period and pull-backs tell the replication machine whom to
pull from; :meth:`Sync.run` starts the actions it hands out (several peers at once, each in its own task)
and reports every answer back to it. Each answer's records go through the replica's one door
(``Replica.accept``); an equivocation is the author's fault, not the relayer's, so the pull goes on; any
other invalid record ends the pull and counts against the peer that sent it.

Snapshots are attested (``daemon/node/attestation.py``): a node offers its snapshot only with the
checkpoints of a quorum of the run's signers, and adopts a peer's only through ``Replica.adopt``, which
checks that quorum (``crdt.check_attestation``) before the model is touched. The offer is checked before
the file is fetched, as a blob, from every member that offers the same file
(daemon/node/snapshot_install.py, daemon/node/offers.py).
Checkpoints travel on the run's checkpoint topic; a signer countersigns a fellow signer's when it computes
the same state.

All of it runs on the node's event loop; the machine is only touched between awaits, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable

import crdt
import p2p
from daemon.config import SyncConfig
from daemon.node import offers, wire
from daemon.node.limits import Limits
from daemon.node.offers import SnapshotServer
from daemon.node.replica import DiskFull, Replica
from daemon.node.replication import Action, ActionKind, Replication, ReplicationPolicy
from daemon.node.snapshot_install import SnapshotInstaller
from daemon.node.spread import Spreader
from daemon.status import JoinStatus

__all__ = ["Sync"]

log = logging.getLogger(__name__)

# A peer that pulled from us and showed more is pulled back at most this often: enough to stop two nodes
# spinning on each other, short enough that a node does not wait an anti-entropy period (30 s) for
# records a peer just told it about.
PULLBACK_INTERVAL_S = 2.0
#: How often the connected peers are checked for newcomers that are not yet known members (see _meet_loop).
MEET_S = 1.0

Handler = Callable[[str, bytes], Awaitable[bytes]]


class Sync:
    """One node's anti-entropy: answers peers' pulls and pulls from them."""

    def __init__(
        self,
        host: p2p.Host,
        replica: Replica,
        *,
        run: str,
        settings: Callable[[], SyncConfig],
        limits: Limits,
        timing: Callable[[str, float], None],
        join: JoinStatus | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.replica = replica
        self.run_name = run
        self.settings = settings
        """The ``[sync]`` section, re-read at every use (SIGHUP may change it)."""
        self.limits = limits
        self.timing = timing
        self.machine = Replication(self._policy())
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._outbox: asyncio.Queue[crdt.Checkpoint] = asyncio.Queue()  # checkpoints we signed, to publish
        self.members: set[str] = {p2p.peer_id_from_public_key(a) for a in replica.state.version_vector}
        """Peers known to be of this run: authors of our records, and peers that synced with our genesis.
        Gossip authored by anyone else is dropped before it is verified or forwarded (Host's admission)."""
        self._announcements: asyncio.Queue[p2p.GossipMessage] = asyncio.Queue()
        self._checkpoints: asyncio.Queue[p2p.GossipMessage] = asyncio.Queue()
        self.join = join or JoinStatus()
        """Where snapshot downloads show (``status.join``)."""
        self._snapshots: SnapshotServer | None = None  # once installed
        self.spreader = Spreader(host, replica, run=run, members=self.members, settings=settings,
                                 blocked=lambda: self.machine.blocked, reject=self.reject)
        """Pushes and announces this node's own new contributions."""
        self.installer = SnapshotInstaller(host, replica, members=self.members, settings=settings,
                                           reject=self.reject, join=self.join, rng=self._rng)

    def _policy(self) -> ReplicationPolicy:
        """The machine's policy with the ``[sync]`` values in effect (SIGHUP may change them)."""
        sync = self.settings()
        pullback = min(sync.interval_s, PULLBACK_INTERVAL_S)
        current = getattr(self, "machine", None)
        if current is None:
            return ReplicationPolicy(fanout=sync.fanout, pullback_interval_s=pullback)
        return dataclasses.replace(current.policy, fanout=sync.fanout, pullback_interval_s=pullback)

    def pull_from_peers_ahead(self) -> None:
        """Pull now from every connected peer whose last digest showed records we lack, or that we have not
        exchanged digests with yet (a round about to start is waiting; the anti-entropy period alone may be
        30 s away)."""
        ours = self.replica.state.version_vector
        connected = self.host.connected_peers()
        self.machine.set_connected(connected)
        for peer in connected:
            known = self.replica.holdings.get(peer)
            if known is None or not ours.dominates(known):
                self.machine.behind(peer)
        self._wakeup.set()

    def install(self) -> None:
        """Register the request handlers and subscribe to the announcement and checkpoint topics."""
        pace = offers.pace(self.limits.bucket, asyncio.get_running_loop())
        self._snapshots = SnapshotServer(self.host, self.replica.store.path, pace=pace)
        self.host.set_request_handler(wire.SYNC_PROTOCOL, self.counting(self._serve_sync))
        self.host.set_request_handler(wire.SNAPSHOT_PROTOCOL, self.counting(self._serve_snapshot))
        # Kept streams: a member pushes a record every round, and a new stream per push cost 2 % of a small
        # model's bytes (p2p/_kept.py); a push that is sent twice is a duplicate, harmless.
        self.host.set_request_handler(wire.PUSH_PROTOCOL, self.counting(self._serve_push), keep_streams=True)
        # Validated before delivery and before forwarding: junk is dropped and its sender scored down.
        announce = wire.announce_topic(self.run_name)
        self.host.set_topic_validator(announce, wire.valid_gossip(wire.Announcement.decode))
        self._announcements = self.host.subscribe(announce)
        checkpoint = wire.checkpoint_topic(self.run_name)
        self.host.set_topic_validator(checkpoint, wire.valid_gossip(self.replica.attestations.decode))
        self._checkpoints = self.host.subscribe(checkpoint)
        self.replica.on_checkpoint = self._outbox.put_nowait
        self.replica.on_author = self.members.add
        self.host.set_gossip_admission(self.is_member)

    def is_member(self, peer: str) -> bool:
        """Cheap and read-only: asked by the p2p thread for every gossip message's author."""
        return peer in self.members

    # -- refusing input --------------------------------------------------------------------------------

    def reject(self, peer: str, reason: Exception) -> None:
        """Count (by exception type, shown in status), log, and score the sending peer down."""
        self.replica.reject(reason)
        log.warning("rejected input peer=%s reason=%s: %s", peer, type(reason).__name__, reason)
        self.host.penalize(peer)

    def counting(self, handler: Handler) -> Handler:
        """Wrap a request handler: malformed requests are counted and penalized, then re-raised (the
        peer gets a RemoteError naming the reason)."""

        async def guarded(peer: str, data: bytes) -> bytes:
            try:
                return await handler(peer, data)
            except (wire.WireError, crdt.ValidationError) as exc:
                self.reject(peer, exc)
                raise

        return guarded

    # -- serving ---------------------------------------------------------------------------------------

    async def _serve_sync(self, peer: str, data: bytes) -> bytes:
        request = wire.SyncRequest.decode(data)
        self._admit(peer, request.genesis)  # before the digest is decoded: a stranger's costs nothing more
        remote = crdt.Digest.decode(request.digest)
        ours = await self.replica.digest()
        state = self.replica.state
        self.replica.holdings.note_vector(peer, remote.version_vector)
        self._compare(peer, remote, ours)
        plan = crdt.plan_sync(state, remote, max_count=self.settings().max_batch)
        self.machine.served(peer, peer_has_more=plan.remote_has_more, now=time.monotonic())
        self._wakeup.set()
        quorum = self.replica.attestations.newest_quorum()
        newer = bool(quorum) and quorum[0].version_vector.total > request.attested
        response = wire.SyncResponse(
            digest=ours.encode(),
            contributions=tuple(c.encode() for c in plan.send),
            snapshot_required=plan.remote_needs_snapshot,
            checkpoints=tuple(c.encode() for c in quorum) if newer else (),
        ).encode()
        await self.limits.bucket.acquire(len(response))  # the bandwidth cap (no-op when 0)
        return response

    async def _serve_push(self, peer: str, data: bytes) -> bytes:
        push = wire.Push.decode(data)
        contribution = crdt.Contribution.decode(push.contribution)
        self._admit(peer, contribution.genesis_id)
        if p2p.peer_id_from_public_key(contribution.author) != peer:
            raise wire.WireError("a push carries its sender's own contribution only")
        if push.digest:  # as a pull tells: compaction waits by it (sent once per anti-entropy period)
            self.replica.holdings.note_vector(peer, crdt.Digest.decode(push.digest).version_vector)
        await self._accept(contribution)  # DiskFull and ConflictError go back to the sender as errors
        self.replica.counters.pushes_received += 1
        return b""  # the sender learns what we hold from our own pushes and pulls

    async def _serve_snapshot(self, peer: str, data: bytes) -> bytes:
        self._admit(peer, wire.SyncRequest.decode(data).genesis)
        offer = self.replica.attested_snapshot()
        if offer is None:
            raise wire.NoAttestedSnapshot("no snapshot here that a quorum of the run's signers attests")
        path, checkpoints = offer
        assert self._snapshots is not None and self.replica.file_state is not None  # installed; offer held
        ref = await self._snapshots.offer(path, self.replica.file_state[1])
        self.replica.counters.snapshots_served += 1
        return wire.SnapshotOffer(tuple(c.encode() for c in checkpoints), ref).encode()

    def _admit(self, peer: str, genesis: str) -> None:
        """Exchange model data only with peers of this run (same genesis) that no partition drill blocks."""
        ours = self.replica.state.genesis.id
        if genesis != ours:
            raise wire.ForeignRun(f"this node serves genesis {ours[:16]}, not {genesis[:16]}")
        if peer in self.machine.blocked:
            raise wire.Partitioned("partitioned away (fault injection)")
        self.members.add(peer)

    def _compare(self, peer: str, remote: crdt.Digest, ours: crdt.Digest) -> None:
        if self.machine.compared(
            peer,
            same_vector=remote.version_vector == ours.version_vector,
            same_hash=remote.state_hash == ours.state_hash,
        ):
            log.error("state diverged peer=%s state_hash=%s theirs=%s", peer, ours.state_hash[:16],
                      remote.state_hash[:16])

    # -- pulling ---------------------------------------------------------------------------------------

    def set_blocked(self, peers: set[str]) -> None:
        """Fault injection: stop exchanging model data with ``peers`` (empty set: heal)."""
        self.machine.set_blocked(peers)
        log.warning("fault injection: blocked peers=%s", ",".join(sorted(peers)) or "none")

    async def run(self) -> None:
        """Pull until cancelled: announcements, checkpoints, the anti-entropy period and the scheduler."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._announcement_loop(self._announcements), name="announcements")
            tasks.create_task(self._checkpoint_loop(), name="checkpoints")
            tasks.create_task(self._publish_checkpoints(), name="checkpoints-out")
            tasks.create_task(self._anti_entropy_loop(), name="anti-entropy")
            tasks.create_task(self._meet_loop(), name="meet")
            tasks.create_task(self.spreader.run(), name="spread")
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                self.machine.set_connected(self.host.connected_peers())
                for action in self.machine.next_actions(self._covered):
                    tasks.create_task(self._perform(action), name=f"pull-{action.peer[-6:]}")

    async def _announcement_loop(self, queue: asyncio.Queue[p2p.GossipMessage]) -> None:
        while True:
            message = await queue.get()
            if message.from_peer == self.host.peer_id:
                continue
            try:
                announcement = wire.Announcement.decode(message.data)
            except wire.WireError as exc:
                self.reject(message.from_peer, exc)
                continue
            if self.replica.state.version_vector.get(announcement.author) < announcement.seq:
                self.machine.set_connected(self.host.connected_peers())
                author = p2p.peer_id_from_public_key(announcement.author)
                self.machine.announced(author=author, via=message.from_peer)
                self._wakeup.set()

    async def _checkpoint_loop(self) -> None:
        while True:
            message = await self._checkpoints.get()
            if message.from_peer == self.host.peer_id:
                continue
            self._take_checkpoint(message.from_peer, message.data)

    def _take_checkpoint(self, peer: str, data: bytes) -> bool:
        """A checkpoint from gossip or a sync answer: kept (a signer countersigns it); False if junk."""
        try:
            countersigned = self.replica.offer_checkpoint(data)
        except crdt.ValidationError as exc:  # the gossip validator let it through, or a sync answer
            self.reject(peer, exc)
            return False
        if countersigned is not None:
            self._outbox.put_nowait(countersigned)
        return True

    async def _publish_checkpoints(self) -> None:
        topic = wire.checkpoint_topic(self.run_name)
        while True:
            checkpoint = await self._outbox.get()
            try:
                await self.host.publish(topic, checkpoint.encode())
            except p2p.P2PError as exc:  # no mesh peer yet: the next snapshot's checkpoint goes out
                log.info("checkpoint not published error=%s", exc)

    async def _anti_entropy_loop(self) -> None:
        while True:
            # Jitter so that a cluster started together does not pull in lockstep. Re-read: SIGHUP.
            await asyncio.sleep(self.settings().interval_s * self._rng.uniform(0.5, 1.5))
            # Candidates are connected peers, not host.run_peers (DHT membership can lag behind
            # connections); a peer of another run answers ForeignRun once and is not asked again.
            self.machine.policy = self._policy()
            self.machine.set_connected(self.host.connected_peers())
            self.machine.tick(self._rng)
            self._wakeup.set()

    async def _meet_loop(self) -> None:
        """Pull once from each newly connected peer that is not a known member yet: an exchange of digests
        is how two nodes learn they are of one run, and a node pushes its records to members only. Left
        to the anti-entropy period (15-45 s), three of four daemons started together pushed to one
        member only and trained their first six rounds on half of the others' contributions, which came
        later in a burst (bench/convergence, 2026-12-02). A peer of another run answers ForeignRun once."""
        met: set[str] = set()
        while True:
            connected = set(self.host.connected_peers())
            newcomers = connected - met - self.members
            met = connected  # a peer that reconnects is met again
            if newcomers:
                self.machine.set_connected(connected)
                for peer in newcomers:
                    self.machine.behind(peer)
                self._wakeup.set()
            await asyncio.sleep(MEET_S)

    async def _perform(self, action: Action | None) -> None:
        """Carry out one peer's pull (answer after answer, as the machine says), then wake the scheduler."""
        try:
            while action is not None:
                if action.kind is ActionKind.PULL:
                    action = await self._pull_once(action.peer)
                else:
                    try:
                        await self.installer.install_from(action.peer)
                    finally:
                        self.machine.snapshot_done(action.peer)
                    action = None
        finally:
            self._wakeup.set()

    def _covered(self, peer: str, pulling: frozenset[str]) -> bool:
        """Every record ``peer``'s last digest showed beyond ours is also in the last digest of a peer in
        ``pulling`` (see Replication.next_actions). A peer whose digest we never had is not covered."""
        known = self.replica.holdings.get(peer)
        if known is None:
            return False
        reach = self.replica.state.version_vector
        for source in pulling:
            if (held := self.replica.holdings.get(source)) is not None:
                reach = reach.merge(held)
        return reach.dominates(known)

    async def _pull_once(self, peer: str) -> Action | None:
        if not self.replica.can_write():  # a full disk: pull nothing we could not log
            self.machine.failed(peer)
            return None
        state = self.replica.state
        self.replica.counters.pulls += 1
        try:
            attested = self.replica.attestations.attested_vector()
            ours = await self.replica.digest()
            request = wire.SyncRequest(genesis=state.genesis.id, digest=ours.encode(),
                                       attested=attested.total if attested else 0)
            started = time.perf_counter()
            data = await self.host.request(
                peer, wire.SYNC_PROTOCOL, request.encode(), timeout_s=self.settings().request_timeout_s
            )
            self.timing("pull", time.perf_counter() - started)
            response = wire.SyncResponse.decode(data)
            remote = crdt.Digest.decode(response.digest)
        except (p2p.P2PError, wire.WireError, crdt.CrdtError) as exc:
            self.replica.counters.pull_failures += 1
            log.info("pull failed peer=%s error=%s", peer, exc)
            foreign = isinstance(exc, p2p.RemoteError) and exc.error_type == wire.ForeignRun.__name__
            if not isinstance(exc, p2p.P2PError):  # the peer answered garbage, not just failed
                self.reject(peer, exc)
            self.machine.failed(peer, foreign=foreign)
            return None
        self.members.add(peer)  # it answered with our genesis's records
        self.replica.holdings.note_vector(peer, remote.version_vector)
        self._compare(peer, remote, ours)
        if not all(self._take_checkpoint(peer, data) for data in response.checkpoints):
            self.machine.failed(peer)
            return None
        progressed = False
        for encoded in response.contributions:
            try:
                outcome = await self._accept(crdt.Contribution.decode(encoded))
                progressed |= outcome is not crdt.ApplyOutcome.DUPLICATE
            except crdt.ConflictError:
                continue  # the author equivocated (proof kept by the replica); the relayer is not to blame
            except DiskFull:
                self.machine.failed(peer)  # not the peer's fault; the rest comes once there is room
                return None
            except crdt.CrdtError as exc:
                self.reject(peer, exc)
                self.machine.failed(peer)
                return None
        return self.machine.answered(
            peer,
            progressed=progressed,
            behind=not self.replica.state.version_vector.dominates(remote.version_vector),
            snapshot_required=response.snapshot_required,
            records=len(response.contributions),
        )

    async def _accept(self, contribution: crdt.Contribution) -> crdt.ApplyOutcome:
        started = time.perf_counter()
        try:
            return await self.replica.receive(contribution)
        finally:
            self.timing("merge", time.perf_counter() - started)
