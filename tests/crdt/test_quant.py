"""crdt/_quant.py: per-chunk scales and packed codes (the codecs' byte layouts are in test_payload.py)."""

from __future__ import annotations

import numpy as np
import pytest

from crdt import ValidationError, _quant


@pytest.mark.parametrize("fmt", ["q8", "q4", "q2", "q1"])
def test_codes_pack_and_unpack_to_their_levels(fmt: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(130).astype(np.float32)  # 3 chunks, the last of 2
    scales, codes = _quant.quantize(fmt, values)
    raw = np.frombuffer(_quant.pack_codes(fmt, codes), np.uint8)
    assert raw.size == _quant.code_bytes(fmt, values.size) and scales.size == _quant.n_chunks(values.size)
    levels = _quant.unpack_levels(fmt, raw, values.size)
    np.testing.assert_array_equal(levels, _quant.levels(fmt, codes))
    m = _quant.expand_scales(_quant.chunk_max_abs(values), values.size)
    worst = {"q2": m / 2, "q1": m}.get(fmt, m / _quant.QMAX[fmt] / 2)
    decoded = levels * _quant.expand_scales(scales, values.size)
    assert np.all(np.abs(decoded - values) <= worst * (1 + 1e-5) + 1e-7)


def test_q2_scale_is_fitted_within_its_bounds() -> None:
    """Heavy-tailed chunks: the least-squares scale lands inside [max/6, max/3], below max/3."""
    rng = np.random.default_rng(1)
    values = rng.standard_t(2, size=64 * 8)
    scales = _quant.q2_scales(values)
    m = _quant.chunk_max_abs(values)
    assert np.all(scales >= m / 6 - 1e-12) and np.all(scales <= m / 3 + 1e-12)
    assert np.mean(scales < m / 3 - 1e-9) > 0.5


def test_q1_keeps_the_sign_at_the_chunks_mean_magnitude() -> None:
    values = np.array([0.5, -1.5, 2.0, -4.0] + [1.0] * 60 + [-3.0, 1.0], np.float32)  # a chunk, then 2
    scales, codes = _quant.quantize("q1", values)
    np.testing.assert_array_equal(scales, np.array([(0.5 + 1.5 + 2 + 4 + 60) / 64, 2.0], np.float32))
    np.testing.assert_array_equal(_quant.levels("q1", codes), np.sign(values))


@pytest.mark.parametrize(
    ("fmt", "raw", "n", "reason"),
    [
        ("q8", [0x80], 1, "-128 is reserved"),
        ("q4", [0x00], 1, "nibble 0"),
        ("q4", [0x18], 1, "padding nibble"),
        ("q2", [0x10], 1, "padding bits"),
        ("q1", [0x05], 2, "padding bits"),
    ],
)
def test_unpack_rejects_reserved_codes_and_padding(fmt: str, raw: list[int], n: int, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        _quant.unpack_levels(fmt, np.array(raw, np.uint8), n)
