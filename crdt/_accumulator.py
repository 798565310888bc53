"""The int64 fixed-point accumulator of a ModelState: exact arithmetic, content digests, memory bounds.

Fixed point: quantum, range, overflow
-------------------------------------
The model is ``genesis.params + QUANTUM * acc``. A contribution adds
``rint(float64(value) * weight [* clip factor] * 2**SCALE_BITS)`` at its entries.

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
  convergence. The same group structure makes subtraction an exact undo (:meth:`Accumulator.hashes_without`).
* ``materialize`` computes ``float32(float64(base) + float64(acc) * 2**-32)`` elementwise: every step is
  one correctly rounded IEEE operation, so all peers get the same bytes.

Memory
------
The accumulator is held packed (crdt/_packed.py): 4 bytes per parameter while an entry's accumulated
update stays within +-0.5 model units (int32 at SCALE_BITS = 32), 8 more in a block of 2**16 entries
once one of them has left that range; the values and every result are those of one int64 vector, bit
for bit. With the genesis' 4 that makes a state 8 bytes per parameter. Every operation here works in
blocks of ``_BLOCK`` entries (hashing, materialize, snapshot encoding) or per contribution, so none
needs a second model-sized array. Measured at 101M parameters (bench/probe_memory.py, 2026-12-01): the
process holding a state with four rice-q8 contributions (the interpreter and the daemon's imports, 1.2,
included) was 13.9 bytes per parameter with the plain int64 vector, 10.5 packed. The old
``materialize`` built three float64 copies (24 bytes per parameter) and ``snapshot()`` copied the
accumulator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from crdt import _wire
from crdt._packed import FrozenPacked, PackedInt64
from crdt.records import HASH_BYTES, Genesis
from crdt.snapshot import SnapshotHeader, encode_snapshot

__all__ = ["QUANTUM", "SCALE_BITS", "Accumulator", "FrozenAccumulator"]

#: Fractional bits of the accumulator (see the module docstring for the range/overflow analysis).
SCALE_BITS = 32
#: Value of one accumulator unit in model units.
QUANTUM = 2.0**-SCALE_BITS
_SCALE = float(2**SCALE_BITS)
#: Entries materialized or hashed per step: 2**20 keeps the temporaries at 8 MiB whatever the model size.
_BLOCK = 2**20

Delta = tuple[int, np.ndarray, np.ndarray]
"""(fragment, accumulator indices, int64 amounts): what one contribution adds."""


def to_fixed(genesis: Genesis, fragment: int, indices: np.ndarray, values: np.ndarray, scale: float,
             factor: float | None) -> Delta:
    """The fixed-point delta of ``values * scale [* factor]`` at ``indices`` of ``fragment``: a pure
    function of the record, the same integers on every replica."""
    scaled = values.astype(np.float64) * scale
    if factor is not None:
        scaled *= factor
    scaled *= _SCALE
    target = indices.astype(np.int64) + genesis.fragments[fragment][0]
    return fragment, target, np.rint(scaled).astype(np.int64)


class Accumulator:
    """The packed int64 accumulator, its cached per-fragment digests and a change counter. Not
    thread-safe."""

    def __init__(self, genesis: Genesis, values: PackedInt64 | None = None,
                 fragment_hashes: Iterable[bytes | None] | None = None) -> None:
        self.genesis = genesis
        # zeros are calloc: pages are only touched as updates land
        self.values = PackedInt64(genesis.length) if values is None else values
        self._hashes: list[bytes | None] = (
            [None] * len(genesis.fragments) if fragment_hashes is None else list(fragment_hashes))
        self.generation = 0
        """Bumped on every change; a snapshot stream being written checks it."""

    def copy(self) -> Accumulator:
        return Accumulator(self.genesis, self.values.copy(), self._hashes)

    def add(self, delta: Delta) -> None:
        fragment, target, amounts = delta
        self.values.add(target, amounts)  # indices are unique (strictly increasing)
        self._hashes[fragment] = None
        self.generation += 1

    def fragment_hashes(self) -> list[bytes]:
        """blake2b-256 of each fragment, recomputed only for fragments changed since the last call."""
        return _fill_hashes(self.genesis, self.values, self._hashes)

    def hashes_without(self, deltas: list[Delta]) -> list[bytes]:
        """The fragment digests the accumulator would have without ``deltas`` (applied ones): each touched
        fragment is hashed a block at a time, the deltas subtracted from the block's int64 copy (wrapping,
        as the group requires); the accumulator itself is not touched."""
        current = list(self.fragment_hashes())
        for fragment in {d[0] for d in deltas}:
            minus = [d for d in deltas if d[0] == fragment]
            current[fragment] = _fragment_digest(self.values, self.genesis.fragments[fragment], minus)
        return current

    def materialize(self, out: np.ndarray | None) -> np.ndarray:
        return _materialize(self.genesis, self.values, out)

    def parts(self, header: SnapshotHeader) -> Iterator[bytes]:
        generation = self.generation
        for part in encode_snapshot(self.genesis, header, self.values):
            if self.generation != generation:
                raise RuntimeError("ModelState changed while its snapshot was being encoded")
            yield part

    def freeze(self, *, hashed: bool) -> FrozenAccumulator:
        """The values as they are now, readable from one other thread while this one goes on adding, to
        encode once (``hashed``: the state hash is known) or to hash and then encode."""
        return FrozenAccumulator(self.genesis, self.values.freeze(1 if hashed else 2), self._hashes,
                                 self.generation)

    def take_hashes(self, hashes: list[bytes | None]) -> None:
        """Fill the digests not cached here from a frozen view's of this very generation (the caller
        checks it)."""
        self._hashes = [mine or theirs for mine, theirs in zip(self._hashes, hashes, strict=True)]


class FrozenAccumulator:
    """An :class:`Accumulator` frozen at one generation (copy-on-write, crdt/_packed.py): its digests and
    snapshot stream, computed in whatever thread calls them. Close it when done."""

    def __init__(self, genesis: Genesis, values: FrozenPacked, hashes: list[bytes | None], generation: int
                 ) -> None:
        self.genesis = genesis
        self.values = values
        self.hashes = list(hashes)
        self.generation = generation

    def fragment_hashes(self) -> list[bytes]:
        return _fill_hashes(self.genesis, self.values, self.hashes)

    def parts(self, header: SnapshotHeader) -> Iterator[bytes]:
        return encode_snapshot(self.genesis, header, self.values)

    def materialize(self, out: np.ndarray | None) -> np.ndarray:
        return _materialize(self.genesis, self.values, out)

    def close(self) -> None:
        self.values.close()


def _materialize(genesis: Genesis, values: PackedInt64 | FrozenPacked, out: np.ndarray | None) -> np.ndarray:
    """``float32(float64(base) + float64(acc) * 2**-32)``, a block at a time (see the module docstring)."""
    n = genesis.length
    if out is None:
        out = np.empty(n, dtype=np.float32)
    _wire.expect(out.dtype == np.float32 and out.shape == (n,) and out.flags.writeable, "materialize",
                 f"out must be a writeable float32 array of shape ({n},)")
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        block = values.read(start, stop, np.float64)
        block *= QUANTUM
        block += genesis.params[start:stop]
        out[start:stop] = block
    return out


def _fill_hashes(genesis: Genesis, values: PackedInt64 | FrozenPacked,
                 hashes: list[bytes | None]) -> list[bytes]:
    """Hash, in place, the fragments whose digest ``hashes`` lacks (None); returns ``hashes``, now full."""
    for i, span in enumerate(genesis.fragments):
        if hashes[i] is None:
            hashes[i] = _fragment_digest(values, span, [])
    return hashes  # type: ignore[return-value]


def _fragment_digest(values: PackedInt64 | FrozenPacked, span: tuple[int, int], minus: list[Delta]) -> bytes:
    """crdt.snapshot.fragment_digest of the int64 values in ``span`` less ``minus``, in blocks."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    start, stop = span
    for lo in range(start, stop, _BLOCK):
        hi = min(lo + _BLOCK, stop)
        block = values.read(lo, hi)
        for _, target, amounts in minus:
            a, b = np.searchsorted(target, (lo, hi))
            block[target[a:b] - lo] -= amounts[a:b]
        h.update(memoryview(block.astype("<i8", copy=False)).cast("B"))
    return h.digest()
