"""Payload codecs: round trips, error bounds, determinism, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crdt
from crdt import (
    CHUNKED_CODECS,
    CODECS,
    DCT_BLOCK,
    DENSE_CODECS,
    TRANSFORM_CODECS,
    ValidationError,
    dct_coefficients,
    decode_payload,
    encode_payload,
    payload_error_bound,
)

QUANT = ("sparse-q8", "sparse-q4", "sparse-q2")
SPARSE = ("sparse-f32", *QUANT)
# indices and values are entries, any selection of them (chunked codecs: tests/crdt/test_indices.py)
ENTRY_CODECS = tuple(c for c in CODECS if c not in TRANSFORM_CODECS + CHUNKED_CODECS)


def _sparse(rng: np.random.Generator, length: int, k: int, scale: float = 1.0):
    idx = np.sort(rng.choice(length, size=k, replace=False)).astype(np.uint32)
    vals = (rng.standard_normal(k) * scale).astype(np.float32)
    return idx, vals


@pytest.mark.parametrize("codec", ENTRY_CODECS)
def test_round_trip_within_bound(codec: str) -> None:
    rng = np.random.default_rng(1)
    length = 1000
    idx, vals = _sparse(rng, length, 300, scale=0.01)
    data = encode_payload(codec, length, idx, vals)
    d_idx, d_vals = decode_payload(codec, length, data)
    assert d_idx.dtype == np.uint32 and d_vals.dtype == np.float32
    if codec in DENSE_CODECS:  # the given entries scattered into zeros
        assert len(data) == {"dense-f32": 4, "dense-bf16": 2}[codec] * length
        dense = np.zeros(length, np.float32)
        dense[idx] = vals
        idx, vals = np.arange(length, dtype=np.uint32), dense
    np.testing.assert_array_equal(d_idx, idx)
    err = np.abs(d_vals.astype(np.float64) - vals.astype(np.float64))
    assert np.all(err <= payload_error_bound(codec, vals))
    # re-encoding the decoded values is a fixed point for quantized codecs (decode o encode idempotent)
    again = decode_payload(codec, length, encode_payload(codec, length, d_idx, d_vals))[1]
    np.testing.assert_array_equal(again, d_vals)


def test_sizes_shrink_with_bits() -> None:
    rng = np.random.default_rng(2)
    idx, vals = _sparse(rng, 100_000, 6400)
    sizes = {c: len(encode_payload(c, 100_000, idx, vals)) for c in SPARSE}
    assert sizes["sparse-f32"] > sizes["sparse-q8"] > sizes["sparse-q4"] > sizes["sparse-q2"]
    gaps = np.diff(idx.astype(np.int64), prepend=-1) - 1
    varint_bytes = sum(max(1, -(-int(g).bit_length() // 7)) for g in gaps)
    assert sizes["sparse-q2"] == 8 + varint_bytes + 4 * 100 + 1600
    assert varint_bytes < 1.1 * 6400  # ~1 byte per index at 6.4 % density (u32 indices took 4)


def test_dense_none_indices_and_empty() -> None:
    vals = np.arange(5, dtype=np.float32)
    for codec in ENTRY_CODECS:
        i, v = decode_payload(codec, 5, encode_payload(codec, 5, None, vals))
        np.testing.assert_array_equal(i, np.arange(5))
        assert np.all(np.abs(v - vals) <= payload_error_bound(codec, vals))
        i, v = decode_payload(codec, 7, encode_payload(codec, 7, np.array([], np.uint32), np.array([])))
        assert v.size == (7 if codec in DENSE_CODECS else 0)


def test_zero_chunk_and_q2_levels() -> None:
    idx = np.arange(4, dtype=np.uint32)
    _, v = decode_payload("sparse-q2", 4, encode_payload("sparse-q2", 4, idx, np.zeros(4, np.float32)))
    np.testing.assert_array_equal(v, np.zeros(4, np.float32))
    vals = np.array([-3.0, -1.0, 1.0, 3.0], np.float32)
    _, v = decode_payload("sparse-q2", 4, encode_payload("sparse-q2", 4, idx, vals))
    np.testing.assert_array_equal(v, vals)


def test_decoding_is_deterministic_bytes() -> None:
    rng = np.random.default_rng(3)
    idx, vals = _sparse(rng, 5000, 777)
    for codec in QUANT:
        data = encode_payload(codec, 5000, idx, vals)
        assert data == encode_payload(codec, 5000, idx.copy(), vals.copy())
        a = decode_payload(codec, 5000, data)[1]
        b = decode_payload(codec, 5000, bytearray(data))[1]
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("codec", "length", "indices", "values", "reason"),
    [
        ("nope", 4, None, np.zeros(4), "unknown codec"),
        ("sparse-f32", -1, None, np.zeros(0), "length"),
        ("sparse-f32", 4, np.array([1, 1]), np.zeros(2), "strictly increasing"),
        ("sparse-f32", 4, np.array([2, 1]), np.zeros(2), "strictly increasing"),
        ("sparse-f32", 4, np.array([4]), np.zeros(1), "out of range"),
        ("sparse-f32", 4, np.array([-1]), np.zeros(1), "non-negative"),
        ("sparse-f32", 4, np.array([1]), np.zeros(2), "indices but"),
        ("sparse-q8", 4, np.array([1]), np.array([np.nan]), "NaN"),
        ("dense-f32", 4, None, np.array([np.inf, 0, 0, 0]), "NaN or infinity"),
        ("dense-f32", 4, None, np.zeros(3), "dense update"),
        ("dense-bf16", 1, None, np.array([3.4e38]), "bf16-rounded values"),  # rounds up to infinity
    ],
)
def test_encode_rejects(codec, length, indices, values, reason) -> None:
    with pytest.raises(ValidationError, match=reason):
        encode_payload(codec, length, indices, values)


def _u32(*xs: int) -> bytes:
    return np.array(xs, dtype="<u4").tobytes()


@pytest.mark.parametrize(
    ("codec", "length", "data", "reason"),
    [
        ("dense-f32", 2, b"\x00" * 7, "expected 8"),
        ("dense-f32", 1, np.array([np.nan], "<f4").tobytes(), "NaN"),
        ("dense-bf16", 2, b"\x00" * 3, "expected 4"),
        ("dense-bf16", 1, b"\x80\x7f", "NaN or infinity"),  # 0x7F80: +inf
        ("dense-bf16", 1, b"\xc1\xff", "NaN or infinity"),  # 0xFFC1: a NaN
        ("sparse-f32", 4, b"\x01\x00", "8-byte header"),
        ("sparse-f32", 4, _u32(5, 0), "claims 5"),
        ("sparse-f32", 4, _u32(1, 1) + b"\x00", "must be 13 bytes"),
        ("sparse-f32", 4, _u32(2, 2) + b"\x80\x00" + b"\x00" * 8, "exactly 2 varints"),
        ("sparse-f32", 4, _u32(1, 2) + b"\x01\x80" + b"\x00" * 4, "exactly 1 varints"),
        ("sparse-f32", 4, _u32(1, 2) + b"\x80\x00" + b"\x00" * 4, "overlong"),
        ("sparse-f32", 4, _u32(1, 6) + b"\x80" * 5 + b"\x01" + b"\x00" * 4, "longer than 5"),
        ("sparse-f32", 4, _u32(1, 1) + b"\x09" + b"\x00" * 4, "gap is out of range"),
        ("sparse-f32", 4, _u32(2, 2) + b"\x01\x02" + b"\x00" * 8, "index 4 out of range"),
        ("sparse-q8", 4, _u32(1, 1) + b"\x00" + np.array([-1.0], "<f4").tobytes() + b"\x01", "scales"),
        ("sparse-q8", 4, _u32(1, 1) + b"\x00" + np.array([1.0], "<f4").tobytes() + b"\x80", "reserved"),
        ("sparse-q8", 4, _u32(1, 1) + b"\x00" + np.array([3e38], "<f4").tobytes() + b"\x7f", "decoded"),
        ("sparse-q4", 4, _u32(1, 1) + b"\x00" + np.array([1.0], "<f4").tobytes() + b"\x00", "reserved"),
        ("sparse-q4", 4, _u32(1, 1) + b"\x00" + np.array([1.0], "<f4").tobytes() + b"\x18", "padding"),
        ("sparse-q2", 4, _u32(1, 1) + b"\x00" + np.array([1.0], "<f4").tobytes() + b"\x04", "padding"),
        ("dct-q8", 4, _u32(65, 0), "claims 65 entries for 64 slots"),  # 4 entries: one block of 64
        ("dct-q8", 4, _u32(1, 1) + b"\x40" + np.array([1.0], "<f4").tobytes() + b"\x01", "out of range"),
        ("dct-q8", 4, _u32(1, 1) + b"\x00" + np.array([3e38], "<f4").tobytes() + b"\x7f", "synthesized"),
    ],
)
def test_decode_rejects(codec, length, data, reason) -> None:
    with pytest.raises(ValidationError, match=reason):
        decode_payload(codec, length, data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(ValidationError):
        decode_payload("sparse-f32", 4, "text")  # type: ignore[arg-type]


_finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from(ENTRY_CODECS),
    data=st.data(),
    length=st.integers(1, 300),
)
def test_property_round_trip(codec: str, data: st.DataObject, length: int) -> None:
    idx = sorted(data.draw(st.sets(st.integers(0, length - 1), max_size=length)))
    vals = np.array(data.draw(st.lists(_finite, min_size=len(idx), max_size=len(idx))), np.float32)
    indices = np.array(idx, np.uint32)
    enc = encode_payload(codec, length, indices, vals)
    d_idx, d_vals = decode_payload(codec, length, enc)
    if codec in DENSE_CODECS:
        expect = np.zeros(length, np.float32)
        expect[indices] = vals
        indices, vals = np.arange(length, dtype=np.uint32), expect
    np.testing.assert_array_equal(d_idx, indices)
    assert np.all(np.abs(d_vals.astype(np.float64) - vals) <= payload_error_bound(codec, vals))


@settings(max_examples=150, deadline=None)
@given(codec=st.sampled_from(CODECS), length=st.integers(0, 64), blob=st.binary(max_size=200))
def test_fuzz_decode_only_validation_error(codec: str, length: int, blob: bytes) -> None:
    try:
        idx, vals = decode_payload(codec, length, blob)
    except ValidationError:
        return
    assert idx.size == vals.size and np.all(np.isfinite(vals))
    assert idx.size == 0 or int(idx.max()) < length


def test_exports() -> None:
    for name in crdt.__all__:
        assert hasattr(crdt, name)


# -- dct-q8 ----------------------------------------------------------------------------------------------


def _reference_synthesis(length: int, indices: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Float64 inverse of the orthonormal DCT-II, straight from its definition (no integer table)."""
    f = np.arange(DCT_BLOCK)[:, None]
    j = np.arange(DCT_BLOCK)[None, :]
    basis = np.cos(np.pi * (2 * j + 1) * f / (2 * DCT_BLOCK)) * np.sqrt(2 / DCT_BLOCK)
    basis[0] /= np.sqrt(2)
    coef = np.zeros(-(-length // DCT_BLOCK) * DCT_BLOCK)
    coef[indices] = coefficients
    return (coef.reshape(-1, DCT_BLOCK) @ basis).reshape(-1)[:length]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), length=st.integers(1, 300))
