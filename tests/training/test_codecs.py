"""The codec trade-off on a real digits update: fewer bytes <-> more quantization error, EF keeps up."""

import numpy as np
import pytest
import torch

import crdt
from training.codec_report import codec_table, format_table, one_update


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, float | str]]:
    u = one_update("digits", hidden=64)
    return {str(r["codec"]): r for r in codec_table(u, density=0.02, rounds=10)}


def test_bytes_decrease_with_bits(rows: dict[str, dict[str, float | str]]) -> None:
    order = ["dense-f32", "dense-bf16", "sparse-f32", "sparse-q8", "sparse-q4", "sparse-q2"]
    sizes = [rows[c]["bytes"] for c in order]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert rows["dense-f32"]["total err"] == 0 and rows["sparse-f32"]["quant err"] == 0
    assert 0 < float(rows["dense-bf16"]["total err"]) < 2**-8  # bf16 rounding alone, relative


def test_quantization_error_grows_as_bits_shrink(rows: dict[str, dict[str, float | str]]) -> None:
    q8, q4 = float(rows["sparse-q8"]["quant err"]), float(rows["sparse-q4"]["quant err"])
    q2 = float(rows["sparse-q2"]["quant err"])
    assert 0 < q8 < q4 < 0.2 and q2 < 0.5
    assert q8 < 1 / 254 * 2  # per-entry bound m/254, relative L2 is below it for any chunk


def test_error_feedback_is_codec_agnostic(rows: dict[str, dict[str, float | str]]) -> None:
    """With feedback, the cumulative error is dominated by top-k, not by the quantizer."""
    ef = np.array([float(rows[c]["EF err"]) for c in ("sparse-f32", "sparse-q8", "sparse-q4", "sparse-q2")])
    assert np.ptp(ef) < 0.1 and ef.max() < 1.0


def test_chunked_indices_are_cheaper_per_entry(rows: dict[str, dict[str, float | str]]) -> None:
    """6-bit in-chunk positions against varint gaps, the same 2-bit values: fewer bits per kept entry
    (b + 2 + 0.5 for the scale) and fewer bytes, at a higher one-shot error (k per chunk, not global)."""
    chunked, gaps = rows["chunked-q2"], rows["sparse-q2"]
    assert 8.4 < float(chunked["bits/entry"]) < 9.2  # a small model: the header and a partial scale chunk
    assert float(chunked["bits/entry"]) < float(gaps["bits/entry"]) - 1
    assert int(chunked["bytes"]) < int(gaps["bytes"])
    assert float(chunked["total err"]) >= float(gaps["total err"])


@pytest.mark.parametrize("bits", ["q2", "q8"])
def test_rice_indices_send_the_same_update_for_fewer_bytes(
    rows: dict[str, dict[str, float | str]], bits: str
) -> None:
    """rice-qN decodes to exactly sparse-qN's update (same top-k, same codes), with Rice-coded gaps. The
    digits update barely clusters (13 % fewer bytes for q2; 40 % on stdlib-lm, whose top-k sits in a few
    tensors)."""
    rice, gaps = rows[f"rice-{bits}"], rows[f"sparse-{bits}"]
    for column in ("quant err", "total err", "EF err"):
        assert rice[column] == gaps[column]
    assert int(rice["bytes"]) < 0.95 * int(gaps["bytes"])


def test_dct_keeps_more_of_the_update_at_equal_bytes(rows: dict[str, dict[str, float | str]]) -> None:
    """DeMo's premise on a real pseudo-gradient: k DCT coefficients carry more of it than k entries."""
    dct, q8 = rows["dct-q8"], rows["sparse-q8"]
    assert abs(int(dct["bytes"]) - int(q8["bytes"])) < 0.05 * int(q8["bytes"])
    assert float(dct["total err"]) < float(q8["total err"]) - 0.02
    assert float(dct["EF err"]) < 1.0


def test_format_table(rows: dict[str, dict[str, float | str]]) -> None:
    text = format_table(list(rows.values()))
    assert text.count("\n") == len(crdt.CODECS) + 1 and "| sparse-q2 |" in text


def test_bf16_payload_rounds_like_torch() -> None:
    """The crdt encoder's round-to-nearest-even is torch's float32 -> bfloat16 cast, ties included."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=100_000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x3F808000, 0x3F818000, 0x00008000, 0x80018000]  # exact ties, even and odd, subnormal
    values = bits.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) < 3e38)]
    payload = crdt.encode_payload("dense-bf16", values.size, None, values)
    _, decoded = crdt.decode_payload("dense-bf16", values.size, payload)
    expect = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(decoded.view(np.uint32), expect.view(np.uint32))
