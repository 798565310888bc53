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

Frozen views
------------
:meth:`PackedInt64.freeze` returns a :class:`FrozenPacked`: the values as they are at that moment, which
*one other thread* may read (a snapshot being encoded and hashed in a worker, crdt/frozen.py) while the
owner goes on adding. Copy-on-write by block: before an add or write changes a block that a live view
has not yet read whole, the owner saves the block's current values (its narrow slice as int32, or its
wide array) in the view; the view reads saved blocks from there and the others from the live vector.
A lock per view orders the two: the owner saves under it, the reader reads a range under it, so a block
is never read while the owner changes it unless the view already holds its copy. The reader says at
freeze time how many passes it will make over the values (a hash, then an encoding: two); a block read
whole that many times is dropped from the view and never saved again. Memory: at most the packed size
of the blocks written before the reader reached them (4 bytes per entry for narrow ones), and nothing
while nobody writes. Rejected: a full copy at freeze time (4 bytes per entry always, and ~0.2 s of the
owner's time at 100M entries); deferring the owner's writes until the view is closed (records would wait
for a snapshot to be written, seconds at 100M, tens at 1B).

Rejected: a per-block dtype with one array per block (a Python loop over every block on each add, ~1500
at 100M parameters, where two vectorized passes do); int16 (a block would leave it after ~8e-6 model
units); compressing cold blocks (the accumulator is touched all over by every sparse update).
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["BLOCK_BITS", "FrozenPacked", "PackedInt64"]

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
        self._views: list[FrozenPacked] = []
        """Open frozen views: each gets a copy of a block before it changes (see the module docstring)."""

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
        other._views = []
        return other

    def freeze(self, passes: int = 1) -> FrozenPacked:
        """A view of the values as they are now, for one other thread that reads them ``passes`` times,
        front to back; close it when done."""
        view = FrozenPacked(self, passes)
        self._views.append(view)
        return view

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
        if self._views and stop > start:
            self._before_write(np.arange(_block(start), _block(stop - 1) + 1))
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
        if self._views and target.size:
            blocks = target >> BLOCK_BITS  # sorted, since target is
            self._before_write(blocks[np.flatnonzero(np.diff(blocks, prepend=-1))])
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

    def _before_write(self, blocks: np.ndarray) -> None:
        for view in tuple(self._views):  # a copy: a view may be closed from another thread meanwhile
            view._save(blocks)

    def _block_copy(self, b: int) -> np.ndarray:
        """Block ``b``'s values in their current form, copied: int64 if wide, else its int32 slice."""
        if self._is_wide[b]:
            return self.wide[b].copy()
        return self.narrow[_first(b) : min(_first(b + 1), len(self))].copy()

    def _widen(self, b: int) -> None:
        lo, hi = _first(b), min(_first(b + 1), len(self))
        self.wide[b] = self.narrow[lo:hi].astype(np.int64)
        self._is_wide[b] = True


class FrozenPacked:
    """The values of a :class:`PackedInt64` when :meth:`PackedInt64.freeze` was called; :meth:`read` may
    run in one other thread while the owner writes (see the module docstring). Each block may be read
    whole ``passes`` times; close the view when done (the owner stops saving blocks for it). Reading a
    closed view, or a block more often than promised, is a caller bug."""

    def __init__(self, live: PackedInt64, passes: int) -> None:
        self._live: PackedInt64 | None = live
        self._length = len(live)
        self._passes = passes
        self._lock = threading.Lock()
        self._saved: dict[int, np.ndarray] = {}
        self._reads = np.zeros(live._is_wide.size, dtype=np.int32)  # times each block was read whole

    def __len__(self) -> int:
        return self._length

    @property
    def saved_bytes(self) -> int:
        """Bytes held by the copies of blocks the owner changed before they were read."""
        with self._lock:
            return sum(a.nbytes for a in self._saved.values())

    def read(self, start: int, stop: int, dtype: type = np.int64) -> np.ndarray:
        """A new array of the frozen values in ``[start, stop)``, as :meth:`PackedInt64.read`."""
        out = np.empty(max(0, stop - start), dtype=dtype)
        with self._lock:
            live = self._live
            if live is None:
                raise RuntimeError("FrozenPacked: read after close")
            for b in range(_block(start), _block(stop - 1) + 1 if stop > start else _block(start)):
                first, end = _first(b), min(_first(b + 1), self._length)
                lo, hi = max(start, first), min(stop, end)
                saved = self._saved.get(b)
                if saved is not None:
                    out[lo - start : hi - start] = saved[lo - first : hi - first]
                else:
                    out[lo - start : hi - start] = live.read(lo, hi, dtype)
                if lo == first and hi == end:
                    self._reads[b] += 1
                    if self._reads[b] >= self._passes:
                        self._saved.pop(b, None)
        return out

    def close(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live._views.remove(self)
                self._live = None
                self._saved.clear()

    def _save(self, blocks: np.ndarray) -> None:
        """The owner is about to change ``blocks`` (unique block numbers): keep what this view needs."""
        with self._lock:
            if self._live is None:
                return  # closed since the owner listed it
            for b in blocks[self._reads[blocks] < self._passes].tolist():
                if b not in self._saved:
                    self._saved[b] = self._live._block_copy(b)


def _block(i: int) -> int:
    return i >> BLOCK_BITS


def _first(b: int) -> int:
    return b << BLOCK_BITS


def _fits(values: np.ndarray) -> bool:
    return values.size == 0 or (int(values.min()) >= _LOW and int(values.max()) <= _HIGH)
