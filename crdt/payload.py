"""Payload codecs: the exact bytes of a fragment update, and the exact float32 values every peer decodes.

Theory of operation
-------------------
A contribution carries one update for one fragment (a contiguous slice of the flat float32 model of
``length`` entries). The update is a sparse vector: ``indices`` (uint32, strictly increasing, ``< length``,
relative to the fragment start) and ``values`` (float32, finite). Every peer must turn the same payload
bytes into bit-identical float32 values before fixed-point accumulation, so decoding uses only IEEE-754
float32 operations with one rounding each (``float32(q) * float32(scale)``), which numpy performs
identically on every platform. The *encoder* may be anything; its quantization error is returned to the
trainer via ``decode_payload(encode_payload(...))`` (error feedback).

Byte layout (all integers and floats little-endian)
---------------------------------------------------
``dense-f32``   ``length`` x f32. Decodes to ``indices = arange(length)``.
``dense-bf16``  ``length`` x u16 bfloat16 bit patterns, the high half of a float32 (sign, 8 exponent bits,
                7 mantissa bits); the value is that float32 with a zero low half, so decoding is a shift,
                exact on every platform. An all-ones exponent (infinity, NaN) is rejected. The encoder
                rounds to nearest, ties to even.
``sparse-f32``  u32 ``n``; u32 ``m``; ``m`` bytes of index gaps; ``n`` x f32 values.
``sparse-q8``   u32 ``n``; u32 ``m``; ``m`` bytes of index gaps; ``ceil(n/64)`` x f32 chunk scales; ``n`` x
                i8 codes in ``[-127, 127]`` (-128 is rejected). value = code * scale.
``sparse-q4``   header and gaps as above, scales as in q8; ``ceil(n/2)`` bytes of 4-bit codes, low nibble
                first. A nibble holds ``code + 8`` with code in ``[-7, 7]`` (nibble 0 is rejected); an odd
                tail leaves the high nibble 0. value = code * scale.
``sparse-q2``   header, gaps and scales as above; ``ceil(n/4)`` bytes of 2-bit codes, lowest bits first,
                unused tail bits 0. Code c in 0..3 maps to the level ``(-3, -1, +1, +3)[c]``;
                value = level * scale. There is no zero level on purpose: a sparse payload only carries
                entries top-k selected for being large, so spending a level on 0 would waste a quarter of
                the code space; the symmetric odd levels keep the quantizer unbiased in sign.

``chunked-q2``  u8 ``b`` in ``[1, 16]``; u8 0 (reserved); u16 ``k`` in ``[0, 2**b]``: the fragment is cut into
                chunks of ``2**b`` entries and each carries exactly ``k`` of them (the last chunk
                ``min(k, its length)``), n entries in all (``crdt/_indices.py``); then ``ceil(n*b/8)``
                bytes of ``b``-bit in-chunk positions (least significant bit first, unused tail bits 0),
                ``ceil(n/64)`` x f32 scales and ``ceil(n/4)`` bytes of q2 codes as in ``sparse-q2``. No
                count and no gaps: 6 bits per index at ``b = 6`` against ~9 for the gaps at density 1/64.

``rice-q2``     u32 ``n``; u32 ``m``; ``ceil(n/64)`` x u8 Rice parameters (``<= 31``); ``m`` bytes of unary
                quotients; the remainders (``r`` bits per gap of a group with parameter ``r``, their size
                follows from the parameters); then the scales and q2 codes of ``sparse-q2``. The same
                entries and values as ``sparse-q2``, the gaps Rice-coded (``crdt/_indices.py``): about 3.5
                bits per index instead of 8 at density 1/64, because top-k clusters.
``rice-q8``     the same with the scales and i8 codes of ``sparse-q8``.
``rice-q1``     the same with one bit per value, the sign (1 is +), lowest bits first, unused tail bits 0;
                value = +-scale, the scale being the chunk's mean |v| (``crdt/_quant.py``). The sign of a
                top-k entry, with error feedback carrying the magnitude left over to later rounds, as in
                DeMo and signSGD with error feedback: 13 % fewer bytes than rice-q2 at density 1/16, at the
                same loss (bench/convergence in simulation, 2026-12-02).

``dct-q8``      DCT-domain top-k (DeMo, Peng et al. 2024). The fragment is cut into blocks of ``DCT_BLOCK``
                = 64 entries, the last zero-padded, ``P = 64 * ceil(length / 64)`` slots in all; the
                payload is ``sparse-q8`` over the P DCT-II coefficients (indices in ``[0, P)``, frequency
                ``f = index % 64`` of block ``index // 64``). Decodes to all ``length`` entries, through
                the exact integer synthesis of ``crdt/_dct.py`` (the same bits on every platform).

Quantization of the values (scales and codes): ``crdt/_quant.py``.

Index gaps (``sparse-*``, ``dct-q8``): ``n`` unsigned LEB128 varints, ``indices[0]`` then
``indices[i] - indices[i-1] - 1``; strict, and about 1 byte per index up to density 1/128 instead of 4
(u32). The rules of both index codings are in ``crdt/_indices.py``.

bf16 keeps float32's range with 8 significant bits: relative error ``<= 2**-8`` per entry, half the bytes
of dense-f32, no top-k. It is the dense baseline of Streaming DiLoCo; the sparse codecs are far smaller.

Rejected alternatives: u32 indices (4 bytes each; they were 80 % of a q8 payload at 5 % density); a
bitmap (``length/8`` bytes: smaller only above ~12 % density); entropy-coded gaps (another ~1.4x, at the
cost of a bit-level parser in the trust boundary); per-tensor scales (one outlier wrecks the whole
fragment's resolution); stochastic rounding (needs randomness in crdt; the trainer's error feedback
already removes the bias).
"""