def test_dct_decodes_to_the_inverse_dct_of_its_coefficients(data: st.DataObject, length: int) -> None:
    """Whatever coefficients are kept, the decoded entries are their inverse DCT (to the integer table's
    precision) and the coefficients' own error stays within the q8 bound."""
    slots = -(-length // DCT_BLOCK) * DCT_BLOCK
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, slots - 1), max_size=slots))), np.uint32)
    coef = np.array(data.draw(st.lists(_finite, min_size=idx.size, max_size=idx.size)), np.float32)
    d_idx, d_vals = decode_payload("dct-q8", length, encode_payload("dct-q8", length, idx, coef))
    np.testing.assert_array_equal(d_idx, np.arange(length))
    wide = coef.astype(np.float64)
    err = np.linalg.norm(d_vals.astype(np.float64) - _reference_synthesis(length, idx, wide))
    coef_err = np.linalg.norm(payload_error_bound("dct-q8", coef))
    assert err <= 1.001 * coef_err + 2e-4 * np.linalg.norm(wide) + 1e-30


def test_dct_round_trip_of_a_whole_fragment() -> None:
    rng = np.random.default_rng(4)
    x = np.cumsum(rng.standard_normal(1000)).astype(np.float32)  # smooth: energy in low frequencies
    coef = dct_coefficients(x)
    assert coef.size == 1024
    _, y = decode_payload("dct-q8", 1000, encode_payload("dct-q8", 1000, None, coef))
    # q8 steps are set per chunk of 64 coefficients by its largest one (here each block's DC term)
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.03
    top = np.sort(np.argsort(np.abs(coef))[-100:]).astype(np.uint32)  # 10 % of the coefficients ...
    _, z = decode_payload("dct-q8", 1000, encode_payload("dct-q8", 1000, top, coef[top]))
    raw_top = np.argsort(np.abs(x))[-100:]  # ... keep more of the signal than 10 % of the entries
    raw_err = np.linalg.norm(np.delete(x, raw_top)) / np.linalg.norm(x)
    assert np.linalg.norm(z - x) / np.linalg.norm(x) < raw_err / 3


def test_dct_decoding_is_pinned_bit_for_bit() -> None:
    """The decoder is integer arithmetic plus single IEEE-754 operations in a fixed order, so these bytes
    are the same on every platform and numpy version; a change here would split replicas."""
    import hashlib

    n, length = 150, 500  # indices 0, 3, 6, ...: 3 chunks of scales over 8 blocks
    codes = ((np.arange(n) * 37) % 255 - 127).astype(np.int8)
    codes[codes == -128] = 0
    scales = np.array([1e-3, 2.5e-2, 7.0], "<f4")
    payload = _u32(n, n) + b"\x00" + b"\x02" * (n - 1) + scales.tobytes() + codes.tobytes()
    _, values = decode_payload("dct-q8", length, payload)
    digest = hashlib.blake2b(values.astype("<f4").tobytes(), digest_size=16).hexdigest()
    assert digest == DCT_GOLDEN, digest


DCT_GOLDEN = "d659af2266c88ae5ec04f834d825ed29"
