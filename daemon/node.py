"""One meshtrain node: the libp2p host, the CRDT model state, its log, and the training process, composed.

Theory of operation
-------------------
The model is ``genesis + sum of contributions`` (see ``crdt``). A node grows it two ways:

* **Locally**: the training loop takes the merged parameters, runs one DiLoCo round in the child process,
  and turns the encoded update into a signed contribution with the next sequence number of this node's
  slot. The contribution is logged (fsync) before it is announced, so nothing acknowledged is lost.
* **From peers**: a gossip announcement of a contribution this node lacks triggers a pull from the
  announcer; a periodic anti-entropy pull from each connected peer repairs anything gossip dropped. Pulls
  send this node's digest (version vector) and receive exactly the missing contributions.

Every accepted contribution, local or remote, goes through one path (:meth:`Node._accept`, then
:meth:`daemon.replica.Replica.accept`): validate, apply to the state, append to the log. Order does not
matter: the state is an exact integer sum.

Founding and joining: a node without bootstrap peers and without a stored genesis founds the run with its
task's freshly initialized parameters. A node with bootstrap peers fetches the genesis from them by
request and trusts it by content (every later contribution is checked against it).

Concurrency: everything here runs on the asyncio loop. The p2p host runs its trio thread behind its
facade; the trainer is a child process. Background tasks live in one ``asyncio.TaskGroup``; one of them
failing stops the node (no task without an owner, no log-and-continue).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crdt
import p2p
from daemon import security, wire
from daemon.config import Config
from daemon.home import Home
from daemon.ratelimit import Limits
from daemon.replica import Replica
from daemon.store import Store
from daemon.trainer_process import TrainerProcess, TrainerSpec

__all__ = ["Node", "NodeError"]

log = logging.getLogger(__name__)

GENESIS_RETRY_S = 1.0
HEARTBEAT_S = 5  # period of the per-run heartbeat gossip with up to HEARTBEAT_PEERS peers
HEARTBEAT_PEERS = 5  # beyond, the period grows with the peer count (see _heartbeat_loop)
GOODBYE_TIMEOUT_S = 1.0  # bound on the last heartbeat during shutdown (the drain has its own bound)
HISTORY_LIMIT = 10_000  # per-round telemetry records kept in memory for status and plots


class NodeError(RuntimeError):
    """The node cannot start or continue (bad genesis, wrong run, store failure)."""


@dataclass
class RoundRecord:
    round: int
    time_s: float
    train_loss: float
    update_norm: float
    density: float
    payload_bytes: int
    contributions: int
    bytes_sent: int
    bytes_received: int
    staleness: int
    """Contributions of others merged while this round trained (against an older base)."""
    weight: float
    """Weight signed into the contribution (staleness down-weighting)."""
    residual_norm: float
    """L2 norm of the error-feedback residual carried to the next round."""
    round_s: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_bpb: float | None = None


@dataclass
class Counters:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    pulls: int = 0
    pull_failures: int = 0
    stale_rounds_skipped: int = 0
    snapshots_served: int = 0
    equivocations: int = 0


class Node:
    def __init__(self, home: Home, config: Config) -> None:
        self.home = home
        self.config = config
        self.identity = p2p.load_or_create_identity(home.identity_file)
        self.signer = crdt.Signer.from_seed(self.identity.seed)
        self.store = Store(home.store_dir)
        self.host = p2p.Host(
            self.identity,
            listen_addrs=list(config.node.listen),
            bootstrap=config.node.bootstrap,
            run_id=config.node.run,
            config=dataclasses.replace(  # NAT traversal knobs from [node] (p2p/_nat.py, daemon/doctor.py)
                security.host_config(home.path, config.node),
                autonat=config.node.autonat,
                autonat_confirmations=config.node.autonat_confirmations,
                relay_service=config.node.relay_service,
                use_relays=config.node.use_relays,
                hole_punch=config.node.hole_punch,
                mdns=config.node.mdns,
            ),
        )
        self.replica: Replica | None = None
        self.trainer: TrainerProcess | None = None
        self.training_state = "starting"
        self.started_at = time.time()
        self.history: list[RoundRecord] = []
        self.last_eval: dict[str, Any] = {}
        self.initial_eval: dict[str, Any] = {}
        self.counters = Counters()
        self.suspects: security.SuspectTracker | None = None
        """Per-author update statistics; status names outliers (report only, see daemon/security.py)."""
        self.equivocators: dict[str, set[int]] = {}
        """Authors caught signing two records for one seq, with those seqs (proofs in the store)."""
        self.diverged_from: set[str] = set()
        """Peers last seen holding our version vector but another state hash (see _compare_state)."""
        self.limits = Limits(
            threads=config.training.threads, bandwidth_bytes_per_s=config.limits.bandwidth_bytes_per_s
        )
        self.on_timing: Callable[[str, float], None] = lambda name, seconds: None
        """Hook for metrics: called with ("merge" | "pull" | "round", seconds)."""
        self._resume = asyncio.Event()
        self._resume.set()
        self._round_limit_override: int | None = None  # set by `train start`: rounds to stop at, 0 = never
        self._state_changed = asyncio.Event()  # model changed or training started: wakes the idle loop
        self._genesis_ready = asyncio.Event()
        self._pull_wanted: dict[str, None] = {}  # peers to pull from soon, insertion-ordered set
        self._pull_wakeup = asyncio.Event()
        self._pulled_back: dict[str, float] = {}  # when a peer's sync request last triggered a pull back
        self._foreign_peers: set[str] = set()  # connected peers that serve another genesis
        self.peer_heartbeats: dict[str, tuple[float, wire.Heartbeat]] = {}  # latest per peer, with arrival
        self.blocked_peers: set[str] = set()
        """Fault injection: peers this node exchanges no model data with (a network partition)."""

    @property
    def state(self) -> crdt.ModelState | None:
        """The model state (None until loaded); the replica may replace it when adopting a snapshot."""
        return self.replica.state if self.replica is not None else None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def run(self, *, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run until cancelled. ``on_ready`` is awaited once the node serves its model."""
        await self.host.start()
        try:
            self.host.set_request_handler(wire.GENESIS_PROTOCOL, self._serve_genesis)
            sync_handler = security.counting(self._serve_sync, self._reject)
            self.host.set_request_handler(wire.SYNC_PROTOCOL, sync_handler)
            self.host.set_request_handler(wire.SNAPSHOT_PROTOCOL, self._serve_snapshot)
            self.host.set_request_handler(
                wire.GOODBYE_PROTOCOL, security.counting(self._serve_goodbye, self._reject)
            )
            run = self.config.node.run
            # Validated before delivery and before forwarding: junk is dropped and its sender scored down.
            self.host.set_topic_validator(
                wire.announce_topic(run), wire.valid_gossip(wire.Announcement.decode)
            )
            self.host.set_topic_validator(wire.heartbeat_topic(run), wire.valid_gossip(wire.Heartbeat.decode))
            announcements = self.host.subscribe(wire.announce_topic(run))
            heartbeats = self.host.subscribe(wire.heartbeat_topic(run))
            self._start_trainer_spec()
            async with asyncio.TaskGroup() as tasks:
                await self._load_state()
                if on_ready is not None:
                    await on_ready()
                tasks.create_task(self._announcement_loop(announcements), name="announcements")
                tasks.create_task(self._pull_loop(), name="pull")
                tasks.create_task(self._anti_entropy_loop(), name="anti-entropy")
                tasks.create_task(self._heartbeat_loop(), name="heartbeat")
                tasks.create_task(self._heartbeat_listener(heartbeats), name="heartbeats")
                if self.trainer is not None:
                    tasks.create_task(self._training_loop(), name="training")
                    tasks.create_task(self.limits.run(self.trainer), name="limits")
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        # Fixed order: stop compute, make the log durable, then say goodbye and leave the mesh.
        if self.trainer is not None:
            await self.trainer.aclose()
        self.store.close()
        await self._say_goodbye()
        await self.host.aclose()

    def _start_trainer_spec(self) -> None:
        training = self.config.training
        shard = training.shard
        if shard < 0:
            shard = int.from_bytes(self.signer.public_key[:4], "big") % training.num_shards
        self.trainer = TrainerProcess(
            TrainerSpec(
                task=training.task,
                diloco=dict(self.config.diloco),
                shard=shard,
                num_shards=training.num_shards,
                threads=training.threads,
                state_file=self.home.trainer_state_file,
            )
        )
        self.shard = shard

    # -- genesis and recovery -------------------------------------------------------------------------

    async def _load_state(self) -> None:
        assert self.trainer is not None
        self.training_state = "loading"
        await self.trainer.start()
        genesis, snapshot, logged = self.store.load()
        if genesis is None:
            genesis = await self._found_or_fetch_genesis()
            self.store.write_genesis(genesis)
        if genesis.meta.get("run") != self.config.node.run:
            raise NodeError(
                f"stored genesis belongs to run {genesis.meta.get('run')!r}, config says "
                f"{self.config.node.run!r}; use another --home"
            )
        if _ranges(genesis.fragments) != _ranges(await self.trainer.fragment_ranges()):
            raise NodeError(
                f"the run's genesis splits the model into {len(genesis.fragments)} fragments, this node's "
                "[diloco] num_fragments (or its task's model) differs"
            )
        state = crdt.ModelState.from_snapshot(genesis, snapshot, log=logged)
        self.replica = Replica(self.store, state, snapshot_every=self.config.sync.snapshot_every)
        for first, _ in self.store.load_equivocations():
            self.equivocators.setdefault(p2p.peer_id_from_public_key(first.author), set()).add(first.seq)
        self._genesis_ready.set()
        log.info(
            "model state loaded genesis=%s contributions=%d state_hash=%s",
            genesis.id[:16],
            state.contribution_count,
            state.state_hash[:16],
        )
        self.training_state = "running" if self.config.training.enabled else "disabled"

    async def _found_or_fetch_genesis(self) -> crdt.Genesis:
        run = self.config.node.run
        if not self.config.node.bootstrap:
            assert self.trainer is not None
            params = await self.trainer.initial_params()
            fragments = await self.trainer.fragment_ranges()
            genesis = crdt.Genesis(
                params=params,
                fragments=tuple(fragments),
                meta={"run": run, "task": self.config.training.task}
                | ({"clip_norm": repr(self.config.node.clip_norm)} if self.config.node.clip_norm else {}),
            )
            log.info(
                "founded run=%s genesis=%s params=%d clip_norm=%s",
                run,
                genesis.id[:16],
                params.size,
                genesis.meta.get("clip_norm", "off"),
            )
            return genesis
        self.training_state = "fetching-genesis"
        request = wire.GenesisRequest(run=run).encode()
        while True:
            for peer in self.host.connected_peers():
                try:
                    data = await self.host.request(
                        peer, wire.GENESIS_PROTOCOL, request, timeout_s=self.config.sync.request_timeout_s
                    )
                    genesis = crdt.Genesis.decode(data)
                except (p2p.P2PError, crdt.CrdtError) as exc:
                    log.warning("genesis fetch failed peer=%s error=%s", peer, exc)
                    continue
                if genesis.meta.get("task") != self.config.training.task:
                    raise NodeError(
                        f"run {run!r} trains task {genesis.meta.get('task')!r}, this node is configured "
                        f"for {self.config.training.task!r}"
                    )
                log.info("fetched genesis=%s from peer=%s", genesis.id[:16], peer)
                return genesis
            await asyncio.sleep(GENESIS_RETRY_S)

    # -- accepting contributions ----------------------------------------------------------------------

    def _accept(self, contribution: crdt.Contribution) -> crdt.ApplyOutcome:
        """The one path by which a contribution enters this node (see daemon/replica.py)."""
        assert self.replica is not None
        started = time.perf_counter()
        outcome = self.replica.accept(contribution)
        self.on_timing("merge", time.perf_counter() - started)
        if outcome is crdt.ApplyOutcome.DUPLICATE:
            self.counters.duplicates += 1
            return outcome
        self.counters.accepted += 1
        self.suspects = security.observe(self.suspects, self.replica.state.genesis, contribution)
        self._state_changed.set()
        return outcome

    def _note_equivocation(self, conflict: crdt.ConflictError) -> None:
        """Two validly signed records for one (author, seq): the author's fault, not the fault of the peer
        that relayed the second one. Keep both as a proof and name the author; the first one stays."""
        first, second = conflict.evidence
        assert isinstance(first, crdt.Contribution) and isinstance(second, crdt.Contribution)
        author = p2p.peer_id_from_public_key(first.author)
        seqs = self.equivocators.setdefault(author, set())
        if first.seq in seqs:
            return
        seqs.add(first.seq)
        self.counters.equivocations += 1
        proof = self.store.write_equivocation(first, second)
        log.error("author equivocated author=%s seq=%d proof=%s", author, first.seq, proof)

    def _compare_state(self, peer: str, remote: crdt.Digest) -> None:
        """Same version vector but another state hash: the two replicas hold different records for some
        slot (an author equivocated and each of us kept a different version) or one store is corrupt.
        Anti-entropy cannot repair that (it ships only what a vector lacks), so it is reported."""
        assert self.state is not None
        if remote.version_vector != self.state.version_vector:
            return
        if remote.state_hash == self.state.state_hash:
            self.diverged_from.discard(peer)
        elif peer not in self.diverged_from:
            self.diverged_from.add(peer)
            log.error("state diverged peer=%s state_hash=%s theirs=%s", peer, self.state.state_hash[:16],
                      remote.state_hash[:16])

    def _reject(self, peer: str, reason: Exception) -> None:
        """Count (by exception type, shown in status), log, and score the sending peer down."""
        key = type(reason).__name__
        self.counters.rejected += 1
        self.counters.rejected_reasons[key] = self.counters.rejected_reasons.get(key, 0) + 1
        log.warning("rejected input peer=%s reason=%s: %s", peer, key, reason)
        self.host.penalize(peer)

    # -- serving peers --------------------------------------------------------------------------------

    async def _serve_genesis(self, peer: str, data: bytes) -> bytes:
        request = wire.GenesisRequest.decode(data)
        if request.run != self.config.node.run:
            raise wire.ForeignRun(f"this node serves run {self.config.node.run!r}, not {request.run!r}")
        await self._genesis_ready.wait()
        assert self.state is not None
        return self.state.genesis.encode()

    async def _serve_sync(self, peer: str, data: bytes) -> bytes:
        request = wire.SyncRequest.decode(data)
        remote = crdt.Digest.decode(request.digest)
        await self._admit(peer, request)
        assert self.replica is not None and self.state is not None
        self.replica.note_vector(peer, remote.version_vector)
        self._compare_state(peer, remote)
        plan = crdt.plan_sync(self.state, remote, max_count=self.config.sync.max_batch)
        if (
            plan.remote_has_more
            and time.monotonic() - self._pulled_back.get(peer, 0.0) > self.config.sync.interval_s
        ):
            # The requester has something we lack: pull it back soon (push-pull without a push protocol).
            # At most once a period per peer: two nodes that cannot serve each other (see
            # _install_snapshot_from) must not ping-pong pulls.
            self._pulled_back[peer] = time.monotonic()
            self._want_pull(peer)
        response = wire.SyncResponse(
            digest=self._digest().encode(),
            contributions=tuple(c.encode() for c in plan.send),
            snapshot_required=plan.remote_needs_snapshot,
        ).encode()
        await self.limits.bucket.acquire(len(response))  # the bandwidth cap (no-op when 0)
        return response

    async def _serve_snapshot(self, peer: str, data: bytes) -> bytes:
        await self._admit(peer, wire.SyncRequest.decode(data))
        assert self.state is not None
        self.counters.snapshots_served += 1
        response = self.state.snapshot().encode()
        await self.limits.bucket.acquire(len(response))
        return response

    async def _admit(self, peer: str, request: wire.SyncRequest) -> None:
        """Serve model data only to peers of this run (same genesis) that no partition drill blocks."""
        await self._genesis_ready.wait()
        assert self.state is not None
        if request.genesis != self.state.genesis.id:
            raise wire.ForeignRun(
                f"this node serves genesis {self.state.genesis.id[:16]}, not {request.genesis[:16]}"
            )
        if peer in self.blocked_peers:
            raise wire.Partitioned("partitioned away (fault injection)")

    def _digest(self) -> crdt.Digest:
        assert self.state is not None
        return self.state.digest()

    # -- pulling from peers ---------------------------------------------------------------------------

    def _want_pull(self, peer: str) -> None:
        self._pull_wanted[peer] = None
        self._pull_wakeup.set()

    async def _pull_loop(self) -> None:
        while True:
            await self._pull_wakeup.wait()
            self._pull_wakeup.clear()
            while self._pull_wanted:
                peer = next(iter(self._pull_wanted))
                del self._pull_wanted[peer]
                await self._pull_from(peer)

    async def _pull_from(self, peer: str) -> None:
        """Pull what ``peer`` has and we lack, batch by batch, until we have caught up with it."""
        assert self.replica is not None and self.state is not None
        while peer not in self.blocked_peers:
            self.counters.pulls += 1
            try:
                request = wire.SyncRequest(genesis=self.state.genesis.id, digest=self._digest().encode())
                started = time.perf_counter()
                data = await self.host.request(
                    peer, wire.SYNC_PROTOCOL, request.encode(), timeout_s=self.config.sync.request_timeout_s
                )
                self.on_timing("pull", time.perf_counter() - started)
                response = wire.SyncResponse.decode(data)
                remote = crdt.Digest.decode(response.digest)
            except (p2p.P2PError, wire.WireError, crdt.CrdtError) as exc:
                self.counters.pull_failures += 1
                log.info("pull failed peer=%s error=%s", peer, exc)
                if isinstance(exc, p2p.RemoteError) and exc.error_type == wire.ForeignRun.__name__:
                    self._foreign_peers.add(peer)  # connected, but trains another model: stop asking
                elif not isinstance(exc, p2p.P2PError):  # the peer answered garbage, not just failed
                    self._reject(peer, exc)
                return
            self.replica.note_vector(peer, remote.version_vector)
            self._compare_state(peer, remote)
            if response.snapshot_required and not response.contributions:
                await self._install_snapshot_from(peer)
                return
            progressed = False
            for encoded in response.contributions:
                try:
                    contribution = crdt.Contribution.decode(encoded)
                    outcome = self._accept(contribution)
                except crdt.ConflictError as exc:
                    self._note_equivocation(exc)
                    continue
                except crdt.CrdtError as exc:
                    self._reject(peer, exc)
                    return
                progressed |= outcome is not crdt.ApplyOutcome.DUPLICATE
            behind = not self.state.version_vector.dominates(remote.version_vector)
            if not (progressed and behind):
                return

    async def _install_snapshot_from(self, peer: str) -> None:
        """Catch up through ``peer``'s snapshot (adopted only if nothing is lost: see daemon/replica.py)."""
        assert self.replica is not None and self.state is not None
        request = wire.SyncRequest(genesis=self.state.genesis.id, digest=b"")
        try:
            data = await self.host.request(
                peer, wire.SNAPSHOT_PROTOCOL, request.encode(), timeout_s=self.config.sync.request_timeout_s
            )
            snapshot = crdt.Snapshot.decode(data)
        except (p2p.P2PError, wire.WireError, crdt.CrdtError) as exc:
            self.counters.pull_failures += 1
            log.info("snapshot fetch failed peer=%s error=%s", peer, exc)
            return
        try:
            adopted = self.replica.adopt(snapshot)
        except crdt.CrdtError as exc:
            self._reject(peer, exc)
            return
        if not adopted:
            log.warning("not adopting snapshot from peer=%s: it would drop history we compacted", peer)
            return
        self._state_changed.set()
        log.info(
            "installed snapshot from peer=%s contributions=%d state_hash=%s",
            peer,
            self.state.contribution_count,
            self.state.state_hash[:16],
        )

    async def _anti_entropy_loop(self) -> None:
        while True:
            # Jitter so that a cluster started together does not pull in lockstep. Re-read: SIGHUP.
            await asyncio.sleep(self.config.sync.interval_s * random.uniform(0.5, 1.5))
            # A few random connected peers of our run per period (epidemic anti-entropy): each node's
            # control traffic stays constant as the mesh grows, and every pair still meets within a few
            # periods. Gossip announcements trigger immediate pulls on top. Candidates are connected
            # peers, not host.run_peers (DHT membership can lag behind connections); a peer of another
            # run answers ForeignRun once and is not asked again.
            candidates = [
                peer
                for peer in self.host.connected_peers()
                if peer not in self.blocked_peers and peer not in self._foreign_peers
            ]
            for peer in random.sample(candidates, min(self.config.sync.fanout, len(candidates))):
                self._want_pull(peer)

    async def _heartbeat_loop(self) -> None:
        """Tell the run, every few seconds, how this node is doing (shown per peer in status)."""
        moved, last = 0, time.monotonic()
        while True:
            stats = self.host.stats()
            total = int(stats["bytes_sent"]) + int(stats["bytes_received"])
            throughput = int(max(0, total - moved) / max(time.monotonic() - last, 1e-3))
            moved, last = total, time.monotonic()
            await self._gossip_heartbeat(self._heartbeat(throughput).encode())
            # gossipsub costs CPU per message at every node: stretch the period with the mesh so the
            # whole run carries about one heartbeat a second however many nodes it has.
            period = HEARTBEAT_S * max(1.0, len(self.host.connected_peers()) / HEARTBEAT_PEERS)
            await asyncio.sleep(period * random.uniform(0.8, 1.2))

    async def _gossip_heartbeat(self, beat: bytes) -> None:
        with contextlib.suppress(p2p.P2PError):  # no mesh peers yet: nobody to tell
            await self.host.publish(wire.heartbeat_topic(self.config.node.run), beat)

    def _heartbeat(self, throughput_bps: int) -> wire.Heartbeat:
        assert self.state is not None and self.trainer is not None
        return wire.Heartbeat(
            round=self.rounds_done,
            contributions=self.state.contribution_count,
            training=self.training_state,
            reachability=self.host.reachability(),
            task=self.config.training.task,
            device=str(self.trainer.info.get("device", "cpu")),
            throughput_bps=throughput_bps,
        )

    async def _say_goodbye(self) -> None:
        """A last heartbeat saying "leaving", so peers' status shows a clean exit, not a silent one.

        Gossiped for peers we reach only through the mesh, and sent directly to each connected peer, which
        does not depend on gossip having a mesh path right now (see wire.GOODBYE_PROTOCOL).
        """
        if self.state is None:
            return  # never joined: nobody to tell
        self.training_state = "leaving"
        beat = self._heartbeat(0).encode()

        async def tell(peer: str) -> None:
            with contextlib.suppress(p2p.P2PError):
                await self.host.request(peer, wire.GOODBYE_PROTOCOL, beat, timeout_s=GOODBYE_TIMEOUT_S)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOODBYE_TIMEOUT_S), asyncio.TaskGroup() as tasks:
                tasks.create_task(self._gossip_heartbeat(beat))
                for peer in self.host.connected_peers():
                    tasks.create_task(tell(peer))

    async def _serve_goodbye(self, peer: str, data: bytes) -> bytes:
        heartbeat = wire.Heartbeat.decode(data)
        if peer in self.peer_heartbeats:  # a member of this run heard before; a stranger changes nothing
            self.peer_heartbeats[peer] = (time.monotonic(), heartbeat)
        return b""

    async def _heartbeat_listener(self, queue: asyncio.Queue[p2p.GossipMessage]) -> None:
        while True:
            message = await queue.get()
            try:
                heartbeat = wire.Heartbeat.decode(message.data)
            except wire.WireError as exc:  # the validator let it through: count it like any junk
                self._reject(message.from_peer, exc)
                continue
            self.peer_heartbeats[message.from_peer] = (time.monotonic(), heartbeat)

    async def _announcement_loop(self, queue: asyncio.Queue[p2p.GossipMessage]) -> None:
        while True:
            message = await queue.get()
            if message.from_peer == self.host.peer_id or message.from_peer in self.blocked_peers:
                continue
            try:
                announcement = wire.Announcement.decode(message.data)
            except wire.WireError as exc:
                self._reject(message.from_peer, exc)
                continue
            assert self.state is not None
            if self.state.version_vector.get(announcement.author) < announcement.seq:
                author = p2p.peer_id_from_public_key(announcement.author)
                connected = self.host.connected_peers()
                source = author if author in connected and author not in self.blocked_peers else None
                self._want_pull(source or message.from_peer)

    # -- training -------------------------------------------------------------------------------------

    @property
    def rounds_done(self) -> int:
        assert self.state is not None
        return self.state.next_seq(self.signer.public_key) - 1

    def _round_limit(self) -> int | None:
        """The local round at which training stops (0: never), or None when training is off.

        `train start` overrides the config; otherwise it is re-read every round, since SIGHUP may change
        max_rounds."""
        if self._round_limit_override is not None:
            return self._round_limit_override
        training = self.config.training
        return training.max_rounds if training.enabled else None

    def _wants_training(self) -> bool:
        limit = self._round_limit()
        return limit is not None and (limit == 0 or self.rounds_done < limit)

    async def _training_loop(self) -> None:
        """Train while there are rounds to do; in between, keep the reported quality current."""
        while True:
            if self._wants_training():
                await self._train()
            self.training_state = "disabled" if self._round_limit() is None else "done"
            # Peers' contributions keep arriving. The event is cleared before the evaluation, so what lands
            # while it runs triggers the next one instead of being missed; `train start` sets it too.
            self._state_changed.clear()
            await self._evaluate()
            await self._state_changed.wait()
            await asyncio.sleep(0.5)  # debounce: a pull usually brings a batch

    async def _train(self) -> None:
        assert self.trainer is not None and self.state is not None
        topic = wire.announce_topic(self.config.node.run)
        fragments = len(self.state.genesis.fragments)
        self.training_state = "running"
        if self.rounds_done == 0:
            await self._evaluate()  # the starting point, for loss curves
            self.initial_eval = dict(self.last_eval)
        while self._wants_training():
            training = self.config.training  # re-read every round: SIGHUP may change eval_every
            if not self._resume.is_set():
                self.training_state = "paused"
                await self._resume.wait()
                self.training_state = "running"
            seq = self.rounds_done + 1
            base_vv = self.state.version_vector
            base_version = base_vv.digest()
            started = time.monotonic()
            result = await self.trainer.run_round(self.state.materialize(), (seq - 1) % fragments)
            # Staleness: contributions of others merged while this round trained against the older base.
            staleness = self.state.version_vector.total - base_vv.total
            weight = result.weight * result.staleness_policy.weight(staleness)
            if weight == 0.0:
                self.counters.stale_rounds_skipped += 1
                log.warning("round too stale, not contributed seq=%d staleness=%d", seq, staleness)
                await self.trainer.commit()
                continue
            if training.byzantine:  # TEST ONLY attacker (config.TrainingConfig.byzantine)
                length = self.state.genesis.fragment_length(result.fragment)
                result = security.byzantine_round(training.byzantine, result, length)
            self.on_timing("round", time.monotonic() - started)
            contribution = crdt.make_contribution(
                self.signer,
                genesis_id=self.state.genesis.id,
                seq=seq,
                fragment=result.fragment,
                codec=result.codec,
                payload=result.payload,
                weight=weight,
                base_version=base_version,
            )
            self._accept(contribution)
            await self.trainer.commit()
            announcement = wire.Announcement(
                author=contribution.author,
                seq=contribution.seq,
                fragment=contribution.fragment,
                size=len(contribution.payload),
                id=contribution.id,
            )
            await self.host.publish(topic, announcement.encode())
            self._record_round(
                seq, result, staleness=staleness, weight=weight, round_s=time.monotonic() - started
            )
            if seq % training.eval_every == 0:
                await self._evaluate()
            if training.slowdown > 1.0:
                await asyncio.sleep((training.slowdown - 1.0) * (time.monotonic() - started))

    def _record_round(self, seq: int, result: Any, *, staleness: int, weight: float, round_s: float) -> None:
        assert self.state is not None
        stats = self.host.stats()
        self.history.append(
            RoundRecord(
                round=seq,
                time_s=round(time.time() - self.started_at, 3),
                train_loss=float(result.train_loss),
                update_norm=float(result.update_norm),
                density=float(result.density),
                payload_bytes=int(result.payload_bytes),
                contributions=self.state.contribution_count,
                bytes_sent=int(stats["bytes_sent"]),
                bytes_received=int(stats["bytes_received"]),
                staleness=staleness,
                weight=weight,
                residual_norm=float(result.residual_norm),
                round_s=round(round_s, 4),
            )
        )
        del self.history[:-HISTORY_LIMIT]
        log.info(
            "round=%d train_loss=%.4f payload_bytes=%d contributions=%d",
            seq,
            result.train_loss,
            result.payload_bytes,
            self.state.contribution_count,
        )

    async def _evaluate(self) -> None:
        assert self.trainer is not None and self.state is not None
        # Both read before the await: contributions merged while it runs belong to the next evaluation.
        state_hash, contributions = self.state.state_hash, self.state.contribution_count
        metrics = await self.trainer.evaluate(self.state.materialize())
        self.last_eval = {
            "state_hash": state_hash,
            "contributions": contributions,
            **{k: float(v) for k, v in metrics.items()},
        }
        if self.history and self.history[-1].val_loss is None:
            self.history[-1].val_loss = metrics.get("val_loss")
            self.history[-1].val_accuracy = metrics.get("val_accuracy")
            self.history[-1].val_bpb = metrics.get("val_bpb")

    # -- control --------------------------------------------------------------------------------------

    def set_blocked_peers(self, peers: set[str]) -> None:
        """Fault injection: stop exchanging model data with ``peers`` (empty set: heal)."""
        self.blocked_peers = set(peers)
        log.warning("fault injection: blocked peers=%s", ",".join(sorted(peers)) or "none")

    def pause_training(self) -> None:
        self._resume.clear()

    def resume_training(self) -> None:
        self._resume.set()

    def start_training(self, rounds: int = 0) -> int:
        """Train ``rounds`` more local rounds (0: until stopped), whatever ``[training] enabled`` and
        ``max_rounds`` say, until the daemon restarts; also resumes a paused node. Returns the round at
        which training will stop (0: never)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self._round_limit_override = self.rounds_done + rounds if rounds else 0
        self._resume.set()
        self._state_changed.set()  # wakes the idle loop
        return self._round_limit_override

    def on_config_reloaded(self) -> None:
        """After SIGHUP: a raised max_rounds (or training turned back on) restarts a finished node."""
        self._state_changed.set()

    async def export_checkpoint(self, path: Path) -> dict[str, Any]:
        if self.state is None or self.trainer is None:
            raise NodeError("the model state is not loaded yet")
        state_hash = self.state.state_hash
        await self.trainer.export(self.state.materialize(), path)
        return {"path": str(path), "state_hash": state_hash, "contributions": self.state.contribution_count}

    def status(self) -> dict[str, Any]:
        stats = self.host.stats()
        state = self.state
        return {
            "peer_id": self.host.peer_id,
            "pid": os.getpid(),
            "home": str(self.home.path),
            "run": self.config.node.run,
            "task": self.config.training.task,
            "listen_addrs": self.host.listen_addrs(),
            "peers": self.host.connected_peers(),
            "round": self.rounds_done if state else 0,
            "training": self.training_state,
            "shard": self.shard,
            "contributions": state.contribution_count if state else 0,
            "state_hash": state.state_hash if state else None,
            "genesis": state.genesis.id if state else None,
            "version_vector": (
                {p2p.peer_id_from_public_key(a): s for a, s in state.version_vector.items()} if state else {}
            ),
            "bytes_sent": int(stats["bytes_sent"]),
            "bytes_received": int(stats["bytes_received"]),
            "train_loss": self.history[-1].train_loss if self.history else None,
            "eval": self.last_eval,
            "initial_eval": self.initial_eval,
            "counters": {
                "accepted": self.counters.accepted,
                "duplicates": self.counters.duplicates,
                "rejected": self.counters.rejected,
                "rejected_reasons": dict(self.counters.rejected_reasons),
                "pulls": self.counters.pulls,
                "pull_failures": self.counters.pull_failures,
                "snapshots_written": self.replica.snapshots_written if self.replica else 0,
                "stale_rounds_skipped": self.counters.stale_rounds_skipped,
                "snapshots_installed": self.replica.snapshots_installed if self.replica else 0,
                "snapshots_served": self.counters.snapshots_served,
                "equivocations": self.counters.equivocations,
            },
            "retained_contributions": state.retained_count if state else 0,
            "blocked_peers": sorted(self.blocked_peers),
            "p2p": stats,
            "peer_info": {
                peer: {**dataclasses.asdict(beat), "age_s": round(time.monotonic() - seen, 1)}
                for peer, (seen, beat) in self.peer_heartbeats.items()
            },
            "reachability": self.host.reachability(),
            "connections": self.host.peer_connections(),
            "nat": self.host.nat_status(),
            "suspects": sorted({*(self.suspects.suspects() if self.suspects else ()), *self.equivocators}),
            "equivocators": {author: sorted(seqs) for author, seqs in sorted(self.equivocators.items())},
            "diverged_from": sorted(self.diverged_from),
            "clip_norm": state.limits.clip_norm if state else None,  # fixed by the genesis (SECURITY.md)
            "uptime_s": round(time.time() - self.started_at, 3),
        }


def _ranges(ranges: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(start), int(stop)) for start, stop in ranges)