from __future__ import annotations

import numpy as np

from crdt import _indices, _quant
from crdt._dct import DCT_BLOCK, dct_coefficients, dct_slots, dct_synthesis
from crdt._quant import CHUNK_SIZE
from crdt.errors import ValidationError

__all__ = [
    "CHUNKED_CODECS",
    "CHUNK_SIZE",
    "CODECS",
    "DCT_BLOCK",
    "DEFAULT_CHUNK_BITS",
    "DENSE_CODECS",
    "MAX_LENGTH",
    "RICE_CODECS",
    "TRANSFORM_CODECS",
    "dct_coefficients",
    "decode_payload",
    "encode_payload",
    "payload_error_bound",
]

# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

#: Counts are u32 on the wire, so a fragment can have at most 2**32 - 1 entries.
MAX_LENGTH = 2**32 - 1
#: Code format of each quantized codec.
_CODES = {
    "sparse-q8": "q8", "sparse-q4": "q4", "sparse-q2": "q2", "dct-q8": "q8", "chunked-q2": "q2",
    "rice-q1": "q1", "rice-q2": "q2", "rice-q8": "q8",
}
#: Every codec name this module understands (the order is irrelevant; it is a set in spirit).
CODECS: tuple[str, ...] = (
    "dense-f32", "dense-bf16", "sparse-f32", "sparse-q8", "sparse-q4", "sparse-q2", "dct-q8", "chunked-q2",
    "rice-q1", "rice-q2", "rice-q8",
)
#: Codecs that carry every entry of the fragment (no indices; top-k does not apply).
DENSE_CODECS: tuple[str, ...] = ("dense-f32", "dense-bf16")
#: Codecs whose indices and values are transform coefficients (see ``dct_coefficients``), not entries.
TRANSFORM_CODECS: tuple[str, ...] = ("dct-q8",)
#: Codecs whose indices are fixed-k chunk positions: the encoder's indices must hold k per chunk.
CHUNKED_CODECS: tuple[str, ...] = ("chunked-q2",)
#: Codecs whose index gaps are Rice-coded.
RICE_CODECS: tuple[str, ...] = ("rice-q1", "rice-q2", "rice-q8")
#: b of the chunked codecs' chunks of 2**b entries when the encoder is not told: 64 entries, DeMo's and
#: Psyche's chunk, 6 bits per index.
DEFAULT_CHUNK_BITS = 6
#: Bytes before the scales of a chunked payload: u8 b, u8 reserved, u16 k.
_CHUNKED_HEADER = 4

_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_F32 = np.dtype("<f4")


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _check_codec_length(codec: str, length: int) -> None:
    if codec not in CODECS:
        raise ValidationError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if isinstance(length, bool) or not isinstance(length, int | np.integer):
        raise ValidationError(f"length must be an int, got {type(length).__name__}")
    if not 0 <= int(length) <= MAX_LENGTH:
        raise ValidationError(f"length {length} outside [0, {MAX_LENGTH}]")
    if codec in TRANSFORM_CODECS and dct_slots(int(length)) > MAX_LENGTH:
        raise ValidationError(f"length {length} has more than {MAX_LENGTH} DCT slots")


