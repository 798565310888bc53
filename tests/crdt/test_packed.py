"""crdt._packed: a PackedInt64 holds exactly the values of one int64 vector under any adds, wrapping and
widening included; a state whose blocks leave int32 mid-run hashes and snapshots like the int64 one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from crdt_testlib import SIGNERS, contribution, genesis, read_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import crdt._packed as packmod
from crdt import Contribution, Genesis, ModelState, SnapshotHeader, encode_payload, make_contribution
from crdt._packed import PackedInt64
from crdt.snapshot import combine_state_hash, encode_snapshot, fragment_digest

LOW, HIGH = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 entries: a 100-entry vector has 13 of them, so narrow and wide ones sit side by side."""
    monkeypatch.setattr(packmod, "BLOCK_BITS", 3)


def _adds(seed: int, length: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random sparse adds, mostly small, some past int32, some near the int64 edges (to wrap)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        size = int(rng.integers(1, length))
        target = np.sort(rng.choice(length, size=size, replace=False)).astype(np.int64)
        scale = int(rng.choice([1000, 2**30, 2**40, 2**62]))
        out.append((target, rng.integers(-scale, scale, target.size, dtype=np.int64)))
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 12))
def test_any_adds_hold_the_int64_values_bit_for_bit(seed: int, count: int) -> None:
    for bits in (3, 16):  # mixed narrow and wide blocks; one block for the whole vector
        packmod.BLOCK_BITS = bits
        try:
            packed, plain = PackedInt64(100), np.zeros(100, dtype=np.int64)
            for target, amounts in _adds(seed, 100, count):
                packed.add(target, amounts)
                plain[target] += amounts  # the wrapping int64 arithmetic it must match
                assert packed.tobytes() == plain.tobytes()
            for start, stop in ((0, 100), (5, 37), (8, 16), (99, 100), (40, 40)):
                assert packed.read(start, stop).tobytes() == plain[start:stop].tobytes()
                assert packed.read(start, stop, np.float64).tobytes() == plain[start:stop].astype(
                    np.float64).tobytes()
            assert PackedInt64.from_int64(plain).tobytes() == plain.tobytes()
            assert packed.copy().tobytes() == plain.tobytes()
        finally:
            packmod.BLOCK_BITS = 16


def test_only_the_blocks_that_leave_int32_widen(small_blocks: None) -> None:
    packed = PackedInt64(100)
    packed.add(np.arange(0, 100, 3, dtype=np.int64), np.full(34, HIGH, dtype=np.int64))  # fits exactly
    assert not packed.wide and packed.nbytes == 400
    packed.add(np.array([18, 19], dtype=np.int64), np.array([1, -1], dtype=np.int64))  # 18: HIGH + 1
    assert sorted(packed.wide) == [2]  # entries 16..23 only
    assert packed.read(17, 22).tolist() == [0, HIGH + 1, -1, 0, HIGH]
    assert packed.nbytes == 400 + 8 * 8
    packed.add(np.array([18], dtype=np.int64), np.array([-1], dtype=np.int64))
    assert sorted(packed.wide) == [2] and packed.read(18, 19).tolist() == [HIGH]  # wide stays wide
    packed.write(96, np.array([LOW - 1, 0, 0, 1], dtype=np.int64))  # the last, shorter block
    assert sorted(packed.wide) == [2, 12] and packed.read(95, 100).tolist() == [0, LOW - 1, 0, 0, 1]


def _big(g: Genesis, author: int, seq: int, fragment: int, value: float) -> Contribution:
    """A contribution that moves every entry of ``fragment`` by ``value`` model units."""
    n = g.fragment_length(fragment)
    payload = encode_payload("sparse-f32", n, np.arange(n, dtype=np.uint32), np.full(n, value, np.float32))
    return make_contribution(SIGNERS[author], genesis_id=g.id, seq=seq, fragment=fragment, codec="sparse-f32",
                             payload=payload, weight=1.0, base_version=b"\x00" * 32)


