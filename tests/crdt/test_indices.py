"""Index codings (crdt/_indices.py) and the chunked codec on them: pinned bytes, round trips, strictness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    CHUNKED_CODECS,
    RICE_CODECS,
    ValidationError,
    decode_payload,
    encode_payload,
    payload_error_bound,
)

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
    for codec in CHUNKED_CODECS + RICE_CODECS:
        try:
            idx, vals = decode_payload(codec, length, blob)
        except ValidationError:
            continue
        assert idx.size == vals.size and np.all(np.isfinite(vals))
        assert idx.size == 0 or (int(idx.max()) < length and bool(np.all(np.diff(idx.astype(np.int64)) > 0)))


# -- rice-q2 ------------------------------------------------------------------------------------------------

RICE = "rice-q2"
# length 100, indices 0 1 2 50 99: gaps 0 0 0 47 48, one group, cheapest r = 4: quotients 0 0 0 2 3
RICE_INDICES = np.array([0, 1, 2, 50, 99], np.uint32)
RICE_VALUES = np.array([1.5, -0.5, 0.5, -1.5, 0.5], np.float32)  # scale 0.5, levels 3 -1 1 -3 1
RICE_PINNED = bytes.fromhex(
    "05000000" "02000000"  # n = 5, m = 2 unary bytes
    "04"  # r = 4 for the group
    "2702"  # unary: 1 1 1 001 0001 (least significant bit first)
    "00f000"  # remainders, 4 bits each: 0 0 0 15 0
    "0000003f"  # scale 0.5
    "2702"  # q2 codes 3 1 2 0 | 2
)


def test_rice_decoding_is_pinned() -> None:
    idx, vals = decode_payload(RICE, 100, RICE_PINNED)
    np.testing.assert_array_equal(idx, RICE_INDICES)
    np.testing.assert_array_equal(vals, RICE_VALUES)
    assert encode_payload(RICE, 100, RICE_INDICES, RICE_VALUES) == RICE_PINNED


def test_rice_is_sparse_q2_with_cheaper_indices() -> None:
    """The same decoded update as sparse-q2, and far fewer bytes when top-k clusters (a dense tenth in one
    region, a sparse remainder elsewhere, as on real updates)."""
    rng = np.random.default_rng(5)
    length = 200_000
    dense = rng.choice(20_000, size=2_000, replace=False)  # 10 % of one "tensor"
    sparse = 20_000 + rng.choice(180_000, size=1_000, replace=False)
    idx = np.sort(np.concatenate([dense, sparse])).astype(np.uint32)
    vals = rng.standard_normal(idx.size).astype(np.float32)
    rice, gaps = encode_payload(RICE, length, idx, vals), encode_payload("sparse-q2", length, idx, vals)
    r_idx, r_vals = decode_payload(RICE, length, rice)
    g_idx, g_vals = decode_payload("sparse-q2", length, gaps)
    np.testing.assert_array_equal(r_idx, g_idx)
    assert r_vals.tobytes() == g_vals.tobytes()
    value_bytes = 4 * -(-idx.size // 64) + -(-idx.size // 4)
    index_bits = 8 * (len(rice) - 8 - value_bytes) / idx.size
    assert index_bits < 6.5 and len(rice) < 0.8 * len(gaps), index_bits  # varint: ~9.1 bits here


@settings(max_examples=80, deadline=None)
@given(data=st.data(), log_length=st.integers(0, 32), count=st.integers(0, 300))
def test_rice_property_round_trip(data: st.DataObject, log_length: int, count: int) -> None:
    """Any strictly increasing selection, gaps from 0 to 2**32 - 2 (every Rice parameter gets used)."""
    length = min(2**log_length, 2**32 - 1)
    picks = data.draw(st.sets(st.integers(0, length - 1), max_size=min(count, length)))
    idx = np.array(sorted(picks), np.uint32)
    vals = np.linspace(-1, 1, idx.size, dtype=np.float32)
    enc = encode_payload(RICE, length, idx, vals)
    d_idx, d_vals = decode_payload(RICE, length, enc)
    np.testing.assert_array_equal(d_idx, idx)
    assert np.all(np.abs(d_vals - vals) <= payload_error_bound(RICE, vals))


def _rice_patched(offset: int, value: bytes) -> bytes:
    return RICE_PINNED[:offset] + value + RICE_PINNED[offset + len(value) :]


_HUGE_QUOTIENT = (  # one gap: r = 31 and quotient 2, i.e. 2**32 or more
    np.array([1, 1], "<u4").tobytes() + b"\x1f" + b"\x04" + bytes(4)
    + np.array([1.0], "<f4").tobytes() + b"\x03"
)


@pytest.mark.parametrize(
    ("length", "data", "reason"),
    [
        (100, RICE_PINNED[:8], "shorter than its Rice parameters"),
        (100, _rice_patched(8, b"\x20"), "parameter is above 31"),
        (100, RICE_PINNED[:-1], "must be 20 bytes"),
        (100, _rice_patched(9, b"\x23"), "do not hold exactly 5 quotients"),  # bit 2 cleared: 4 ones
        (100, _rice_patched(4, b"\x03")[:11] + b"\x00" + RICE_PINNED[11:], "do not hold exactly 5"),  # m = 3
        (100, _rice_patched(13, b"\x10"), "padding bits"),
        (40, RICE_PINNED, "gap is out of range"),
        (60, RICE_PINNED, "index 99 out of range"),
        (2**32 - 1, _HUGE_QUOTIENT, "gap is out of range"),
        (100, _rice_patched(14, np.array([-0.5], "<f4").tobytes()), "scales"),
    ],
)
def test_rice_decode_rejects(length: int, data: bytes, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        decode_payload(RICE, length, data)


RICE_Q8_PINNED = bytes.fromhex(
    "05000000" "02000000" "04" "2702" "00f000"  # the indices of RICE_PINNED
    "0ad7233c"  # scale float32(1.27 / 127)
    "7fff328100"  # i8 codes 127 -1 50 -127 0
)


def test_rice_q8_is_sparse_q8_with_rice_gaps() -> None:
    values = np.array([1.27, -0.01, 0.5, -1.27, 0.0], np.float32)
    assert encode_payload("rice-q8", 100, RICE_INDICES, values) == RICE_Q8_PINNED
    idx, vals = decode_payload("rice-q8", 100, RICE_Q8_PINNED)
    s_idx, s_vals = decode_payload("sparse-q8", 100, encode_payload("sparse-q8", 100, RICE_INDICES, values))
    np.testing.assert_array_equal(idx, s_idx)
    assert vals.tobytes() == s_vals.tobytes()
    with pytest.raises(ValidationError, match="-128 is reserved"):
        decode_payload("rice-q8", 100, RICE_Q8_PINNED[:-1] + b"\x80")