def _check_indices(indices: np.ndarray, length: int) -> None:
    """Strictly increasing and < length (so also unique). Shared by encoder and decoder."""
    if indices.size and int(indices[-1]) >= length:
        raise ValidationError(f"index {int(indices[-1])} out of range for fragment length {length}")
    if indices.size > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise ValidationError("indices must be strictly increasing")


def _check_finite(values: np.ndarray, what: str) -> None:
    if not bool(np.all(np.isfinite(values))):
        raise ValidationError(f"{what} contain NaN or infinity")


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest, ties to even (the mantissa carry is exact)."""
    bits = values.astype(_F32).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Values: scales and codes
# ---------------------------------------------------------------------------------------------------------


def _quantized_body(codec: str, length: int, idx: np.ndarray, vals: np.ndarray) -> bytes:
    """Scales then codes, checking that the decoder's values will be finite."""
    fmt = _CODES[codec]
    scales, codes = _quant.quantize(fmt, vals)
    # Guard the decoder's finiteness rule on the encoder side too (code * scale could round up to inf).
    if codec in TRANSFORM_CODECS:
        synthesized = dct_synthesis(length, idx, codes, scales, chunk_size=CHUNK_SIZE)
        _check_finite(synthesized, "synthesized values")
    else:
        levels = _quant.levels(fmt, codes)
        _check_finite(_quant.expand_scales(scales, vals.size) * levels, "quantized values")
    return scales.astype(_F32).tobytes() + _quant.pack_codes(fmt, codes)


def _decode_values(codec: str, length: int, indices: np.ndarray, buf: bytes, off: int) -> np.ndarray:
    """Scales and codes at ``buf[off:]`` (their exact size was checked) -> the decoded float32 values."""
    n = indices.size
    nc = _quant.n_chunks(n)
    scales = np.frombuffer(buf, dtype=_F32, count=nc, offset=off).astype(np.float32)
    if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
        raise ValidationError("chunk scales must be finite and >= 0")
    levels = _quant.unpack_levels(_CODES[codec], np.frombuffer(buf, dtype=np.uint8, offset=off + 4 * nc), n)
    if codec in TRANSFORM_CODECS:
        values = dct_synthesis(length, indices, levels.astype(np.int64), scales, chunk_size=CHUNK_SIZE)
        _check_finite(values, "synthesized values")
        return values
    with np.errstate(over="ignore"):
        values = (levels * _quant.expand_scales(scales, n)).astype(np.float32)  # one f32 rounding per entry
    _check_finite(values, "decoded values")
    return values


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _slots(codec: str, length: int) -> int:
    """Index space of a payload: the fragment's entries, or its DCT coefficients."""
    return dct_slots(length) if codec in TRANSFORM_CODECS else length


def _chunked_header(idx: np.ndarray, length: int, chunk_bits: int) -> bytes:
    """Header of a chunked payload for ``idx``, which must hold the same k in every chunk."""
    if isinstance(chunk_bits, bool) or not 1 <= int(chunk_bits) <= _indices.MAX_CHUNK_BITS:
        raise ValidationError(f"chunk_bits must be in [1, {_indices.MAX_CHUNK_BITS}], got {chunk_bits!r}")
    bits = int(chunk_bits)
    k = int(np.count_nonzero(idx < (1 << bits))) if length else 0  # chunk 0's count (or any k: none)
    if not _indices.chunk_counts_ok(idx, length, bits, k):
        raise ValidationError(f"chunked indices need the same k={k} in every chunk of {1 << bits} entries")
    if k > 0xFFFF:  # only a whole chunk of 2**16 entries: send it with a dense codec
        raise ValidationError(f"k={k} entries per chunk does not fit the u16 header field")
    return bytes([bits, 0]) + np.array([k], dtype=_U16).tobytes()


