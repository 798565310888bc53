"""PackedInt64: a vector of int64 values held in 4 bytes per entry wherever they fit in 4.

Theory of operation
-------------------
The accumulator (crdt/_accumulator.py) is a vector of exact int64 values, but a real one holds small
numbers: with ``SCALE_BITS = 32`` an entry fits int32 while its accumulated update stays within +-0.5
model units, which the weights of a trained network almost all do. So the vector is cut into blocks of
``2**BLOCK_BITS`` entries (aligned to multiples of that size) and each block is held in one of two forms:

* *narrow* (the start, and the rule): the block's entries live in ``narrow``, one int32 vector of the
  whole length (``np.zeros``: calloc, so the pages of untouched blocks are never resident);
* *wide*: the block has held a value outside int32 once; it has its own int64 array in ``wide`` and its
  slice of ``narrow`` is unused from then on.

Every value stored is the exact int64 value: :meth:`add` computes ``old + amount`` in int64, wrapping
modulo 2**64 exactly as one int64 vector did, and stores the sum narrow only if it fits; if any sum of
an add leaves the int32 range, the blocks holding those entries are widened first (their narrow values
copied into int64, exactly) and the add is done there. Reads (:meth:`read`) widen one range at a time,
so hashing, snapshot encoding and materializing never need an int64 copy of the whole vector. A wide
block never goes back to narrow: that would take a scan per add, and a value that once left the range
tends to stay out of it. Cost: 4 bytes per entry, plus 8 per entry of every wide block (the unused
narrow slice stays: 12 bytes per entry there, when wide blocks are rare).

Rejected: a per-block dtype with one array per block (a Python loop over every block on each add, ~1500
at 100M parameters, where two vectorized passes do); int16 (a block would leave it after ~8e-6 model
units); compressing cold blocks (the accumulator is touched all over by every sparse update).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_BITS", "PackedInt64"]

#: Entries per block, as a power of two: 2**16 (256 KiB narrow, 512 KiB wide) keeps the widened share
#: small when a few parameters (a layer norm's gains) drift past +-0.5 model units.
BLOCK_BITS = 16
_LOW = np.iinfo(np.int32).min
_HIGH = np.iinfo(np.int32).max


class PackedInt64:
    """``length`` int64 values, zero at first, in int32 blocks while they fit (see the module docstring).
    Not thread-safe."""

    def __init__(self, length: int) -> None:
        self.narrow = np.zeros(length, dtype=np.int32)
        self.wide: dict[int, np.ndarray] = {}
        """Block number -> the block's int64 values (the last block may be shorter)."""
        self._is_wide = np.zeros(_block(length - 1) + 1 if length else 0, dtype=bool)

    def __len__(self) -> int:
        return int(self.narrow.size)

    @classmethod
    def from_int64(cls, values: np.ndarray) -> PackedInt64:
        """The packed form of the int64 vector ``values`` (copied)."""
        packed = cls(int(values.size))
        packed.write(0, values)
        return packed

    def copy(self) -> PackedInt64:
        other = PackedInt64.__new__(PackedInt64)
        other.narrow = self.narrow.copy()
        other.wide = {b: w.copy() for b, w in self.wide.items()}
        other._is_wide = self._is_wide.copy()
        return other

    @property
    def nbytes(self) -> int:
        """Bytes held (the narrow vector whether resident or not, and every wide block)."""
        return int(self.narrow.nbytes + sum(w.nbytes for w in self.wide.values()))

    # -- reads ---------------------------------------------------------------------------------------
    def read(self, start: int, stop: int, dtype: type = np.int64) -> np.ndarray:
        """A new array of the values in ``[start, stop)``, converted to ``dtype`` as an int64 vector's
        ``astype`` would (int64: exact)."""
        out = self.narrow[start:stop].astype(dtype)
        if self.wide and stop > start:
            for b in np.flatnonzero(self._is_wide[_block(start) : _block(stop - 1) + 1]) + _block(start):
                lo, hi = max(start, _first(int(b))), min(stop, _first(int(b) + 1))
                out[lo - start : hi - start] = self.wide[int(b)][lo - _first(int(b)) : hi - _first(int(b))]
        return out

    def to_int64(self) -> np.ndarray:
        """The whole vector as one int64 array (8 bytes per entry: for tests and diagnostics)."""
        return self.read(0, len(self))

    def tobytes(self) -> bytes:
        """The whole vector as native int64 bytes, as ``to_int64().tobytes()``."""
        return self.to_int64().tobytes()

    # -- writes --------------------------------------------------------------------------------------
    def write(self, start: int, values: np.ndarray) -> None:
        """Set ``[start, start + len(values))`` to the int64 ``values``, widening the blocks they do not
        fit narrow in."""
        stop = start + int(values.size)
        for b in range(_block(start), _block(stop - 1) + 1 if stop > start else _block(start)):
            lo, hi = max(start, _first(b)), min(stop, _first(b + 1))
            part = values[lo - start : hi - start]
            if not self._is_wide[b] and not _fits(part):
                self._widen(b)
            if self._is_wide[b]:
                self.wide[b][lo - _first(b) : hi - _first(b)] = part
            else:
                self.narrow[lo:hi] = part

    def add(self, target: np.ndarray, amounts: np.ndarray) -> None:
        """``values[target] += amounts`` in wrapping int64 arithmetic; ``target``: strictly increasing
        int64 indices, ``amounts`` int64 of the same length."""
        if self.wide:
            blocks = target >> BLOCK_BITS
            in_wide = self._is_wide[blocks]
            if in_wide.any():
                for b in np.unique(blocks[in_wide]).tolist():
                    lo, hi = np.searchsorted(target, (_first(b), _first(b + 1)))
                    self.wide[b][target[lo:hi] - _first(b)] += amounts[lo:hi]
                narrow = ~in_wide
                target, amounts = target[narrow], amounts[narrow]
        sums = self.narrow[target].astype(np.int64)
        sums += amounts  # wraps modulo 2**64, exactly as the int64 vector did
        if not _fits(sums):
            over = (sums < _LOW) | (sums > _HIGH)
            for b in np.unique(target[over] >> BLOCK_BITS).tolist():
                self._widen(b)
            self.add(target, amounts)  # nothing stored yet: the widened blocks now take the wide path
            return
        self.narrow[target] = sums

    def _widen(self, b: int) -> None:
        lo, hi = _first(b), min(_first(b + 1), len(self))
        self.wide[b] = self.narrow[lo:hi].astype(np.int64)
        self._is_wide[b] = True


def _block(i: int) -> int:
    return i >> BLOCK_BITS


def _first(b: int) -> int:
    return b << BLOCK_BITS


def _fits(values: np.ndarray) -> bool:
    return values.size == 0 or (int(values.min()) >= _LOW and int(values.max()) <= _HIGH)
