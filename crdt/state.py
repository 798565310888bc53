"""ModelState: the replicated model as an exact, order-independent sum of signed contributions.

Theory of operation
-------------------
The model is ``genesis.params + QUANTUM * acc`` where ``acc`` is an int64 vector. Applying a contribution
adds ``rint(float64(value) * weight * 2**SCALE_BITS)`` to ``acc`` at the contribution's indices (offset by
the fragment start). Integer addition is commutative and associative, and each (author, seq) slot is
applied at most once, so any two replicas that applied the same *set* of contributions hold bit-identical
``acc`` no matter the order they arrived in: this is a state-based CRDT whose join is set union and whose
state is summarized by a :class:`VersionVector` (authors number contributions 1, 2, 3 ... without gaps;
a replica applies each author's contributions in order and buffers early ones, boundedly).

Fixed-point arithmetic, overflow and memory: see crdt/_accumulator.py (the int64 accumulator, held in
int32 blocks while they fit, hashed, materialized and snapshotted in blocks: a state is near 8 bytes per
parameter).

Provenance: ``self_verified`` is true while every contribution in the accumulator was verified here
(grown by :meth:`apply`, or reloaded from an own snapshot of such a state) and false once a peer's
snapshot is adopted; only then can the replica attest its states (crdt.checkpoint has the trust model).
A state is built from a snapshot in two ways and no third: :meth:`ModelState.from_snapshot` for a peer's
(a quorum of checkpoints required) and :meth:`ModelState.from_own_snapshot` for the replica's own disk.

Bounds: early contributions wait in a buffer bounded in count and payload bytes (crdt/_pending.py); new
authors beyond ``Limits.max_authors`` are refused (:class:`CapacityError`), applied or buffered alike.

Admission: a run may ask each author for a proof of work, carried by every record (crdt/admission.py),
checked before the author takes a place under the cap.

Influence window: a run may pace and clip each author by the others' progress (crdt/_window.py has
the rules and why); the state keeps the one number per author it needs, the ``base_count`` of its last
record, through compaction (``_floor_base``) and snapshots (covered by the state hash).

Equivocation (known limitation)
-------------------------------
If an author signs two different contributions for one slot, replicas may keep different ones and never
converge on those slots. The second one seen raises :class:`ConflictError` carrying both records as
evidence; the daemon should ban the author (the pair is a transferable proof). Resolving it inside the
CRDT (e.g. lowest id wins, undoing the other, which the group structure permits) also needs digests to
carry slot ids; rejected for v1 as not worth the complexity while authors are known peers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from crdt import _wire
from crdt._accumulator import QUANTUM, SCALE_BITS, Accumulator, Delta, to_fixed
from crdt._pending import PendingBuffer
from crdt._window import check_growth, influence_window, windowed_clip
from crdt.admission import admission_bits, check_admission
from crdt.checkpoint import (
    Checkpoint,
    CheckpointPolicy,
    check_attestation,
    make_checkpoint,
    require_self_verified,
)
from crdt.errors import (
    CapacityError,
    ConflictError,
    CrdtError,
    GapTooLargeError,
    GenesisMismatchError,
    HistoryPrunedError,
    ValidationError,
)
from crdt.frozen import FrozenState
from crdt.records import DEFAULT_LIMITS, Contribution, Genesis, Limits
from crdt.signing import Signer
from crdt.snapshot import Snapshot, SnapshotHeader, combine_state_hash
from crdt.vv import Digest, VersionVector

__all__ = ["QUANTUM", "SCALE_BITS", "ApplyOutcome", "Decoded", "ModelState"]

#: Called with each applied contribution and its decoded (fragment-relative indices, float32 values).
Observer = Callable[[Contribution, np.ndarray, np.ndarray], None]


class ApplyOutcome(enum.Enum):
    """Result of :meth:`ModelState.apply` (rejections raise instead)."""

    APPLIED = "applied"
    """Applied now (and any buffered successors it unblocked were applied too)."""
    DUPLICATE = "duplicate"
    """Already applied or already buffered: nothing changed."""
    BUFFERED = "buffered"
    """Valid but ahead of its author's prefix; held until the gap fills."""

    def __repr__(self) -> str:
        return f"ApplyOutcome.{self.name}"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Decoded:
    """One contribution's payload decoded and checked against the genesis and limits, ahead of
    :meth:`ModelState.apply` (see :meth:`ModelState.decode`)."""

    contribution: Contribution
    indices: np.ndarray
    values: np.ndarray
    norm: float


