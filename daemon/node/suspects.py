"""Suspects: per-author statistics of applied updates, to name likely Byzantine authors in status.

For every applied contribution the tracker keeps its weighted L2 norm and its cosine with the running mean
update of its fragment. An author is suspect when its typical norm is ``SUSPECT_NORM_RATIO`` times the
median author's, or when its updates point, on average, against the others'. It only *reports*:
excluding an author would have to be a deterministic function of the record set (as crdt's norm clipping
is) or replicas would diverge. SECURITY.md says what this does and does not catch.

Cost, at the sizes users run: the direction is compared in a CountSketch of ``SKETCH_SIZE`` buckets per
fragment (each entry hashed to a bucket with a sign; inner products are preserved in expectation), so an
observation costs O(entries of the update), not O(fragment), and memory is a few hundred kB however
large the model is (a dense running mean would add 4 bytes per parameter to the daemon and 24 MB of
work per contribution at 100M parameters). The median norm over authors is recomputed every
``max(1, authors // MEDIAN_EVERY_FRACTION)`` observations, and at most ``MAX_AUTHORS`` authors are
tracked (the least recently seen are dropped): throwaway authors cannot make it cost O(authors) per
contribution or grow without bound.

The replica feeds it the update ``crdt.ModelState.apply`` has already decoded (its ``observe`` hook), so
a payload is decoded once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import NamedTuple

import numpy as np

__all__ = ["Measure", "SuspectTracker"]

#: An author is suspect when its typical update norm is this many times the median author's ...
SUSPECT_NORM_RATIO = 4.0
#: ... or when its updates point, on average, against the running mean update (cosine below this).
SUSPECT_COSINE = -0.2
#: Updates an author must have sent before it can be named (one odd round is not a pattern).
SUSPECT_MIN_UPDATES = 2
_EMA = 0.2  # weight of a new update in the per-fragment running mean update
#: Buckets of the per-fragment sketch: cosine estimates within ~1/sqrt(4096) of exact for dense updates.
SKETCH_SIZE = 4096
#: Authors tracked at once; the least recently observed is dropped beyond it.
MAX_AUTHORS = 4096
#: The median over authors is recomputed once per authors/this observations (amortized O(1) each).
MEDIAN_EVERY_FRACTION = 16
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive indices


class Measure(NamedTuple):
    """What an update contributes to the statistics, before they change (`SuspectTracker.measure`)."""

    norm: float
    sketch: np.ndarray


class SuspectTracker:
    """Per-author statistics of applied updates, to name likely Byzantine authors in status.

    For every applied contribution: its weighted L2 norm (exact), and its cosine with the running mean
    update of its fragment (an exponential moving average of the updates before this one, in sketch
    space). Report only: see the module docstring.
    """

    def __init__(self, fragment_lengths: list[int], *, window: int = 32) -> None:
        self._sketches = [np.zeros(min(SKETCH_SIZE, max(n, 1)), np.float64) for n in fragment_lengths]
        self._norms: OrderedDict[str, deque[float]] = OrderedDict()
        self._cosines: dict[str, deque[float]] = {}
        self._window = window
        self._typical = 0.0
        self._since_median = 0

    def _sketch(self, fragment: int, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        size = self._sketches[fragment].size
        hashed = indices.astype(np.uint64) * _HASH_MUL
        buckets = (hashed >> np.uint64(32)) % np.uint64(size)
        signs = np.where((hashed >> np.uint64(31)) & np.uint64(1), -1.0, 1.0)
        out = np.zeros(size, np.float64)
        np.add.at(out, buckets.astype(np.int64), signs * values)
        return out

    def measure(self, fragment: int, indices: np.ndarray, values: np.ndarray, weight: float) -> Measure:
        """The update's weighted norm and its sketch: most of an observation's work (0.1 s for 2 % of 100M
        parameters), reading nothing that changes, so a worker thread may compute it for `observe`."""
        weighted = values.astype(np.float64) * weight
        return Measure(float(np.sqrt(np.dot(weighted, weighted))), self._sketch(fragment, indices, weighted))

    def observe(
        self, author: str, fragment: int, indices: np.ndarray, values: np.ndarray, weight: float,
        measured: Measure | None = None,
    ) -> None:
        """Add one applied update (``measured``: its `measure`, if computed already)."""
        norm, update = measured or self.measure(fragment, indices, values, weight)
        mean = self._sketches[fragment]
        mean_norm = float(np.sqrt(np.dot(mean, mean)))
        sketched_norm = float(np.sqrt(np.dot(update, update)))
        if sketched_norm > 0 and mean_norm > 0:
            cosine = float(np.dot(update, mean)) / (sketched_norm * mean_norm)
            self._cosines.setdefault(author, deque(maxlen=self._window)).append(cosine)
        norms = self._norms.pop(author, None) or deque(maxlen=self._window)
        norms.append(norm)
        self._norms[author] = norms  # most recently observed last
        if len(self._norms) > MAX_AUTHORS:
            dropped, _ = self._norms.popitem(last=False)
            self._cosines.pop(dropped, None)
        self._since_median += 1
        if self._since_median >= max(1, len(self._norms) // MEDIAN_EVERY_FRACTION):
            self._typical = self._median_norm()
            self._since_median = 0
        # Clip what enters the running mean to the median author's norm, so that one huge update (or one
        # loud author) weighs no more than a typical one in the reference direction.
        if self._typical > 0 and norm > self._typical:
            update *= self._typical / norm
        mean *= 1 - _EMA
        mean += _EMA * update

    def _median_norm(self) -> float:
        medians = [float(np.median(v)) for v in self._norms.values() if v]
        return float(np.median(medians)) if medians else 0.0

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            author: {
                "updates": len(norms),
                "median_norm": float(np.median(norms)),
                "mean_cosine": float(np.mean(self._cosines[author])) if self._cosines.get(author) else 0.0,
            }
            for author, norms in self._norms.items()
        }

    def suspects(self) -> list[str]:
        typical = self._median_norm()
        out = []
        for author, st in self.stats().items():
            if st["updates"] < SUSPECT_MIN_UPDATES:
                continue
            if (typical > 0 and st["median_norm"] > SUSPECT_NORM_RATIO * typical) or (
                self._cosines.get(author) and st["mean_cosine"] < SUSPECT_COSINE
            ):
                out.append(author)
        return sorted(out)