def test_a_state_whose_blocks_widen_mid_run_hashes_and_snapshots_as_int64(small_blocks: None) -> None:
    g = genesis(length=100, n_fragments=3)
    history = [contribution(g, SIGNERS[0], 1), _big(g, 1, 1, 1, 0.4), _big(g, 1, 2, 1, 0.4),
               contribution(g, SIGNERS[0], 2), _big(g, 1, 3, 1, -0.1)]  # 0.8 units at seq 2: past int32
    state, plain = ModelState(g), np.zeros(g.length, dtype=np.int64)
    for c in history:
        state.apply(c)
        _, target, amounts = state._delta(c)
        plain[target] += amounts
        assert state.accumulator.tobytes() == plain.tobytes()
    assert state._acc.values.wide and not state._acc.values._is_wide.all()
    vector = state.version_vector
    expected = combine_state_hash(g.id, vector, [fragment_digest(plain[a:b]) for a, b in g.fragments])
    assert state.state_hash == expected
    header = SnapshotHeader(g.id, vector, expected, True)
    stream = b"".join(state.snapshot_parts())
    assert stream == b"".join(encode_snapshot(g, header, plain))
    back = ModelState.from_own_snapshot(g, read_snapshot(g, stream))
    assert back.state_hash == expected and back.accumulator.tobytes() == plain.tobytes()
    assert sorted(back._acc.values.wide) == sorted(state._acc.values.wide)  # the reader packs alike
    assert back.materialize().tobytes() == state.materialize().tobytes()
    whole = (g.params.astype(np.float64) + plain.astype(np.float64) * 2.0**-32).astype(np.float32)
    assert state.materialize().tobytes() == whole.tobytes()
    # the past state (undoing the widening contributions) hashes as the int64 vector did
    earlier = ModelState(g)
    earlier.apply_all(history[:2])
    assert state.state_hash_at(earlier.version_vector) == earlier.state_hash


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 8),
       cuts=st.lists(st.integers(0, 100), max_size=6))
def test_a_frozen_view_reads_the_values_of_its_moment_whatever_is_added_between_its_reads(
    seed: int, count: int, cuts: list[int]
) -> None:
    """Copy-on-write by block: adds (widening ones included) and writes land between the view's reads,
    which stop mid-block too; every read gives the frozen values, and blocks read whole are not copied."""
    packmod.BLOCK_BITS = 3
    try:
        packed = PackedInt64(100)
        adds = _adds(seed, 100, 2 * count)
        for target, amounts in adds[:count]:
            packed.add(target, amounts)
        frozen = packed.to_int64()
        view = packed.freeze(passes=2)
        bounds = [0, *sorted(cuts), 100]
        later = iter(adds[count:])
        for start, stop in itertools.pairwise(bounds):
            assert view.read(start, stop).tobytes() == frozen[start:stop].tobytes()
            step = next(later, None)
            if step is not None:
                packed.add(*step)
            packed.write(0, packed.read(0, 5) + 2**40)  # a write that widens block 0
        assert view.read(0, 100).tobytes() == frozen.tobytes()  # the second pass: from the copies or as is
        view.close()
        assert not packed._views
        with pytest.raises(RuntimeError):
            view.read(0, 1)
    finally:
        packmod.BLOCK_BITS = 16


def test_a_frozen_view_copies_only_blocks_changed_before_it_read_them(small_blocks: None) -> None:
    packed = PackedInt64(100)
    view = packed.freeze()
    assert view.read(0, 16).tolist() == [0] * 16  # blocks 0 and 1 read whole
    packed.add(np.array([1, 9, 17, 90], dtype=np.int64), np.ones(4, dtype=np.int64))
    assert view.saved_bytes == 2 * 8 * 4  # blocks 2 and 11, narrow: their int32 slices
    packed.add(np.array([17], dtype=np.int64), np.array([2**40], dtype=np.int64))  # widens a saved block
    assert view.saved_bytes == 2 * 8 * 4  # saved once, before the first change
    assert view.read(16, 100).tolist() == [0] * 84
    assert view.saved_bytes == 0  # read whole: the copies are dropped
    packed.add(np.array([20], dtype=np.int64), np.array([1], dtype=np.int64))
    assert view.saved_bytes == 0  # blocks already read are not copied again
    view.close()
    assert packed.read(0, 100)[[1, 9, 17, 20, 90]].tolist() == [1, 1, 2**40 + 1, 1, 1]
