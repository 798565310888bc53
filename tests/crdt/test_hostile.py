"""Hostile contributions against ModelState: every rejection is a ValidationError, a rejected record
changes nothing, and the gap buffer stays bounded however far ahead an attacker numbers its records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from crdt_testlib import SIGNERS, contribution, genesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import (
    GapTooLargeError,
    Limits,
    ModelState,
    Signer,
    ValidationError,
    encode_payload,
    make_contribution,
)
from crdt.records import Contribution

G = genesis()
HONEST = [contribution(G, s, q) for s in SIGNERS[:2] for q in (1, 2)]
LIMITS = Limits(max_buffered_gap=16, max_buffered_total=32)


def _signed(
    seq: int, fragment: int, codec: str, payload: bytes, weight: float, signer: Signer
) -> Contribution:
    return make_contribution(
        signer,
        genesis_id=G.id,
        seq=seq,
        fragment=fragment,
        codec=codec,
        payload=payload,
        weight=weight,
        base_version=b"\x00" * 32,
    )


_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_hostile = st.builds(
    dict,
    seq=st.one_of(st.integers(1, 40), st.integers(1, 2**62)),
    fragment=st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
    codec=st.sampled_from(["dense-f32", "sparse-f32", "sparse-q8"]),
    payload=st.one_of(st.binary(max_size=64), st.lists(_floats, min_size=32, max_size=32)),
    weight=st.one_of(st.floats(1e-6, 1e7), st.sampled_from([1.0, 1e6])),
    signer=st.sampled_from(SIGNERS[2:5]),
    forge=st.booleans(),
)


def _build(spec: dict) -> Contribution | None:
    payload = spec["payload"]
    if isinstance(payload, list):
        values = np.array(payload, np.float32)
        payload = np.nan_to_num(values).astype("<f4").tobytes() if spec["codec"] == "dense-f32" else b""
        if spec["codec"] == "dense-f32":
            payload = values.astype("<f4").tobytes()  # NaN/Inf kept: the codec must refuse them
    try:
        c = _signed(spec["seq"], spec["fragment"], spec["codec"], payload, spec["weight"], spec["signer"])
    except ValidationError:
        return None  # make_contribution refused it (e.g. weight range): nothing to send
    if spec["forge"]:  # someone else's slot, our bytes: the signature no longer matches
        c = dataclasses.replace(c, author=SIGNERS[0].public_key)
    return c


def _run(specs: list[dict]) -> None:
    state = ModelState(G, limits=LIMITS)
    state.apply_all(HONEST)
    reference = state.copy()
    for spec in specs:
        c = _build(spec)
        if c is None:
            continue
        before = (state.state_hash, state.pending_count)
        try:
            state.apply(c)
        except ValidationError:
            assert (state.state_hash, state.pending_count) == before  # rejected = no effect at all
        assert state.pending_count <= LIMITS.max_buffered_total
        for replay in HONEST[:2]:  # replays and duplicates are harmless no-ops
            state.apply(replay)
    # Honest state is intact: every honest contribution still counted, the hash only moved by accepted ones.
    for c in HONEST:
        assert state.get(c.author, c.seq) == c
    assert state.version_vector.get(SIGNERS[0].public_key) == reference.version_vector.get(
        SIGNERS[0].public_key
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_hostile, max_size=12))
def test_hostile_contributions(specs: list[dict]) -> None:
    _run(specs)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_hostile, max_size=24))
def test_hostile_contributions_slow(specs: list[dict]) -> None:
    _run(specs)


def test_gap_flood_memory_is_bounded() -> None:
    """An attacker with many keys and far-ahead seqs fills at most max_buffered_total slots."""
    state = ModelState(G, limits=LIMITS)
    n = G.fragment_length(0)
    payload = encode_payload("dense-f32", n, None, np.full(n, 1e-3, np.float32))
    refused = 0
    for k in range(64):
        attacker = Signer.from_seed(bytes([k]) * 32)
        for seq in (2, 3, 10**9):
            try:
                state.apply(_signed(seq, 0, "dense-f32", payload, 1.0, attacker))
            except ValidationError:
                refused += 1
    assert state.pending_count == LIMITS.max_buffered_total and refused == 64 * 3 - LIMITS.max_buffered_total
    assert state.contribution_count == 0


def test_buffered_bytes_are_bounded_per_author_and_in_all() -> None:
    """Dense records buffered far ahead: each author holds at most its byte budget, all authors together
    at most the total; honest in-order records still apply, and drop_pending empties the buffer."""
    n = G.fragment_length(0)
    payload = encode_payload("dense-f32", n, None, np.full(n, 1e-3, np.float32))
    size = len(payload)
    limits = Limits(max_buffered_bytes_per_author=3 * size, max_buffered_bytes_total=10 * size)
    state = ModelState(G, limits=limits)
    refused = []
    for k in range(8):
        attacker = Signer.from_seed(bytes([k + 1]) * 32)
        for seq in range(2, 7):
            try:
                state.apply(_signed(seq, 0, "dense-f32", payload, 1.0, attacker))
            except GapTooLargeError as exc:
                refused.append(exc.reason)
    assert state.pending_bytes == 10 * size and state.pending_count == 10
    # authors 1-3 fill their 3 records each and are refused 2 more; author 4 fills the total with one
    per_author = sum("author's buffer is full" in r for r in refused)
    total = sum(f"buffer full ({10 * size} bytes)" in r for r in refused)
    assert (per_author, total) == (3 * 2, 4 + 4 * 5)
    for c in HONEST:
        state.apply(c)
    assert state.contribution_count == len(HONEST)
    assert state.drop_pending([Signer.from_seed(b"\1" * 32).public_key]) == 3
    assert state.pending_bytes == 7 * size
    assert state.drop_pending() == 7 and state.pending_count == 0 and state.pending_bytes == 0
