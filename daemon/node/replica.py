"""This node's replica of the model: the CRDT state, its durable form, and the accounting of what entered.

Theory of operation
-------------------
:meth:`Replica.accept` is the one door through which a contribution, local or remote, enters the node:
``crdt.ModelState.apply`` verifies and applies it (decoding the payload once and handing the decoded
update to the suspect tracker), then the store appends it to the WAL with fsync. A crash in between
loses a contribution that anti-entropy fetches again, never one the node already told anybody about.
Sync and the rounds loop come in through :meth:`Replica.receive`, which checks the signature, decodes the
payload and measures it for the suspect tracker in a worker thread first (with the buffered records it
will let apply). The replica counts what it accepted, what was a
duplicate and what it refused (:meth:`reject`, also used for junk requests and gossip), and keeps the
proof when an author equivocates.

Every ``snapshot_every`` new contributions the replica writes a snapshot and forgets the history that
every known member already holds (:meth:`snapshot_and_compact`, in the background: the state is frozen
copy-on-write and hashed, encoded, written and synced in a worker thread, ~4 s at 100M parameters that the
event loop used to spend, while records go on being accepted into the live state): the meet of its own
vector and the last vector heard from each member (:attr:`Replica.holdings`, daemon/node/holdings.py),
persisted before compacting by it so that a restart forgets no member. The WAL keeps every record above
that floor, so a restart compacts nothing. With no member heard from, nothing is compacted: nobody else
holds anything, and members that come back could neither get the history nor adopt our snapshot. Only
members that lack at most ``snapshot_every`` of our contributions hold history back, and silent or
surplus members are forgotten (see holdings.py).

A replica too far behind a peer (the peer compacted what it lacks) adopts the peer's snapshot with
:meth:`adopt`, only if that loses nothing: every contribution it holds that the snapshot lacks must still
be retained here, to be applied on top. What it retained below the snapshot stays servable history.

A full disk is a state, not a crash: ``crdt.ModelState.apply`` logs the record (``before_commit``) before
it changes the state, so a failed append refuses the contribution (:class:`DiskFull`, counted) and leaves
memory and log in step. Sync stops pulling and training waits while :attr:`Replica.disk_full` holds;
the node keeps serving what it has, and the next append that succeeds clears it.

No networking and no clock: ``daemon/node/sync.py`` and ``daemon/node/rounds.py`` drive it. The only
I/O is the store's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

import crdt
import p2p
from daemon.node import heap
from daemon.node.attestation import Attestations
from daemon.node.holdings import DEFAULT_MEMBER_TTL_S, PeerHoldings
from daemon.node.store import Store
from daemon.node.suspects import Measure, SuspectTracker
from daemon.status import Counters

__all__ = ["DiskFull", "Prepared", "Replica"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Free space that counts as "room again" after a full disk: a few records and a rewritten log.
DISK_ROOM_BYTES = 64 * 2**20
#: Decoded successors `Replica.receive` holds at once (a buffered author may hold 64 MiB of payload, and a
#: low-bit payload decodes to 10-40x its size): about five 2 % records at 100M parameters.
AHEAD_DECODED_BYTES = 128 * 2**20
#: Seqs an equivocating author is listed with in status (the proof kept on disk is one per author).
MAX_EQUIVOCATIONS_LISTED = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """What :meth:`Replica.receive` computes for a record in its worker thread, for :meth:`Replica.accept`."""

    decoded: crdt.Decoded
    successors: list[crdt.Decoded]
    """The buffered records it will let apply (``crdt.ModelState.successors``), decoded."""
    measures: dict[str, Measure]
    """The suspect tracker's measure of each of them, by record id."""


class DiskFull(Exception):
    """The store cannot write (ENOSPC, EDQUOT, EIO): the contribution was refused, nothing changed."""


