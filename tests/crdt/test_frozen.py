"""crdt.frozen: a state frozen copy-on-write hashes and encodes as it was, in another thread, while the
owner goes on applying; the owner keeps a hash computed there only if nothing changed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from crdt_testlib import SIGNERS, genesis, history, read_snapshot

import crdt._packed as packmod
from crdt import ModelState, encode_payload, make_contribution

G = genesis(length=100, n_fragments=3)


def _replay(records) -> ModelState:
    state = ModelState(G)
    state.apply_all(records)
    return state


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 entries, so that a 100-entry model has 13 and copy-on-write has something to do."""
    monkeypatch.setattr(packmod, "BLOCK_BITS", 3)


def test_a_frozen_state_hashes_and_snapshots_as_it_was_while_the_owner_applies_more() -> None:
    hist = history(G, n_authors=3, per_author=4)
    before, after = hist[:6], hist[6:]
    state = _replay(before)
    expected = _replay(before)
    with state.freeze() as frozen:
        for c in after:  # between the freeze and the hash: all three fragments change
            state.apply(c)
        n = G.fragment_length(1)  # and one that leaves int32 (a block widens under the view)
        widen = make_contribution(SIGNERS[5], genesis_id=G.id, seq=1, fragment=1, codec="sparse-f32",
                                  payload=encode_payload("sparse-f32", n, np.arange(n, dtype=np.uint32),
                                                         np.full(n, 0.9, np.float32)),
                                  weight=1.0, base_version=b"\x00" * 32)
        state.apply(widen)
        assert state._acc.values.wide
        assert frozen.version_vector == expected.version_vector
        assert frozen.state_hash == expected.state_hash
        stream = b"".join(frozen.snapshot_parts())
    assert stream == b"".join(expected.snapshot_parts())
    back = ModelState.from_own_snapshot(G, read_snapshot(G, stream))
    assert back.state_hash == expected.state_hash
    assert state.state_hash == _replay([*hist, widen]).state_hash  # the owner's state is its own
    assert not state._acc.values._views  # closed by the context manager


def test_the_owner_keeps_a_frozen_hash_only_if_nothing_changed_since() -> None:
    hist = history(G, n_authors=2, per_author=3)
    state = _replay(hist[:4])
    with state.freeze() as frozen:
        computed = frozen.state_hash
    state.take_hash(frozen)
    assert state._cache_hash == computed == _replay(hist[:4]).state_hash  # not computed again
    with state.freeze() as frozen:
        state.apply(hist[4])
        stale = frozen.state_hash
    state.take_hash(frozen)
    assert state.state_hash != stale and state.state_hash == _replay(hist[:5]).state_hash


def test_a_worker_thread_encodes_a_frozen_state_while_the_owner_applies() -> None:
    """Real threads: the worker hashes and encodes fragment by fragment while the owner applies records;
    the stream is the frozen state's, bit for bit, however the two interleave."""
    g = genesis(length=4000, n_fragments=4, seed=3)
    hist = history(g, n_authors=4, per_author=6, seed=1)
    expected = ModelState(g)
    expected.apply_all(hist[:8])
    want = b"".join(expected.snapshot_parts())
    for _ in range(5):
        owner = ModelState(g)
        owner.apply_all(hist[:8])
        out: list[bytes] = []
        with owner.freeze() as frozen:
            worker = threading.Thread(target=lambda f=frozen, o=out: o.extend(f.snapshot_parts()))
            worker.start()
            owner.apply_all(hist[8:])
            worker.join()
        assert b"".join(out) == want


def test_a_frozen_state_is_signed_like_the_state_it_was() -> None:
    hist = history(G, n_authors=2, per_author=3)
    state = _replay(hist[:4])
    with state.freeze() as frozen:
        state.apply(hist[4])
        signed = frozen.checkpoint(SIGNERS[0])
    assert signed == _replay(hist[:4]).checkpoint(SIGNERS[0])


def test_a_frozen_state_materializes_as_it_was_and_closes_when_dropped() -> None:
    hist = history(G, n_authors=2, per_author=3)
    state = _replay(hist[:4])
    frozen = state.freeze()
    state.apply(hist[4])
    assert frozen.materialize().tobytes() == _replay(hist[:4]).materialize().tobytes()
    assert state._acc.values._views
    del frozen  # never closed: the owner stops copying blocks for it once it is collected
    assert not state._acc.values._views
