"""daemon.node.suspects: the flipper is named, and throwaway authors or big models cannot make the
tracker grow or cost O(model) per contribution."""

from __future__ import annotations

import numpy as np

from daemon.node.suspects import MAX_AUTHORS, SKETCH_SIZE, SuspectTracker


def test_suspect_tracker_names_the_flipper() -> None:
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(64).astype(np.float32)
    tracker = SuspectTracker([64])
    idx = np.arange(64, dtype=np.uint32)
    for _round in range(6):
        for author in ("a", "b", "c", "d"):
            honest = direction + 0.5 * rng.standard_normal(64).astype(np.float32)
            tracker.observe(author, 0, idx, 0.01 * honest, 1.0)
        tracker.observe("evil", 0, idx, -0.1 * direction, 1.0)  # sign-flipped, 10x
    assert tracker.suspects() == ["evil"]
    stats = tracker.stats()
    assert stats["evil"]["mean_cosine"] < 0 < stats["a"]["mean_cosine"]


def test_a_sign_flipper_is_named_in_sparse_updates_of_a_large_fragment() -> None:
    rng = np.random.default_rng(1)
    length = 1_000_000
    direction = rng.standard_normal(length).astype(np.float32)
    tracker = SuspectTracker([length])
    for _round in range(6):
        idx = np.sort(rng.choice(length, size=10_000, replace=False)).astype(np.uint32)  # top-k at 1 %
        for author in ("a", "b", "c", "d"):
            honest = direction[idx] + 0.5 * rng.standard_normal(idx.size).astype(np.float32)
            tracker.observe(author, 0, idx, 0.01 * honest, 1.0)
        tracker.observe("evil", 0, idx, -0.01 * direction[idx], 1.0)  # sign-flipped, not louder
    assert tracker.suspects() == ["evil"]
    assert tracker._sketches[0].size == SKETCH_SIZE  # memory does not grow with the fragment


def test_throwaway_authors_are_bounded() -> None:
    tracker = SuspectTracker([64])
    idx = np.arange(8, dtype=np.uint32)
    for i in range(MAX_AUTHORS + 500):
        tracker.observe(f"sybil-{i}", 0, idx, np.full(8, 0.01, np.float32), 1.0)
    assert len(tracker.stats()) == MAX_AUTHORS
    assert "sybil-0" not in tracker.stats() and f"sybil-{MAX_AUTHORS + 499}" in tracker.stats()