def encode_payload(
    codec: str,
    length: int,
    indices: np.ndarray | None,
    values: np.ndarray,
    *,
    chunk_bits: int = DEFAULT_CHUNK_BITS,
) -> bytes:
    """Encode a fragment update.

    Args:
        codec: one of :data:`CODECS`.
        length: fragment length (number of model entries the fragment covers).
        indices: uint32-convertible, strictly increasing, ``< length`` (``< P``, coefficient indices, for
            ``dct-q8``); ``None`` means all of them (then ``values`` has one entry per slot). For the
            dense codecs given indices are scattered into a zero vector. For the chunked codecs every
            chunk of ``2**chunk_bits`` entries must hold the same number k of them (the last chunk
            ``min(k, its length)``).
        values: finite float32-convertible values, one per index (coefficients for ``dct-q8``).
        chunk_bits: b of the chunked codecs (chunks of ``2**b`` entries, ``1 <= b <= 16``); ignored by
            the others.

    Returns:
        The payload bytes (layout in the module docstring).

    Raises:
        ValidationError: unknown codec, bad length, mismatched sizes, unsorted/out-of-range indices,
            indices that are not k per chunk (chunked codecs), non-finite values.
    """
    _check_codec_length(codec, length)
    length = int(length)
    slots = _slots(codec, length)
    vals = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    _check_finite(vals, "values")
    if indices is None:
        if vals.size != slots:
            raise ValidationError(f"{vals.size} values for a dense update of {slots} slots")
        idx = np.arange(slots, dtype=np.uint32)
    else:
        raw_idx = np.asarray(indices).reshape(-1)
        if raw_idx.size and (raw_idx.dtype.kind not in "iu" or int(raw_idx.min()) < 0):
            raise ValidationError("indices must be non-negative integers")
        idx = raw_idx.astype(np.uint32)
        if idx.size != vals.size:
            raise ValidationError(f"{idx.size} indices but {vals.size} values")
        _check_indices(idx, slots)

    if codec in DENSE_CODECS:
        dense = np.zeros(length, dtype=_F32)
        dense[idx] = vals
        if codec == "dense-f32":
            return dense.tobytes()
        bits = _to_bf16_bits(dense)
        _check_finite(_from_bf16_bits(bits), "bf16-rounded values")  # near f32's max, rounding gives inf
        return bits.astype(_U16).tobytes()
    if codec in CHUNKED_CODECS:
        header = _chunked_header(idx, length, chunk_bits)
        positions = _indices.encode_positions(idx, header[0])
        return header + positions + _quantized_body(codec, length, idx, vals)
    if codec in RICE_CODECS:
        params, unary, rest = _indices.encode_rice(idx)
        header = np.array([idx.size, len(unary)], dtype=_U32).tobytes()
        return header + params + unary + rest + _quantized_body(codec, length, idx, vals)
    gaps = _indices.encode_gaps(idx)
    header = np.array([idx.size, len(gaps)], dtype=_U32).tobytes() + gaps
    if codec == "sparse-f32":
        return header + vals.astype(_F32).tobytes()
    return header + _quantized_body(codec, length, idx, vals)


