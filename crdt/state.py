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

Fixed point: quantum, range, overflow
-------------------------------------
* ``SCALE_BITS = 32``: quantum ``2**-32 ~= 2.3e-10``. Per-entry rounding error <= 1.2e-10 per applied
  contribution, below float32 resolution for any parameter of magnitude >= ~1e-3 (ulp(1e-3) ~= 1.2e-10)
  and far below the q8/q4/q2 codec error. Updates smaller than 1.2e-10 vanish, which is harmless.
* Range: int64 holds +-2**63 quanta = +-2**31 ~= +-2.1e9 in model units per entry (the *accumulated*
  update, on top of the float32 base).
* Per-contribution bound: ``Limits.max_norm`` (default 1e4 < 2**14) bounds the weighted L2 norm and hence
  every weighted entry, so one contribution adds at most 2**46 quanta per entry: the float64 product is
  exact to the integer and ``rint`` fits int64 with margin 2**17.
* Overflow: numpy int64 addition wraps modulo 2**64. Wrapping addition is still a commutative group, so
  order-independence is exact even through intermediate overflow, and the final value is correct whenever
  the *true* total is within +-2**63 quanta: at least 2**17 = 131072 maximal-norm contributions hitting
  the same entry with the same sign. A real run never approaches that (it would put a parameter at 1e9);
  we deliberately do *not* reject on overflow, because rejection would depend on arrival order and break
  convergence.
* ``materialize`` computes ``float32(float64(base) + float64(acc) * 2**-32)`` elementwise: every step is
  one correctly rounded IEEE operation, so all peers get the same bytes.

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
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from crdt import _wire
from crdt.errors import ConflictError, CrdtError, GapTooLargeError, GenesisMismatchError, HistoryPrunedError
from crdt.records import DEFAULT_LIMITS, FORMAT_VERSION, HASH_BYTES, Contribution, Genesis, Limits
from crdt.vv import MAX_VV_BYTES, Digest, VersionVector

__all__ = ["QUANTUM", "SCALE_BITS", "ApplyOutcome", "ModelState", "Snapshot"]

#: Fractional bits of the accumulator (see the module docstring for the range/overflow analysis).
SCALE_BITS = 32
#: Value of one accumulator unit in model units.
QUANTUM = 2.0**-SCALE_BITS
_SCALE = float(2**SCALE_BITS)
#: Called with each applied contribution and its decoded (fragment-relative indices, float32 values).
Observer = Callable[[Contribution, np.ndarray, np.ndarray], None]
#: Domain separation for the state hash.
_STATE_HASH_TAG = b"meshtrain-state-v1"


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


