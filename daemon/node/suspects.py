"""Suspects: per-author statistics of applied updates, to name likely Byzantine authors in status.

For every applied contribution the tracker keeps its weighted L2 norm and its cosine with the running mean
update of its fragment. An author is suspect when its typical norm is ``SUSPECT_NORM_RATIO`` times the
median author's, or when its updates point, on average, against the others'. It only *reports*:
excluding an author would have to be a deterministic function of the record set (as crdt's norm clipping
is) or replicas would diverge. SECURITY.md says what this does and does not catch.

The replica feeds it the update ``crdt.ModelState.apply`` has already decoded (its ``observe`` hook), so
a payload is decoded once.
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["SuspectTracker"]

#: An author is suspect when its typical update norm is this many times the median author's ...
SUSPECT_NORM_RATIO = 4.0
#: ... or when its updates point, on average, against the running mean update (cosine below this).
SUSPECT_COSINE = -0.2
#: Updates an author must have sent before it can be named (one odd round is not a pattern).
SUSPECT_MIN_UPDATES = 2
_EMA = 0.2  # weight of a new update in the per-fragment running mean update


class SuspectTracker:
    """Per-author statistics of applied updates, to name likely Byzantine authors in status.

    For every applied contribution: its weighted L2 norm, and its cosine with the running mean update of
    its fragment (an exponential moving average of the *other* authors' updates before this one). An
    author is suspect when its median norm is ``SUSPECT_NORM_RATIO`` times the median over authors, or its
    mean cosine is below ``SUSPECT_COSINE`` (honest DiLoCo updates agree in sign with the consensus
    direction; a sign-flipping attacker does not). Report only: see the module docstring. Memory: one
    float32 vector per fragment (the model size) plus a bounded deque of norms per author.
    """

    def __init__(self, fragment_lengths: list[int], *, window: int = 32) -> None:
        self._mean = [np.zeros(n, np.float32) for n in fragment_lengths]
        self._norms: dict[str, deque[float]] = {}
        self._cosines: dict[str, deque[float]] = {}
        self._window = window

    def observe(
        self, author: str, fragment: int, indices: np.ndarray, values: np.ndarray, weight: float
    ) -> None:
        update = np.zeros_like(self._mean[fragment])
        update[indices] = values * np.float32(weight)
        norm = float(np.sqrt(np.dot(update, update)))
        mean = self._mean[fragment]
        mean_norm = float(np.sqrt(np.dot(mean, mean)))
        if norm > 0 and mean_norm > 0:
            cosine = float(np.dot(update, mean)) / (norm * mean_norm)
            self._cosines.setdefault(author, deque(maxlen=self._window)).append(cosine)
        self._norms.setdefault(author, deque(maxlen=self._window)).append(norm)
        # Clip what enters the running mean to the median author's norm, so that one huge update (or one
        # loud author) weighs no more than a typical one in the reference direction.
        typical = self._median_norm()
        if typical > 0 and norm > typical:
            update *= np.float32(typical / norm)
        mean *= np.float32(1 - _EMA)
        mean += np.float32(_EMA) * update

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