def decode_payload(codec: str, length: int, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode payload bytes into ``(indices uint32, values float32)`` of fragment entries, validating
    every rule (``dct-q8`` decodes to all ``length`` entries).

    The returned arrays are fresh, writable and native-endian. Decoding is strict: the byte length must be
    exactly what the header implies, padding must be zero, reserved codes and fields are refused, scales
    must be finite and ``>= 0``, decoded values must be finite.

    Raises:
        ValidationError: any violation, with the rule in the message.
    """
    _check_codec_length(codec, length)
    length = int(length)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationError(f"payload must be bytes, got {type(data).__name__}")
    buf = bytes(data)
    if codec in DENSE_CODECS:
        f32 = codec == "dense-f32"
        width = 4 if f32 else 2
        if len(buf) != width * length:
            raise ValidationError(f"{codec} payload has {len(buf)} bytes, expected {width * length}")
        if f32:
            values = np.frombuffer(buf, dtype=_F32).astype(np.float32)
        else:
            values = _from_bf16_bits(np.frombuffer(buf, dtype=_U16))
        _check_finite(values, "values")
        return np.arange(length, dtype=np.uint32), values
    if codec in CHUNKED_CODECS:
        return _decode_chunked(codec, length, buf)
    slots = _slots(codec, length)
    if len(buf) < 8:
        raise ValidationError("sparse payload shorter than its 8-byte header")
    n, m = (int(x) for x in np.frombuffer(buf, dtype=_U32, count=2))
    if n > slots:
        raise ValidationError(f"sparse payload claims {n} entries for {slots} slots")
    fmt = _CODES.get(codec, "")
    value_bytes = 4 * n if codec == "sparse-f32" else 4 * _quant.n_chunks(n) + _quant.code_bytes(fmt, n)
    if codec in RICE_CODECS:
        return _decode_rice(codec, length, buf, n, m, value_bytes)
    expected = 8 + m + value_bytes
    if len(buf) != expected:
        raise ValidationError(f"{codec} payload with {n} entries must be {expected} bytes, got {len(buf)}")
    indices = _indices.decode_gaps(np.frombuffer(buf, dtype=np.uint8, count=m, offset=8), n, slots)
    if codec == "sparse-f32":
        values = np.frombuffer(buf, dtype=_F32, count=n, offset=8 + m).astype(np.float32)
        _check_finite(values, "values")
        return indices, values
    values = _decode_values(codec, length, indices, buf, 8 + m)
    if codec in TRANSFORM_CODECS:
        return np.arange(length, dtype=np.uint32), values
    return indices, values


def _decode_rice(
    codec: str, length: int, buf: bytes, n: int, m: int, value_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    groups = _indices.rice_groups(n)
    if len(buf) < 8 + groups:
        raise ValidationError(f"{codec} payload with {n} entries is shorter than its Rice parameters")
    params = np.frombuffer(buf, dtype=np.uint8, count=groups, offset=8)
    if groups and int(params.max()) > _indices.MAX_RICE_BITS:  # before sizing the remainders by them
        raise ValidationError(f"rice gaps: a parameter is above {_indices.MAX_RICE_BITS}")
    rest = _indices.rice_remainder_bytes(params, n)
    expected = 8 + groups + m + rest + value_bytes
    if len(buf) != expected:
        raise ValidationError(f"{codec} payload with {n} entries must be {expected} bytes, got {len(buf)}")
    at = 8 + groups
    unary = np.frombuffer(buf, dtype=np.uint8, count=m, offset=at)
    remainders = np.frombuffer(buf, dtype=np.uint8, count=rest, offset=at + m)
    indices = _indices.decode_rice(params, unary, remainders, n, length)
    return indices, _decode_values(codec, length, indices, buf, at + m + rest)


def _decode_chunked(codec: str, length: int, buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(buf) < _CHUNKED_HEADER:
        raise ValidationError(f"{codec} payload shorter than its {_CHUNKED_HEADER}-byte header")
    bits, reserved = buf[0], buf[1]
    k = int(np.frombuffer(buf, dtype=_U16, count=1, offset=2)[0])
    if not 1 <= bits <= _indices.MAX_CHUNK_BITS or reserved != 0:
        raise ValidationError(f"{codec} header: chunk bits {bits} (1..{_indices.MAX_CHUNK_BITS}), reserved 0")
    if k > 1 << bits:
        raise ValidationError(f"{codec} header: k={k} entries per chunk of {1 << bits}")
    n = _indices.chunked_entries(length, bits, k)
    positions = _indices.position_bytes(n, bits)
    expected = _CHUNKED_HEADER + 4 * _quant.n_chunks(n) + positions + _quant.code_bytes(_CODES[codec], n)
    if len(buf) != expected:
        raise ValidationError(f"{codec} payload with {n} entries must be {expected} bytes, got {len(buf)}")
    raw = np.frombuffer(buf, dtype=np.uint8, count=positions, offset=_CHUNKED_HEADER)
    indices = _indices.decode_positions(raw, length, bits, k)
    return indices, _decode_values(codec, length, indices, buf, _CHUNKED_HEADER + positions)


def payload_error_bound(codec: str, values: np.ndarray) -> np.ndarray:
    """Per-value bound on |decoded - original| for ``values`` encoded with ``codec`` (for tests and docs);
    for ``dct-q8`` the values and the bound are coefficients.

    Includes a small float32 rounding allowance; exact codecs return zeros.
    """
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    if codec in ("dense-f32", "sparse-f32"):
        return np.zeros(vals.size, dtype=np.float64)
    if codec == "dense-bf16":  # half a unit in the 8th significant bit, plus the subnormal floor
        return np.abs(vals.astype(np.float64)) * 2.0**-8 + 2.0**-133
    if codec not in _CODES:
        raise ValidationError(f"unknown codec {codec!r}")
    fmt = _CODES[codec]
    m = _quant.expand_scales(_quant.chunk_max_abs(vals), vals.size)
    # q2: a scale s in [m/6, m/3] errs by at most s inside the levels and m - 3s beyond them; q1: the
    # scale is a mean |v| <= m, so ||v| - s| <= max(s, m - s) <= m
    worst = {"q2": m / 2, "q1": m}.get(fmt, m / _quant.QMAX[fmt] / 2)
    return worst * (1 + 1e-5) + m * 1e-6 + 1e-30