class Replica:
    """The model state of one node, its store, and its counters. Not thread-safe (one event loop)."""

    def __init__(
        self,
        store: Store,
        state: crdt.ModelState,
        *,
        snapshot_every: int,
        member_ttl_s: float = DEFAULT_MEMBER_TTL_S,
        clock: Callable[[], float] = time.time,
        counters: Counters | None = None,
        signer: crdt.Signer | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.signer = signer
        """This node's key: it signs checkpoints if the run's policy names it a signer."""
        policy = crdt.CheckpointPolicy.from_genesis(state.genesis)
        self.attestations = Attestations(state.genesis, policy, max_authors=state.limits.max_authors)
        self.on_checkpoint: Callable[[crdt.Checkpoint], None] = lambda checkpoint: None
        """Called with each checkpoint this node signs (to publish it)."""
        self.file_state: tuple[crdt.VersionVector, str] | None = None
        """The vector and state hash of the snapshot file in the store (None: none written yet)."""
        self.snapshot_every = snapshot_every
        self._clock = clock
        self.counters = counters or Counters()
        self.holdings = PeerHoldings(store.load_peer_vectors(), ttl_s=member_ttl_s, clock=clock)
        """What each run member is known to hold: what compaction may forget."""
        self.suspects = SuspectTracker([stop - start for start, stop in state.genesis.fragments])
        self.equivocators: dict[str, set[int]] = {}
        """Authors caught signing two records for one seq, with those seqs (proofs in the store)."""
        for first, _ in store.load_equivocations():
            self.equivocators.setdefault(_peer(first.author), set()).add(first.seq)
        self.on_change: Callable[[], None] = lambda: None
        """Called after the model changed (a contribution applied, a snapshot adopted)."""
        self.disk_full = False
        """The last write to the store failed; cleared by the next one that succeeds."""
        self._last_contribution: dict[str, float] = {}  # author -> when its latest contribution applied
        self.on_author: Callable[[str], None] = lambda author: None
        """Called with the author (peer id) of every contribution applied."""
        self._since_snapshot = 0
        self._writing = asyncio.Lock()  # a snapshot file is being written (ours or an adopted one)
        self._snapshot_task: asyncio.Task[int] | None = None
        self._hashing: asyncio.Task[crdt.Digest] | None = None
        # One thread for the whole-model passes (hash, encode, write): several, each with its own malloc
        # arena, kept 2-3 B/param more resident at 100M parameters (bench_model_scale, 2026-12-02).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica")
        # A second one decodes records (`receive`): a record must not wait seconds behind a snapshot.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica-decode")

    @classmethod
    def open(cls, store: Store, genesis: crdt.Genesis, *, snapshot_every: int, **options: Any) -> Replica:
        """The replica of ``genesis`` in ``store``: the genesis is written if new, then the stored snapshot
        and log are replayed.

        Raises:
            StoreError: the store holds another genesis, or files it cannot read.
        """
        store.write_genesis(genesis)
        snapshot, logged = store.load_state(genesis)
        replica = cls(store, crdt.ModelState.from_own_snapshot(genesis, snapshot, log=logged),
                      snapshot_every=snapshot_every, **options)
        if snapshot is not None:
            replica.file_state = (snapshot.header.version_vector, snapshot.header.state_hash)
        for checkpoint in store.load_checkpoints():
            replica.attestations.add(checkpoint)
        return replica

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._decoder.shutdown(wait=True)
        self.store.close()

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the replica's worker thread, the heap trimmed after it (daemon/node/heap.py)."""

        def run() -> T:
            try:
                return fn(*args)
            finally:
                heap.trim()

        return await asyncio.get_running_loop().run_in_executor(self._worker, run)

    # -- the door ---------------------------------------------------------------------------------------

    async def receive(self, contribution: crdt.Contribution) -> crdt.ApplyOutcome:
        """:meth:`accept`, with the record's signature checked and its payload decoded
        (``crdt.ModelState.decode``) and measured for the suspect tracker first, in a worker thread: most
        of an apply's time, which the loop spent before. So are the buffered records of its author that it
        will let apply right after it (``crdt.ModelState.successors``): each used to cost the loop a whole
        decode when an out-of-order arrival was drained.

        A record for a slot the state already holds (applied or buffered) is not decoded: sent again, it
        costs what a duplicate always cost. One that does not verify or decode goes to :meth:`accept` as
        it is, which then raises as it always did, in the same order of checks (an equivocation is named
        before a bad payload), and its successors are not decoded for it. Raises as :meth:`accept`."""
        prepared = None
        if not self.state.holds_slot(contribution.author, contribution.seq):
            successors = self.state.successors(contribution)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(crdt.CrdtError):
                prepared = await loop.run_in_executor(self._decoder, self._prepare, contribution, successors)
        return self.accept(contribution, prepared)

    def _prepare(self, contribution: crdt.Contribution, successors: list[crdt.Contribution]) -> Prepared:
        """`receive`'s work in the worker thread. The signature first: a forged record costs a hash, not a
        decode, and not the decode of the records buffered behind its slot."""
        contribution.verify(self.state.limits)
        decoded = [self.state.decode(contribution)]
        held = 0
        for successor in successors:  # verified and decodable when they were buffered
            if held >= AHEAD_DECODED_BYTES:  # the rest are decoded one by one as they are drained
                break
            with contextlib.suppress(crdt.CrdtError):
                decoded.append(self.state.decode(successor))
                held += decoded[-1].indices.nbytes + decoded[-1].values.nbytes
        measures = {d.contribution.id: self.suspects.measure(d.contribution.fragment, d.indices, d.values,
                                                             d.contribution.weight) for d in decoded}
        return Prepared(decoded[0], decoded[1:], measures)

    def accept(self, contribution: crdt.Contribution, prepared: Prepared | None = None) -> crdt.ApplyOutcome:
        """Apply, then log durably; snapshot and compact every ``snapshot_every`` new contributions.
        ``prepared``: what :meth:`receive` computed ahead for it.

        Raises:
            DiskFull: the store could not log it; nothing changed (counted).
            crdt.ConflictError: the author equivocated; the proof is kept and the author named (the peer
                that relayed the record is not to blame, so callers go on).
            crdt.CrdtError: the contribution is invalid here (nothing was logged).
        """
        try:
            observe = self._observe if prepared is None else functools.partial(
                self._observe, measures=prepared.measures)
            outcome = self.state.apply(contribution, observe=observe, before_commit=self.store.append,
                                       decoded=prepared.decoded if prepared else None,
                                       ahead=prepared.successors if prepared else ())
        except crdt.ConflictError as exc:
            self._note_equivocation(exc)
            raise
        except OSError as exc:
            self.counters.refused_disk_full += 1
            if not self.disk_full:
                log.error("cannot log contributions, refusing them until the disk has room error=%s", exc)
            self.disk_full = True
            raise DiskFull(str(exc)) from exc
        if outcome is crdt.ApplyOutcome.DUPLICATE:
            self.counters.duplicates += 1
            return outcome
        if self.disk_full:
            log.warning("the store is writable again; accepting contributions")
            self.disk_full = False
        self.counters.accepted += 1
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_every:
            self._start_snapshot()
        self.on_change()
        return outcome

    async def digest(self) -> crdt.Digest:
        """The state's digest for a peer. If its hash is not known (every accepted record changes it), it
        is computed in a worker thread from the state frozen now (at 100M parameters about 1.7 s that the
        loop spent after each change); concurrent callers share one computation. The digest may then be
        a few records old: still true (a replica only ever adds contributions), and what it lacks a peer
        sends again, as a duplicate."""
        state = self.state
        if state.hash_known:
            return state.digest()
        if self._hashing is None:
            self._hashing = asyncio.get_running_loop().create_task(self._hash(state), name="state hash")
        return await asyncio.shield(self._hashing)

    async def _hash(self, state: crdt.ModelState) -> crdt.Digest:
        try:
            with state.freeze() as frozen:
                digest = await self._off_loop(frozen.digest)
            state.take_hash(frozen)
            return digest
        finally:
            self._hashing = None

    def can_write(self) -> bool:
        """False while the disk is full and has not got room again (then pulls and rounds wait)."""
        return not self.disk_full or self.store.free_bytes() >= DISK_ROOM_BYTES

    def reject(self, reason: Exception) -> None:
        """Count refused input from a peer, by exception type (``status.counters.rejected_reasons``)."""
        self.counters.reject(type(reason).__name__)

    def _observe(self, contribution: crdt.Contribution, indices: np.ndarray, values: np.ndarray,
                 measures: dict[str, Measure] | None = None) -> None:
        """The apply's hook, for ``contribution`` and any buffered successor it unblocked (``measures``:
        those `receive` computed, by record id; a record it did not measure is measured here)."""
        author = _peer(contribution.author)
        measured = (measures or {}).get(contribution.id)
        self.suspects.observe(author, contribution.fragment, indices, values, contribution.weight, measured)
        self._last_contribution[author] = self._clock()
        self.on_author(author)

    def authors_active_since(self, since: float) -> set[str]:
        """Authors (peer ids) whose contributions this replica applied at or after ``since`` (unix time):
        the peers training now, as this node sees them."""
        return {author for author, seen in self._last_contribution.items() if seen >= since}

    def _note_equivocation(self, conflict: crdt.ConflictError) -> None:
        """Two validly signed records for one (author, seq): keep both as a proof and name the author; the
        first one stays."""
        first, second = conflict.evidence
        assert isinstance(first, crdt.Contribution) and isinstance(second, crdt.Contribution)
        author = _peer(first.author)
        seqs = self.equivocators.setdefault(author, set())
        if first.seq in seqs or len(seqs) >= MAX_EQUIVOCATIONS_LISTED:
            return
        seqs.add(first.seq)
        self.counters.equivocations += 1
        if len(seqs) > 1:
            return  # one proof per author is enough to exclude it
        try:
            proof = self.store.write_equivocation(first, second)
        except OSError as exc:  # evidence is advisory: a full disk must not stop the node
            log.error("author equivocated author=%s seq=%d proof not kept error=%s", author, first.seq, exc)
            return
        log.error("author equivocated author=%s seq=%d proof=%s", author, first.seq, proof)

    def suspect_authors(self) -> list[str]:
        """Authors whose updates look Byzantine, and equivocators."""
        return sorted({*self.suspects.suspects(), *self.equivocators})

    # -- compaction and snapshots -----------------------------------------------------------------------

    def _start_snapshot(self) -> None:
        """Start :meth:`snapshot_and_compact` in the background, unless a snapshot (ours or an adopted one)
        is being written: then the first accept after it asks again."""
        if self._writing.locked() or (self._snapshot_task is not None and not self._snapshot_task.done()):
            return
        self._snapshot_task = asyncio.get_running_loop().create_task(self.snapshot_and_compact(),
                                                                     name="snapshot")
        self._snapshot_task.add_done_callback(_log_failure)

    async def settle(self) -> None:
        """Wait for the snapshot being written in the background, if any (before the store closes)."""
        if self._snapshot_task is not None:
            await asyncio.shield(self._snapshot_task)

    async def snapshot_and_compact(self) -> int:
        """Persist a snapshot and forget the history every known member holds, never above the newest
        state a quorum of checkpoint signers attests (a joiner adopting that snapshot gets the rest as
        records). A signer signs a checkpoint of the snapshot and hands it to ``on_checkpoint``. Returns
        records dropped. A write that fails (a full disk) compacts nothing; the next one tries again.

        The state is frozen (crdt.FrozenState) and hashed, encoded, written and synced in a worker
        thread; records accepted meanwhile change only the live state (the frozen one keeps a copy of
        each block they change before it was read) and stay in the log above the snapshot's floor.
        """
        async with self._writing:
            state = self.state
            self._since_snapshot = 0
            with state.freeze() as frozen:
                try:
                    staged = await self._off_loop(self._stage, frozen)
                except OSError as exc:
                    log.error("snapshot not written, nothing compacted error=%s", exc)
                    self.disk_full = True
                    return 0
            state.take_hash(frozen)
            vv, state_hash = frozen.version_vector, frozen.state_hash
            checkpoint = self._sign(frozen)  # first: a signer's own checkpoint attests what it may compact to
            held = state.retention_floor
            vectors = self.holdings.members(state.version_vector, within=self.snapshot_every)
            members = crdt.retention_floor(vv, vectors.values()) if vectors else held
            attested = self.attestations.attested_vector()
            if self.attestations.policy is not None:
                members = crdt.retention_floor(members, [attested or crdt.VersionVector()])
            # The floor after compacting: per author, the members' floor where it is above what we hold.
            after = crdt.VersionVector.from_dict(
                {a: max(held.get(a), min(members.get(a), s)) for a, s in vv.items()}
            )
            try:
                self.store.write_peer_vectors(self.holdings.vectors)  # before compacting by them
                self.store.publish_snapshot(staged, floor=after,
                                            checkpoints=self.attestations.for_state(vv, state_hash))
            except OSError as exc:
                log.error("snapshot not written, nothing compacted error=%s", exc)
                self.disk_full = True
                return 0
            self.file_state = (vv, state_hash)
            dropped = state.compact(members)
            self.counters.snapshots_written += 1
            log.info("snapshot written contributions=%d compacted=%d retained=%d attested=%s", vv.total,
                     dropped, state.retained_count, attested.total if attested else "none")
            if checkpoint is not None:
                self.on_checkpoint(checkpoint)
            return dropped

    def _stage(self, frozen: crdt.FrozenState) -> Path:
        """In a worker thread: hash, encode, write and sync the frozen state (not yet served or loaded)."""
        return self.store.stage_snapshot(frozen.snapshot_parts())

    def _sign(self, state: crdt.ModelState | crdt.FrozenState, at: crdt.VersionVector | None = None
              ) -> crdt.Checkpoint | None:
        """This node's checkpoint of ``state`` (a ModelState: or of its past state ``at``), if it is a
        signer of the run and computed that state from records itself; kept with the others."""
        if self.signer is None or not self.attestations.is_signer(self.signer.public_key):
            return None
        if not state.self_verified:
            return None
        if isinstance(state, crdt.FrozenState):
            checkpoint = state.checkpoint(self.signer)
        else:
            checkpoint = state.checkpoint(self.signer, at=at)
        self.attestations.add(checkpoint)
        return checkpoint

    def offer_checkpoint(self, data: bytes) -> crdt.Checkpoint | None:
        """A checkpoint a peer published: checked and kept; a signer countersigns a fellow signer's when
        it computes the same hash for that vector. Returns this node's countersignature to publish.

        Raises:
            crdt.ValidationError: not a checkpoint of a signer of this run (count it against the sender).
        """
        checkpoint = self.attestations.decode(data)
        before = self.attestations.attested_vector()
        if not self.attestations.add(checkpoint):
            return None
        if self.attestations.attested_vector() != before and self.state.retained_count:
            # Compaction waits for attestation; a node that took its last snapshot before this one arrived
            # (an idle node, say) would otherwise keep its whole history until its next snapshot_every.
            self._start_snapshot()
        state = self.state
        if self.file_state == (checkpoint.version_vector, checkpoint.state_hash):
            self.store.write_checkpoints(self.attestations.for_state(*self.file_state))
        if not state.version_vector.dominates(checkpoint.version_vector):
            return None  # we have not seen that state yet
        try:
            mine = self._sign(state, at=checkpoint.version_vector)
        except crdt.HistoryPrunedError:
            return None  # we compacted past it: cannot recompute
        if mine is None or mine.state_hash != checkpoint.state_hash or mine.signer == checkpoint.signer:
            return None
        return mine

    def attested_snapshot(self) -> tuple[Path, list[crdt.Checkpoint]] | None:
        """The snapshot file and the checkpoints of a quorum that attest it, or None if it has no quorum
        (a joiner could not adopt it: it is not served)."""
        policy = self.attestations.policy
        if self.file_state is None or policy is None:
            return None
        vector, state_hash = self.file_state
        checkpoints = self.attestations.for_state(vector, state_hash)
        header = crdt.SnapshotHeader(self.state.genesis.id, vector, state_hash, self.state.self_verified)
        try:
            crdt.check_attestation(header, checkpoints, policy)
        except crdt.AttestationError:
            return None
        return self.store.snapshot_file, checkpoints

    async def adopt(self, snapshot: crdt.Snapshot, checkpoints: list[crdt.Checkpoint]) -> bool:
        """Catch up through a peer's snapshot, attested by ``checkpoints``; False (nothing changes) if it
        would drop held history.

        The adopted state is written to disk in a worker thread (encoding and writing a 100M-parameter
        state held the event loop for seconds; at 1B it would be tens). Meanwhile this node goes on
        accepting records into its current state and log, and they are applied to the adopted state
        before it replaces the current one; our own snapshot waits (one snapshot file is written at a
        time).

        Raises:
            crdt.AttestationError: no quorum of the run's signers vouches for it (the model is untouched).
            crdt.CrdtError: the snapshot is not of this genesis or does not match its own hash.
            OSError: it could not be written (a full disk); nothing changes.
        """
        policy = self.attestations.policy
        if policy is None:
            raise crdt.AttestationError("snapshot: this run's genesis names no checkpoint signers")
        async with self._writing:
            if not self.state.can_serve(snapshot.header.version_vector):
                return False
            held = self.state.records()
            fresh = crdt.ModelState.from_snapshot(
                self.state.genesis, snapshot, checkpoints=checkpoints, policy=policy, log=held,
                limits=self.state.limits,
            )
            for checkpoint in checkpoints:
                self.attestations.add(checkpoint)
            written, floor = (fresh.version_vector, fresh.state_hash), fresh.retention_floor
            staged = await self._off_loop(self.store.stage_snapshot, fresh.snapshot_parts())
            self.store.publish_snapshot(staged, floor=floor,
                                        checkpoints=self.attestations.for_state(*written))
            seen = {(c.author, c.seq) for c in held}
            for c in self.state.records():  # accepted while the file was written: logged, not in ``fresh``
                if (c.author, c.seq) not in seen:
                    with contextlib.suppress(crdt.CrdtError):  # as when it arrived: refused here too
                        fresh.apply(c)
            self.state = fresh
            self.file_state = written
            self._since_snapshot = 0
        self.counters.snapshots_installed += 1
        self.on_change()
        return True


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("snapshot failed", exc_info=task.exception())


def _peer(author: bytes) -> str:
    return p2p.peer_id_from_public_key(author)