class ModelState:
    """One replica's model. Not thread-safe (but :meth:`decode`); pure (no I/O, no clock, no randomness)."""

    def __init__(self, genesis: Genesis, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._setup(genesis, limits, Accumulator(genesis), self_verified=True)

    def _setup(self, genesis: Genesis, limits: Limits, acc: Accumulator, *, self_verified: bool) -> None:
        self._genesis = genesis
        self._limits = _with_genesis_clip(genesis, limits)
        self._acc = acc
        self._vv: dict[bytes, int] = {}
        self._total = 0  # sum of _vv: read per record by the influence window's rule 2
        self._floor: dict[bytes, int] = {}  # seqs <= floor[author] are applied but no longer retained
        self._log: dict[bytes, dict[int, Contribution]] = {}  # retained applied contributions
        self._pending = PendingBuffer()  # verified, waiting for a gap to fill (or, windowed, for others)
        self._window = influence_window(genesis)
        self._admission_bits = admission_bits(genesis)
        self._floor_base: dict[bytes, int] = {}  # base_count of each author's record at its floor seq
        self._self_verified = self_verified
        self._cache_vv: VersionVector | None = None
        self._cache_hash: str | None = None

    # -- read side -------------------------------------------------------------------------------------
    @property
    def genesis(self) -> Genesis:
        return self._genesis

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def version_vector(self) -> VersionVector:
        if self._cache_vv is None:
            self._cache_vv = VersionVector.from_dict(self._vv)
        return self._cache_vv

    @property
    def contribution_count(self) -> int:
        """Contributions applied (including those compacted into a snapshot)."""
        return self._total

    @property
    def pending_count(self) -> int:
        return self._pending.count

    @property
    def pending_bytes(self) -> int:
        """Payload bytes of the buffered contributions."""
        return self._pending.total_bytes

    @property
    def retained_count(self) -> int:
        """Applied contributions still held as records (servable to peers; the rest were compacted)."""
        return sum(len(log) for log in self._log.values())

    @property
    def retention_floor(self) -> VersionVector:
        """Per author, the highest seq no longer retained (0 = full history)."""
        return VersionVector.from_dict(self._floor)

    @property
    def self_verified(self) -> bool:
        """Every contribution in the accumulator was verified here (no peer snapshot adopted): only then
        may this replica attest its states (:meth:`checkpoint`)."""
        return self._self_verified

    @property
    def accumulator(self) -> np.ndarray:
        """A read-only int64 copy of the accumulator (for tests and diagnostics: 8 bytes per parameter)."""
        view = self._acc.values.to_int64()
        view.flags.writeable = False
        return view

    @property
    def accumulator_bytes(self) -> int:
        """Bytes the accumulator holds (packed: about 4 per parameter; crdt/_packed.py)."""
        return self._acc.values.nbytes

    @property
    def state_hash(self) -> str:
        """Hex blake2b-256 of (genesis id, version-vector digest, per-fragment blake2b-256 of the
        little-endian accumulator). Equal exactly when the applied contribution sets are equal."""
        if self._cache_hash is None:
            # Per-fragment digests are cached and recomputed only for fragments that changed (an apply
            # touches one fragment, so a digest after it costs 1/num_fragments of a full pass).
            hashes = self._acc.fragment_hashes()
            self._cache_hash = combine_state_hash(self._genesis.id, self.version_vector, hashes,
                                                  self._bases_at(self.version_vector))
        return self._cache_hash

    @property
    def hash_known(self) -> bool:
        """:attr:`state_hash` is cached (reading it costs nothing); else it hashes every changed fragment."""
        return self._cache_hash is not None

    @property
    def influence_window(self) -> int | None:
        """The genesis's influence window W (None: off; crdt/_window.py)."""
        return self._window

    @property
    def admission_bits(self) -> int:
        """The proof of work the genesis asks of each author (0: none; crdt/admission.py)."""
        return self._admission_bits

    def last_base_count(self, author: bytes) -> int | None:
        """``base_count`` of ``author``'s last applied record (None: it has none); with a window, its next
        record must state more (crdt/_window.py, rule 1)."""
        return self._base_at(author, self._vv.get(author, 0))

    def digest(self) -> Digest:
        return Digest(self.version_vector, self.state_hash, self.contribution_count)

    def materialize(self, out: np.ndarray | None = None) -> np.ndarray:
        """float32(base + acc * QUANTUM), computed in float64 elementwise (deterministic), into ``out``
        (float32, genesis.length, writeable; e.g. shared memory) or a new array. Returns it.

        Raises:
            ValidationError: ``out`` has the wrong dtype, shape or is read-only.
        """
        return self._acc.materialize(out)

    def get(self, author: bytes, seq: int) -> Contribution | None:
        """A retained applied contribution, or None (unknown, pending or compacted)."""
        return self._log.get(author, {}).get(seq)

    def next_seq(self, author: bytes) -> int:
        return self._vv.get(author, 0) + 1

    def holds_slot(self, author: bytes, seq: int) -> bool:
        """Whether ``author``'s slot ``seq`` is taken here (applied, compacted or buffered): ``apply`` of a
        record for it decodes nothing (it is a duplicate, or an equivocation)."""
        return seq <= self._vv.get(author, 0) or self._pending.get(author, seq) is not None

    def successors(self, c: Contribution) -> list[Contribution]:
        """The buffered records of ``c``'s author that follow ``c`` without a gap: what applying ``c`` would
        apply right after it (with an influence window, some may have to wait); none when ``c`` is not its
        author's next record (it would wait in the buffer itself). For a caller that decodes them ahead, in
        another thread, with :meth:`decode` (``apply(ahead=...)``)."""
        if c.seq != self.next_seq(c.author):
            return []
        found = []
        while (nxt := self._pending.get(c.author, c.seq + 1 + len(found))) is not None:
            found.append(nxt)
        return found

    def can_serve(self, remote: VersionVector) -> bool:
        """True if every contribution ``remote`` lacks is still retained here (else send a snapshot)."""
        return all(remote.get(a) >= f for a, f in self._floor.items() if self._vv.get(a, 0) > remote.get(a))

    def contributions_missing_for(self, remote: VersionVector, *, max_count: int) -> list[Contribution]:
        """Retained contributions ``remote`` lacks, lowest seqs first (ties by author), at most max_count.

        Authors whose missing range starts below the retention floor are skipped (see :meth:`can_serve`).
        The order lets the receiver apply each item immediately instead of buffering.
        """
        picks: list[tuple[int, bytes]] = []
        for author, have in self._vv.items():
            start = remote.get(author) + 1
            if start > have or start <= self._floor.get(author, 0):
                continue
            picks.extend((s, author) for s in range(start, min(have, start + max_count - 1) + 1))
        picks.sort()
        return [self._log[a][s] for s, a in picks[:max(max_count, 0)]]

    def records(self) -> list[Contribution]:
        """Every contribution held as a record: the retained applied ones and the buffered ones."""
        return [c for log in self._log.values() for c in log.values()] + self._pending.records()

    # -- write side ------------------------------------------------------------------------------------
    def apply(
        self,
        c: Contribution,
        *,
        observe: Observer | None = None,
        before_commit: Callable[[Contribution], None] | None = None,
        decoded: Decoded | None = None,
        ahead: Iterable[Decoded] = (),
    ) -> ApplyOutcome:
        """Verify and apply (or buffer) one contribution.

        ``decoded``: ``c``'s payload as :meth:`decode` gave it (computed in another thread), so that it is
        not decoded again here; None: decoded here. ``ahead``: buffered records decoded the same way
        (:meth:`successors`), used for those that this call applies; the others are decoded here.

        ``observe`` is called with every contribution this call applies (``c``, and buffered successors
        it unblocks) and its decoded ``(indices, values)``, so a caller that inspects updates (the
        daemon's suspect tracker) does not decode the payload a second time.

        ``before_commit`` is called with ``c`` once every check has passed and before the state changes
        (not for duplicates); if it raises, the state is unchanged. The daemon logs ``c`` durably there,
        so a full disk refuses a contribution instead of leaving one in memory that its log lacks.

        Raises:
            ValidationError: bad fields or payload, norm too large (see Limits).
            SignatureError: the signature does not verify.
            GenesisMismatchError: signed for another run's genesis, or fragment not in this genesis.
            ConflictError: a different contribution already holds this slot (equivocation).
            CapacityError: a new author beyond ``Limits.max_authors``.
            GapTooLargeError: too far ahead to buffer, or the buffer is full; fetch the gap first.
        """
        if decoded is not None and decoded.contribution is not c:
            raise ValueError("decoded is another contribution's")
        c.check_fields(self._limits)
        if c.genesis_id != self._genesis.id:  # first: a replay from another run is neither a duplicate
            raise GenesisMismatchError(  # nor an equivocation of its author here
                f"contribution: signed for genesis {c.genesis_id[:16]}, not {self._genesis.id[:16]}")
        author, seq = c.author, c.seq
        have = self._vv.get(author, 0)
        known = self.get(author, seq) if seq <= have else self._pending.get(author, seq)
        if known is not None or seq <= have:
            if known is None or known.id == c.id:  # None: compacted away; cannot compare, assume same
                return ApplyOutcome.DUPLICATE
            c.verify(self._limits)  # only a *signed* second version is an equivocation
            raise ConflictError(f"contribution: author equivocated at seq {seq}", (known, c))
        c.verify(self._limits)
        if self._admission_bits:  # before the cap: an unadmitted author must not take a place in it
            check_admission(self._genesis.id, author, c.admission_nonce, self._admission_bits)
        if author not in self._vv and author not in self._pending and self._author_count() >= \
                self._limits.max_authors:
            raise CapacityError(f"contribution: a new author beyond the limit of {self._limits.max_authors}")
        if seq == have + 1 and self._ready(c):
            self._add(c, observe, before_commit, decoded)
            early = {d.contribution.id: d for d in ahead}
            self._drain(author, observe, early)
            if self._window is not None:
                self._drain_waiting(observe, early)
            return ApplyOutcome.APPLIED
        if decoded is None:  # buffer only contributions that will apply
            c.validate_against(self._genesis, self._limits)
        self._pending.add(c, gap=seq - have, limits=self._limits, before_insert=before_commit)
        return ApplyOutcome.BUFFERED

    def _ready(self, c: Contribution) -> bool:
        """Whether ``c``, next in its author's seqs, may apply now: always without a window; with one, once
        the state holds ``c.base_count`` contributions of others (rule 2).

        Raises:
            ValidationError: ``c.base_count`` does not grow over its predecessor's (rule 1).
        """
        if self._window is None:
            return True
        check_growth(self._base_at(c.author, c.seq - 1), c.base_count)
        return self.contribution_count - self._vv.get(c.author, 0) >= c.base_count

    def _base_at(self, author: bytes, seq: int) -> int | None:
        """``base_count`` of ``author``'s applied record ``seq`` (None: seq 0, or compacted and unknown)."""
        if seq == 0:
            return None
        c = self._log.get(author, {}).get(seq)
        if c is not None:
            return c.base_count
        return self._floor_base.get(author) if seq == self._floor.get(author, 0) else None

    def _bases_at(self, vector: VersionVector) -> VersionVector | None:
        """Each author's last ``base_count`` in the state at ``vector`` (None without a window).

        Raises:
            HistoryPrunedError: one of them was compacted and is not known (see _restore).
        """
        if self._window is None:
            return None
        bases = {}
        for author, seq in vector.items():
            base = self._base_at(author, seq)
            if base is None:
                raise HistoryPrunedError("state hash: an author's last base was compacted")
            bases[author] = base
        return VersionVector.from_dict(bases)

    def _author_count(self) -> int:
        return len(self._vv) + sum(1 for a in self._pending.authors() if a not in self._vv)

    def decode(self, c: Contribution) -> Decoded:
        """The part of :meth:`apply`'s work that depends on the record, the genesis and the limits alone
        (decoding the payload, its weighted norm): safe to run in another thread while this state changes,
        and then handed to ``apply(c, decoded=...)``. At 20M parameters it was about half of applying a
        2 % record (2026-12-02); the rest (the scatter-add) must run where the state is owned.

        Raises:
            GenesisMismatchError, ValidationError: as ``apply`` would for this payload.
        """
        indices, values, norm = c.validate_against(self._genesis, self._limits)
        return Decoded(c, indices, values, norm)

    def _decoded(self, c: Contribution, decoded: Decoded | None = None
                 ) -> tuple[np.ndarray, np.ndarray, Delta]:
        """``c``'s decoded update and what it adds to the accumulator (a pure function of the record and,
        with a window, of its author's previous record's ``base_count``).

        Raises:
            HistoryPrunedError: (windowed) the previous record was compacted and its base is not known.
        """
        if decoded is None:
            decoded = self.decode(c)
        indices, values, norm = decoded.indices, decoded.values, decoded.norm
        delta = to_fixed(self._genesis, c.fragment, indices, values, c.weight,
                         clip_factor(norm, self._clip_limit(c)))
        return indices, values, delta

    def _clip_limit(self, c: Contribution) -> float | None:
        """``clip_norm``, scaled down by the window to the share of a window's progress since the author's
        previous record (rule 3: the same float operations on every replica)."""
        clip_norm = self._limits.clip_norm
        if self._window is None or clip_norm is None or c.seq == 1:
            return clip_norm
        prev = self._base_at(c.author, c.seq - 1)
        if prev is None:
            raise HistoryPrunedError("contribution: the author's previous base was compacted")
        return windowed_clip(clip_norm, self._window, c.base_count - prev)

    def _delta(self, c: Contribution) -> Delta:
        return self._decoded(c)[2]

    def _add(
        self,
        c: Contribution,
        observe: Observer | None = None,
        before_commit: Callable[[Contribution], None] | None = None,
        decoded: Decoded | None = None,
    ) -> None:
        indices, values, delta = self._decoded(c, decoded)
        if before_commit is not None:
            before_commit(c)  # may raise: nothing has changed yet
        if observe is not None:
            observe(c, indices, values)
        self._acc.add(delta)
        self._vv[c.author] = c.seq
        self._total += 1
        self._log.setdefault(c.author, {})[c.seq] = c
        self._cache_vv = None
        self._cache_hash = None

    def _drain(self, author: bytes, observe: Observer | None = None,
               early: Mapping[str, Decoded] | None = None) -> bool:
        """Apply ``author``'s buffered successors while they are ready (with their payloads from ``early``,
        by record id, where decoded ahead); True if any was."""
        applied = False
        while (c := self._pending.get(author, self._vv.get(author, 0) + 1)) is not None:
            try:
                if not self._ready(c):
                    break
            except ValidationError:  # its base does not grow: it can never apply, here or anywhere
                self._pending.pop(c.author, c.seq)
                break
            self._pending.pop(c.author, c.seq)
            self._add(c, observe, decoded=(early or {}).get(c.id))  # content-addressed: same id, same payload
            applied = True
        return applied

    def _drain_waiting(self, observe: Observer | None = None, early: Mapping[str, Decoded] | None = None
                       ) -> None:
        """(Windowed) every contribution applied lets the others' records that waited for it apply."""
        while any([self._drain(author, observe, early) for author in list(self._pending.authors())]):
            pass

    def drop_pending(self, authors: Iterable[bytes] | None = None) -> int:
        """Forget buffered contributions (of ``authors``, or all); returns how many. Harmless: anti-entropy
        brings them back when their gaps can be filled. The daemon calls it on its own clock (buffer
        expiry) and for authors it bans."""
        return self._pending.drop(authors)

    def compact(self, floor: VersionVector) -> int:
        """Forget retained contributions with seq <= min(floor[a], vv[a]); returns how many were dropped.

        Use with :func:`crdt.retention_floor` (the meet of the own vector and all known peers'), after the
        state has been snapshotted: the dropped contributions can then only be served as a snapshot.
        """
        dropped = 0
        for author, log in self._log.items():
            cut = min(floor.get(author), self._vv.get(author, 0))
            if cut <= self._floor.get(author, 0):
                continue
            self._floor_base[author] = log[cut].base_count
            for s in range(self._floor.get(author, 0) + 1, cut + 1):
                dropped += log.pop(s, None) is not None
            self._floor[author] = cut
        return dropped

    # -- whole-state operations ------------------------------------------------------------------------
    def copy(self) -> ModelState:
        other = ModelState.__new__(ModelState)
        other._setup(self._genesis, self._limits, self._acc.copy(), self_verified=self._self_verified)
        other._vv = dict(self._vv)
        other._total = self._total
        other._floor = dict(self._floor)
        other._log = {a: dict(m) for a, m in self._log.items()}
        other._floor_base = dict(self._floor_base)
        other._pending = self._pending.copy()
        other._cache_hash = self._cache_hash
        return other

    def merge(self, other: ModelState) -> ModelState:
        """The CRDT join: a new state holding the union of both replicas' applied contributions.

        Raises:
            GenesisMismatchError: different genesis.
            HistoryPrunedError: ``other`` compacted contributions this replica still lacks.
        """
        if other._genesis.id != self._genesis.id:
            raise GenesisMismatchError("merge: states have different genesis")
        if not other.can_serve(self.version_vector):
            raise HistoryPrunedError("merge: the other replica compacted contributions this one lacks")
        out = self.copy()
        for c in other.contributions_missing_for(self.version_vector, max_count=other.contribution_count):
            out.apply(c)
        # Buffered contributions are part of what a replica knows: without them the join is not
        # associative (one side's buffered seq 3 becomes applicable once the other side brings seq 1-2).
        for c in other._pending.records():
            with contextlib.suppress(GapTooLargeError):  # buffering is best-effort, bounded by Limits
                out.apply(c)
        return out

    def apply_all(self, contributions: Iterable[Contribution]) -> list[ApplyOutcome]:
        """Convenience: apply in order, stopping at the first exception."""
        return [self.apply(c) for c in contributions]

    # -- snapshots ---------------------------------------------------------------------------------------
    def snapshot_parts(self) -> Iterator[bytes]:
        """This state's snapshot stream (crdt.snapshot), one framed part at a time: write each to a file
        as it comes. Holds one block's temporaries, never a copy of the accumulator.

        Raises:
            RuntimeError: the state changed before the stream was consumed (a caller bug: finish writing
                before applying more).
        """
        header = SnapshotHeader(self._genesis.id, self.version_vector, self.state_hash, self._self_verified,
                                self._bases_at(self.version_vector) or VersionVector())
        return self._acc.parts(header)

    def freeze(self) -> FrozenState:
        """This state as it is now, to hash and encode in another thread while this one goes on applying
        (crdt/frozen.py). Close it when done."""
        vector = self.version_vector
        return FrozenState(self._genesis.id, vector, self._bases_at(vector), self._self_verified,
                           self._acc.freeze(hashed=self._cache_hash is not None), self._cache_hash)

    def take_hash(self, frozen: FrozenState) -> None:
        """Keep the hash ``frozen`` computed (and its fragment digests) if this state has not changed since
        it was frozen, so that it is not computed again here."""
        if frozen.generation == self._acc.generation and frozen.version_vector == self.version_vector:
            self._acc.take_hashes(frozen.fragment_hashes)
            self._cache_hash = frozen.state_hash

    @classmethod
    def from_snapshot(cls, genesis: Genesis, snapshot: Snapshot, *, checkpoints: Iterable[Checkpoint],
                      policy: CheckpointPolicy, log: Iterable[Contribution] = (),
                      limits: Limits = DEFAULT_LIMITS) -> ModelState:
        """Adopt a *peer's* snapshot: only if a quorum of the policy's signers attest it
        (:func:`crdt.check_attestation`). The state is not :attr:`self_verified`. ``log``: as for
        :meth:`from_own_snapshot` (pass this replica's ``records()``).

        Raises:
            AttestationError: no quorum, or signers contradict each other (the model is not touched).
            GenesisMismatchError: snapshot of another genesis or of another model size.
        """
        check_attestation(snapshot.header, checkpoints, policy)
        return cls._restore(genesis, snapshot, self_verified=False, log=log, limits=limits)

    @classmethod
    def from_own_snapshot(cls, genesis: Genesis, snapshot: Snapshot | None, *,
                          log: Iterable[Contribution] = (), limits: Limits = DEFAULT_LIMITS) -> ModelState:
        """Rebuild this replica after a restart from its *own* snapshot (None: the genesis state) and the
        contributions logged beside it. Trusted: never call it with bytes that came from a peer.

        Logged contributions the snapshot covers stay servable history as far as they run unbroken down
        from their author's seq in the snapshot; below that, history counts as compacted. Keeping them is
        what lets a restarted node, or one that adopted a peer's snapshot, go on serving what it retained:
        otherwise its retention floor would jump to the snapshot's vector, and two such nodes could each
        lack what the other compacted. They are not re-verified (they come from this replica's own log
        or state; receivers verify whatever is served). The others are applied on top, lowest seqs first;
        one that fails validation is skipped, as it would be on receipt.

        Raises:
            GenesisMismatchError: snapshot of another genesis or of another model size.
        """
        verified = snapshot is None or snapshot.header.self_verified
        return cls._restore(genesis, snapshot, self_verified=verified, log=log, limits=limits)

    @classmethod
    def _restore(cls, genesis: Genesis, snapshot: Snapshot | None, *, self_verified: bool,
                 log: Iterable[Contribution], limits: Limits) -> ModelState:
        state = cls.__new__(cls)
        if snapshot is None:
            state._setup(genesis, limits, Accumulator(genesis), self_verified=self_verified)
        else:
            header = snapshot.header
            if header.genesis_id != genesis.id:
                raise GenesisMismatchError("snapshot: belongs to a different genesis")
            acc, hashes = snapshot.take()  # SnapshotReader checked the content against the header's hash
            if len(acc) != genesis.length or len(hashes) != len(genesis.fragments):
                raise GenesisMismatchError("snapshot: accumulator size does not match the genesis model")
            state._setup(genesis, limits, Accumulator(genesis, acc, hashes), self_verified=self_verified)
            if header.bases and state._window is None:
                raise GenesisMismatchError("snapshot: carries bases, but the genesis has no influence window")
            state._vv = dict(header.version_vector.items())
            state._total = header.version_vector.total
            state._floor = dict(state._vv)
            if state._window is not None:  # an author absent from the bases had base 0
                state._floor_base = {a: header.bases.get(a) for a in state._vv}
            state._cache_hash = header.state_hash
        covered: dict[bytes, dict[int, Contribution]] = {}
        later: list[Contribution] = []
        for c in log:
            if c.seq <= state._vv.get(c.author, 0):
                covered.setdefault(c.author, {})[c.seq] = c
            else:
                later.append(c)
        for author, by_seq in covered.items():
            seq = state._vv[author]
            while seq in by_seq:
                state._log.setdefault(author, {})[seq] = by_seq[seq]
                seq -= 1
            if seq != state._floor[author]:  # the record at the lower floor is not held: base unknown
                state._floor_base.pop(author, None)
            state._floor[author] = seq
        for c in sorted(later, key=lambda c: (c.seq, c.author)):
            with contextlib.suppress(CrdtError):
                state.apply(c)
        return state

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint(self, signer: Signer, *, at: VersionVector | None = None) -> Checkpoint:
        """Sign a checkpoint of this state, or of its past state at vector ``at`` (to countersign a fellow
        signer's checkpoint after recomputing it: compare the hashes, and keep both on a mismatch).

        Raises:
            AttestationError: this state is not :attr:`self_verified` (it adopted a peer's snapshot).
            ValidationError, HistoryPrunedError: see :meth:`state_hash_at`.
        """
        require_self_verified(self._self_verified)
        vector = self.version_vector if at is None else at
        return make_checkpoint(signer, genesis_id=self._genesis.id, version_vector=vector,
                               state_hash=self.state_hash_at(vector))

    def state_hash_at(self, vector: VersionVector) -> str:
        """The state hash this replica had, or would have had, holding exactly the contributions of
        ``vector``: the retained ones above it are subtracted in place, the touched fragments hashed, and
        they are added back (int64 addition is a group: the accumulator is restored bit for bit).

        Raises:
            ValidationError: ``vector`` credits an author beyond this replica's vector.
            HistoryPrunedError: the contributions between ``vector`` and this state were compacted.
        """
        if vector == self.version_vector:
            return self.state_hash
        _wire.expect(self.version_vector.dominates(vector), "state_hash_at", "vector ahead of this state")
        undo: list[Delta] = []
        for author, have in self._vv.items():
            low = vector.get(author)
            if low < self._floor.get(author, 0):
                raise HistoryPrunedError("state_hash_at: contributions above the vector were compacted")
            undo.extend(self._delta(self._log[author][s]) for s in range(low + 1, have + 1))
        return combine_state_hash(self._genesis.id, vector, self._acc.hashes_without(undo),
                                  self._bases_at(vector))


def clip_factor(norm: float, clip_norm: float | None) -> float | None:
    """The scale that brings a contribution of exact weighted norm ``norm`` (crdt.weighted_norm) down to
    ``clip_norm`` (None: no clipping). The norm is the same bits on every replica and the division is one
    correctly rounded operation, so every replica scales by the same factor."""
    if clip_norm is None or norm <= clip_norm:
        return None
    return clip_norm / norm


def _with_genesis_clip(genesis: Genesis, limits: Limits) -> Limits:
    """A run may fix robust aggregation in its genesis (``meta["clip_norm"]``): it then applies on every
    replica, whatever limits the caller passed, because a per-replica setting would break convergence."""
    raw = genesis.meta.get("clip_norm")
    if raw is None:
        return limits
    try:
        return dataclasses.replace(limits, clip_norm=float(raw))
    except ValueError:
        raise GenesisMismatchError(f"genesis: clip_norm {raw!r} is not a finite positive number") from None
