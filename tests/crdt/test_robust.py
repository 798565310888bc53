"""Robust aggregation: deterministic per-contribution norm clipping (Limits.clip_norm / genesis meta)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from crdt_testlib import SIGNERS, contribution, genesis
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import Genesis, GenesisMismatchError, Limits, ModelState, encode_payload, make_contribution
from crdt.state import QUANTUM

G = genesis()


def _big(g: Genesis, seq: int, scale: float) -> object:
    n = g.fragment_length(0)
    values = np.full(n, scale, np.float32)
    payload = encode_payload("dense-f32", n, None, values)
    return make_contribution(SIGNERS[5], genesis_id=g.id, seq=seq, fragment=0, codec="dense-f32",
                             payload=payload, weight=1.0, base_version=b"\x00" * 32)


def test_clipping_bounds_one_contribution() -> None:
    state = ModelState(G, limits=Limits(clip_norm=1.0))
    c = _big(G, 1, 10.0)  # norm 10 * sqrt(32) ~= 56.6
    state.apply(c)
    delta = state.accumulator.astype(np.float64) * QUANTUM
    assert math.isclose(float(np.linalg.norm(delta)), 1.0, rel_tol=1e-6)
    plain = ModelState(G)
    plain.apply(c)
    assert plain.state_hash != state.state_hash  # the option matters...
    small = ModelState(G, limits=Limits(clip_norm=1e3))
    small.apply(c)
    assert small.state_hash == plain.state_hash  # ...and is exactly neutral below the bound


def test_genesis_meta_fixes_clipping_for_every_replica() -> None:
    g = Genesis(G.params, G.fragments, {"task": "test", "clip_norm": "1.0"})
    assert ModelState(g).limits.clip_norm == 1.0  # even when the caller passed default limits
    bad = Genesis(G.params, G.fragments, {"clip_norm": "nan"})
    with pytest.raises(GenesisMismatchError):
        ModelState(bad)
    with pytest.raises(ValueError):
        Limits(clip_norm=-1.0)


HIST = [_big(G, 1, 3.0), _big(G, 2, -7.0)] + [contribution(G, s, q) for s in SIGNERS[:3] for q in (1, 2)]


@settings(max_examples=30, deadline=None)
@given(perm=st.permutations(range(len(HIST))))
def test_clipped_state_is_order_independent(perm: list[int]) -> None:
    reference = ModelState(G, limits=Limits(clip_norm=0.5))
    reference.apply_all(HIST)
    state = ModelState(G, limits=Limits(clip_norm=0.5))
    for i in perm:
        state.apply(HIST[i])
    assert state.state_hash == reference.state_hash
    assert np.array_equal(state.materialize(), reference.materialize())
