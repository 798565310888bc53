"""Index codings (crdt/_indices.py) and the chunked codec on them: pinned bytes, round trips, strictness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import CHUNKED_CODECS, ValidationError, decode_payload, encode_payload, payload_error_bound

CODEC = "chunked-q2"

# length 10 in chunks of 4 (b = 2) with k = 2: positions (1, 3) (0, 2) (0, 1) -> indices 1 3 4 6 8 9
PINNED_INDICES = np.array([1, 3, 4, 6, 8, 9], np.uint32)
PINNED_VALUES = np.array([1.5, -0.5, 0.5, -1.5, 0.5, 1.5], np.float32)  # scale 0.5, levels 3 -1 1 -3 1 3
PINNED = bytes.fromhex(
    "02000200"  # b = 2, reserved 0, k = 2 (u16)
    "8d04"  # positions 1 3 0 2 | 0 1, two bits each, least significant first
    "0000003f"  # scale 0.5 (f32)
    "270e"  # q2 codes 3 1 2 0 | 2 3
)


def _chunked_selection(rng: np.random.Generator, length: int, bits: int, k: int) -> np.ndarray:
    """A random valid selection: k entries of every chunk (the last: min(k, its length))."""
    size, out = 1 << bits, []
    for start in range(0, length, size):
        span = min(size, length - start)
        out.append(start + np.sort(rng.choice(span, size=min(k, span), replace=False)))
    return np.concatenate(out).astype(np.uint32) if out else np.zeros(0, np.uint32)


def test_decoding_is_pinned() -> None:
    """The layout, bit for bit: a change here splits replicas."""
    idx, vals = decode_payload(CODEC, 10, PINNED)
    np.testing.assert_array_equal(idx, PINNED_INDICES)
    np.testing.assert_array_equal(vals, PINNED_VALUES)
    assert encode_payload(CODEC, 10, PINNED_INDICES, PINNED_VALUES, chunk_bits=2) == PINNED


def test_size_is_fixed_by_layout_and_below_the_gaps() -> None:
    """b + 2 bits and a 64th of a scale per entry, whatever the values; a quarter fewer bytes than
    sparse-q2's varint gaps over a global top-k at density 1/64, with the default 64-entry chunks."""
    rng = np.random.default_rng(0)
    length = 100_000
    idx = _chunked_selection(rng, length, 6, 1)
    vals = rng.standard_normal(idx.size).astype(np.float32)
    n = idx.size
    data = encode_payload(CODEC, length, idx, vals)
    assert n == -(-length // 64) and len(data) == 4 + -(-n * 6 // 8) + 4 * -(-n // 64) + -(-n // 4)
    anywhere = np.sort(rng.choice(length, size=n, replace=False))  # a global top-k: geometric gaps
    assert len(data) < 0.8 * len(encode_payload("sparse-q2", length, anywhere, vals))
    gaps = encode_payload("sparse-q2", length, idx, vals)
    same_values = decode_payload("sparse-q2", length, gaps)[1]  # the same codes: only the indices differ
    assert decode_payload(CODEC, length, data)[1].tobytes() == same_values.tobytes()


@pytest.mark.parametrize(
    ("length", "bits", "k"), [(0, 6, 0), (0, 6, 3), (10, 2, 0), (5, 6, 64), (4096, 12, 7), (9000, 12, 4096)]
)
def test_edge_layouts_round_trip(length: int, bits: int, k: int) -> None:
    idx = _chunked_selection(np.random.default_rng(length), length, bits, k)
    vals = np.linspace(-1, 1, idx.size, dtype=np.float32)
    data = encode_payload(CODEC, length, idx, vals, chunk_bits=bits)
    d_idx, d_vals = decode_payload(CODEC, length, data)
    np.testing.assert_array_equal(d_idx, idx)
    assert np.all(np.abs(d_vals - vals) <= payload_error_bound(CODEC, vals))


def test_dense_input_is_k_equals_the_chunk() -> None:
    vals = np.arange(100, dtype=np.float32)
    idx, _ = decode_payload(CODEC, 100, encode_payload(CODEC, 100, None, vals))
    np.testing.assert_array_equal(idx, np.arange(100))


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    length=st.integers(0, 700),
    bits=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_round_trip(data: st.DataObject, length: int, bits: int, seed: int) -> None:
    k = data.draw(st.integers(0, 1 << bits))
    idx = _chunked_selection(np.random.default_rng(seed), length, bits, k)
    finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)
    vals = np.array(data.draw(st.lists(finite, min_size=idx.size, max_size=idx.size)), np.float32)
    enc = encode_payload(CODEC, length, idx, vals, chunk_bits=bits)
    d_idx, d_vals = decode_payload(CODEC, length, enc)
    np.testing.assert_array_equal(d_idx, idx)
    assert np.all(np.abs(d_vals.astype(np.float64) - vals) <= payload_error_bound(CODEC, vals))
    assert decode_payload(CODEC, length, bytearray(enc))[1].tobytes() == d_vals.tobytes()


@pytest.mark.parametrize(
    ("indices", "bits", "reason"),
    [
        (np.array([1, 3, 4]), 2, "same k=2 in every chunk"),  # chunk 1 has one
        (np.array([1, 3, 4, 6, 8]), 2, "same k=2"),  # the last chunk (8, 9) holds min(2, 2) = 2
        (np.array([0]), 0, "chunk_bits"),
        (np.array([0]), 17, "chunk_bits"),
    ],
)
def test_encode_rejects(indices: np.ndarray, bits: int, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        encode_payload(CODEC, 10, indices, np.ones(indices.size), chunk_bits=bits)


def _patched(offset: int, value: bytes) -> bytes:
    return PINNED[:offset] + value + PINNED[offset + len(value) :]


@pytest.mark.parametrize(
    ("length", "data", "reason"),
    [
        (10, PINNED[:3], "shorter than its 4-byte header"),
        (10, _patched(0, b"\x00"), "chunk bits 0"),
        (10, _patched(0, b"\x11"), "chunk bits 17"),
        (10, _patched(1, b"\x01"), "reserved 0"),
        (10, _patched(2, b"\x05\x00"), "k=5 entries per chunk of 4"),
        (10, PINNED[:-1], "must be 12 bytes"),
        (10, PINNED + b"\x00", "must be 12 bytes"),
        (17, PINNED, "must be 14 bytes"),  # 5 chunks, the last of 1 entry: n = 9
        (10, _patched(5, b"\x14"), "padding bits"),  # bit 12 set: past the 6 x 2 position bits
        (10, _patched(4, b"\x87"), "increase strictly"),  # chunk 0 positions (3, 1)
        (10, _patched(5, b"\x0c"), "out of range"),  # last chunk (0, 3): index 11 of 10
        (10, _patched(6, np.array([-0.5], "<f4").tobytes()), "scales"),
        (10, _patched(6, np.array([3e38], "<f4").tobytes()), "decoded values"),
        (10, _patched(11, b"\x1e"), "q2 padding"),
    ],
)
def test_decode_rejects(length: int, data: bytes, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        decode_payload(CODEC, length, data)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), blob=st.binary(max_size=120))
def test_fuzz_decode_only_validation_error(length: int, blob: bytes) -> None:
    for codec in CHUNKED_CODECS:
        try:
            idx, vals = decode_payload(codec, length, blob)
        except ValidationError:
            continue
        assert idx.size == vals.size and np.all(np.isfinite(vals))
        assert idx.size == 0 or (int(idx.max()) < length and bool(np.all(np.diff(idx.astype(np.int64)) > 0)))