# ---------------------------------------------------------------------------------------------------------
# Snapshot
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The accumulator and vector of a replica at one point; with the genesis it rebuilds the state.

    Wire: ``[FORMAT_VERSION, "snapshot", genesis_id(bin32), vv(bin), acc(bin, <i8), state_hash(bin32)]``.
    """

    genesis_id: str
    version_vector: VersionVector
    accumulator: bytes
    state_hash: str

    def encode(self) -> bytes:
        return _wire.pack([FORMAT_VERSION, "snapshot", bytes.fromhex(self.genesis_id),
                           self.version_vector.encode(), self.accumulator, bytes.fromhex(self.state_hash)])

    @classmethod
    def decode(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Snapshot:
        """Parse (shape only: :meth:`ModelState.from_snapshot` checks it against a genesis)."""
        tag = "snapshot"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=6,
                                 max_bytes=2 * limits.max_genesis_bytes + MAX_VV_BYTES + 256)
        _, _, gid, vv_raw, acc, sh = obj
        _wire.expect(_wire.is_bytes(gid, HASH_BYTES), tag, "genesis id must be 32 bytes")
        _wire.expect(_wire.is_bytes(vv_raw), tag, "version vector must be bin")
        _wire.expect(_wire.is_bytes(acc) and len(acc) % 8 == 0, tag, "accumulator must be bin of int64")
        _wire.expect(_wire.is_bytes(sh, HASH_BYTES), tag, "state hash must be 32 bytes")
        snap = cls(gid.hex(), VersionVector.decode(vv_raw), acc, sh.hex())
        _wire.expect(snap.encode() == bytes(data), tag, "non-canonical encoding")
        return snap


# ---------------------------------------------------------------------------------------------------------
# ModelState
# ---------------------------------------------------------------------------------------------------------


class ModelState:
    """One replica's model. Not thread-safe; pure (no I/O, no clock, no randomness)."""

    def __init__(self, genesis: Genesis, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._genesis = genesis
        self._limits = _with_genesis_clip(genesis, limits)
        self._acc = np.zeros(genesis.length, dtype=np.int64)
        self._vv: dict[bytes, int] = {}
        self._floor: dict[bytes, int] = {}  # seqs <= floor[author] are applied but no longer retained
        self._log: dict[bytes, dict[int, Contribution]] = {}  # retained applied contributions
        self._pending: dict[bytes, dict[int, Contribution]] = {}  # verified, waiting for a gap to fill
        self._pending_count = 0
        self._cache_vv: VersionVector | None = None
        self._cache_hash: str | None = None
        self._frag_hash: list[bytes | None] = [None] * len(genesis.fragments)

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
        return sum(self._vv.values())

    @property
    def pending_count(self) -> int:
        return self._pending_count

    @property
    def retained_count(self) -> int:
        """Applied contributions still held as records (servable to peers; the rest were compacted)."""
        return sum(len(log) for log in self._log.values())

    @property
    def retention_floor(self) -> VersionVector:
        """Per author, the highest seq no longer retained (0 = full history)."""
        return VersionVector.from_dict(self._floor)

    @property
    def accumulator(self) -> np.ndarray:
        """Read-only view of the int64 accumulator (for tests and diagnostics)."""
        view = self._acc.view()
        view.flags.writeable = False
        return view

    @property
    def state_hash(self) -> str:
        """Hex blake2b-256 of (genesis id, version-vector digest, per-fragment blake2b-256 of the
        little-endian accumulator). Equal exactly when the applied contribution sets are equal."""
        if self._cache_hash is None:
            # Two levels: one blake2b per fragment of the accumulator, cached and recomputed only for
            # fragments that changed (an apply touches one fragment, so a digest after it costs
            # 1/num_fragments of a full pass), then a hash over those and the vector.
            h = hashlib.blake2b(_STATE_HASH_TAG, digest_size=HASH_BYTES)
            h.update(bytes.fromhex(self._genesis.id))
            h.update(self.version_vector.digest())
            for i, (start, stop) in enumerate(self._genesis.fragments):
                if self._frag_hash[i] is None:
                    chunk = self._acc[start:stop].astype("<i8", copy=False)
                    self._frag_hash[i] = hashlib.blake2b(memoryview(chunk).cast("B"),
                                                         digest_size=HASH_BYTES).digest()
                h.update(self._frag_hash[i])  # type: ignore[arg-type]
            self._cache_hash = h.hexdigest()
        return self._cache_hash

    def digest(self) -> Digest:
        return Digest(self.version_vector, self.state_hash, self.contribution_count)

    def materialize(self) -> np.ndarray:
        """float32(base + acc * QUANTUM), computed in float64 elementwise (deterministic)."""
        out = self._genesis.params.astype(np.float64) + self._acc.astype(np.float64) * QUANTUM
        return out.astype(np.float32)

    def get(self, author: bytes, seq: int) -> Contribution | None:
        """A retained applied contribution, or None (unknown, pending or compacted)."""
        return self._log.get(author, {}).get(seq)

    def next_seq(self, author: bytes) -> int:
        return self._vv.get(author, 0) + 1

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

    # -- write side ------------------------------------------------------------------------------------
    def apply(
        self,
        c: Contribution,
        *,
        observe: Observer | None = None,
        before_commit: Callable[[Contribution], None] | None = None,
    ) -> ApplyOutcome:
        """Verify and apply (or buffer) one contribution.

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
            GapTooLargeError: too far ahead to buffer; fetch the gap first.
        """
        c.check_fields(self._limits)
        if c.genesis_id != self._genesis.id:  # first: a replay from another run is neither a duplicate
            raise GenesisMismatchError(  # nor an equivocation of its author here
                f"contribution: signed for genesis {c.genesis_id[:16]}, not {self._genesis.id[:16]}")
        author, seq = c.author, c.seq
        have = self._vv.get(author, 0)
        known = self.get(author, seq) if seq <= have else self._pending.get(author, {}).get(seq)
        if known is not None or seq <= have:
            if known is None or known.id == c.id:  # None: compacted away; cannot compare, assume same
                return ApplyOutcome.DUPLICATE
            c.verify(self._limits)  # only a *signed* second version is an equivocation
            raise ConflictError(f"contribution: author equivocated at seq {seq}", (known, c))
        c.verify(self._limits)
        if seq == have + 1:
            self._add(c, observe, before_commit)
            self._drain(author, observe)
            return ApplyOutcome.APPLIED
        c.validate_against(self._genesis, self._limits)  # buffer only contributions that will apply
        if seq - have > self._limits.max_buffered_gap:
            raise GapTooLargeError(
                f"contribution: seq {seq} is {seq - have} ahead of the author's prefix "
                f"(limit {self._limits.max_buffered_gap})")
        if self._pending_count >= self._limits.max_buffered_total:
            raise GapTooLargeError(f"contribution: buffer full ({self._limits.max_buffered_total})")
        if before_commit is not None:
            before_commit(c)
        self._pending.setdefault(author, {})[seq] = c
        self._pending_count += 1
        return ApplyOutcome.BUFFERED

    def _add(
        self,
        c: Contribution,
        observe: Observer | None = None,
        before_commit: Callable[[Contribution], None] | None = None,
    ) -> None:
        indices, values = c.validate_against(self._genesis, self._limits)
        if before_commit is not None:
            before_commit(c)
        if observe is not None:
            observe(c, indices, values)
        start = self._genesis.fragments[c.fragment][0]
        v64 = values.astype(np.float64)
        factor = clip_factor(v64, c.weight, self._limits.clip_norm)
        if factor is None:
            delta = np.rint(v64 * c.weight * _SCALE).astype(np.int64)
        else:
            delta = np.rint(v64 * c.weight * factor * _SCALE).astype(np.int64)
        target = indices.astype(np.int64) + start
        self._acc[target] += delta  # indices are unique (strictly increasing), so no np.add.at needed
        self._vv[c.author] = c.seq
        self._log.setdefault(c.author, {})[c.seq] = c
        self._cache_vv = None
        self._cache_hash = None
        self._frag_hash[c.fragment] = None

    def _drain(self, author: bytes, observe: Observer | None = None) -> None:
        waiting = self._pending.get(author)
        while waiting and (self._vv[author] + 1) in waiting:
            self._add(waiting.pop(self._vv[author] + 1), observe)
            self._pending_count -= 1
        if waiting is not None and not waiting:
            del self._pending[author]

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
            for s in range(self._floor.get(author, 0) + 1, cut + 1):
                dropped += log.pop(s, None) is not None
            self._floor[author] = cut
        return dropped

    # -- whole-state operations ------------------------------------------------------------------------
    def copy(self) -> ModelState:
        other = ModelState(self._genesis, limits=self._limits)
        other._acc = self._acc.copy()
        other._vv = dict(self._vv)
        other._floor = dict(self._floor)
        other._log = {a: dict(m) for a, m in self._log.items()}
        other._pending = {a: dict(m) for a, m in self._pending.items()}
        other._pending_count = self._pending_count
        other._frag_hash = list(self._frag_hash)
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
        for _author, waiting in sorted(other._pending.items()):
            for _, c in sorted(waiting.items()):
                with contextlib.suppress(GapTooLargeError):  # buffering is best-effort, bounded by Limits
                    out.apply(c)
        return out

    def snapshot(self) -> Snapshot:
        return Snapshot(self._genesis.id, self.version_vector, self._acc.astype("<i8").tobytes(),
                        self.state_hash)

    @classmethod
    def from_snapshot(
        cls,
        genesis: Genesis,
        snapshot: Snapshot | None,
        *,
        log: Iterable[Contribution] = (),
        limits: Limits = DEFAULT_LIMITS,
    ) -> ModelState:
        """Rebuild a replica from a snapshot (None: the genesis state) and the contributions logged beside it.

        Logged contributions the snapshot covers stay servable history as far as they run unbroken down
        from their author's seq in the snapshot; below that, history counts as compacted. Keeping them is
        what lets a restarted node, or one that adopted a peer's snapshot, go on serving what it retained:
        otherwise its retention floor would jump to the snapshot's vector, and two such nodes could each
        lack what the other compacted. They are not re-verified (they come from this replica's own log
        or state; receivers verify whatever is served). The others are applied on top, lowest seqs first;
        one that fails validation is skipped, as it would be on receipt.

        Raises:
            GenesisMismatchError: snapshot of another genesis or of another model size.
            ValidationError: the snapshot's state hash does not match its content.
        """
        state = cls(genesis, limits=limits)
        if snapshot is not None:
            if snapshot.genesis_id != genesis.id:
                raise GenesisMismatchError("snapshot: belongs to a different genesis")
            if len(snapshot.accumulator) != 8 * genesis.length:
                raise GenesisMismatchError("snapshot: accumulator size does not match the genesis model")
            state._acc = np.frombuffer(snapshot.accumulator, dtype="<i8").astype(np.int64)
            state._vv = dict(snapshot.version_vector.items())
            state._floor = dict(state._vv)
            _wire.expect(
                state.state_hash == snapshot.state_hash, "snapshot", "state hash does not match content"
            )
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
            state._floor[author] = seq
        for c in sorted(later, key=lambda c: (c.seq, c.author)):
            with contextlib.suppress(CrdtError):
                state.apply(c)
        return state

    def records(self) -> list[Contribution]:
        """Every contribution held as a record: the retained applied ones and the buffered ones."""
        held = [c for log in self._log.values() for c in log.values()]
        return held + [c for waiting in self._pending.values() for c in waiting.values()]

    def apply_all(self, contributions: Iterable[Contribution]) -> list[ApplyOutcome]:
        """Convenience: apply in order, stopping at the first exception."""
        return [self.apply(c) for c in contributions]


def clip_factor(values: np.ndarray, weight: float, clip_norm: float | None) -> float | None:
    """The deterministic scale that brings ``weight * values`` down to ``clip_norm`` (None: no clipping).

    ``math.fsum`` of the squares is exactly rounded, and sqrt/multiply/divide are correctly rounded IEEE
    operations, so every replica computes the same factor bit for bit (numpy's pairwise sum may differ
    across SIMD code paths, which is fine for a rejection bound but not for the accumulated value).
    """
    if clip_norm is None:
        return None
    v64 = values.astype(np.float64, copy=False)
    norm = math.sqrt(math.fsum((v64 * v64).tolist())) * weight
    if norm <= clip_norm:
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

