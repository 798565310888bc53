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

``dct-q8``      DCT-domain top-k (DeMo, Peng et al. 2024). The fragment is cut into blocks of ``DCT_BLOCK``
                = 64 entries, the last zero-padded, ``P = 64 * ceil(length / 64)`` slots in all; the
                payload is ``sparse-q8`` over the P DCT-II coefficients (indices in ``[0, P)``, frequency
                ``f = index % 64`` of block ``index // 64``). Decodes to all ``length`` entries (see
                "Exact inverse DCT" below).

Index gaps: ``n`` unsigned LEB128 varints, ``indices[0]`` then ``indices[i] - indices[i-1] - 1``, so any
decodable sequence is strictly increasing by construction and only the last index needs a range check.
Decoding is strict: exactly ``n`` varints filling exactly ``m`` bytes, at most 5 bytes each, no
overlong encodings (a multi-byte varint's last byte is not 0), every gap ``< length``. At top-k density d
a gap is about 1/d, so an index costs 1 byte up to d = 1/128 instead of 4 (u32): at 5 % density with
q8 codes a payload costs about 2 bytes per entry instead of 5 (``python -m training.codec_report``).

Quantization (encoder side): values are cut into chunks of ``CHUNK_SIZE`` in index order; per chunk
``scale = float32(max|v| / QMAX)`` where QMAX is 127 (q8), 7 (q4), 3 (q2). Codes are the nearest level,
clipped. Error bound per entry, for a chunk whose largest magnitude is ``m``:
q8 ``<= m/254``, q4 ``<= m/14``, q2 ``<= m/3`` (plus float32 rounding, ~1e-7 relative). An all-zero chunk
gets scale 0 and decodes to zeros (q2 too, since level * 0 = 0).

Exact inverse DCT: every peer must synthesize bit-identical values, so the decoder uses no transcendental
function, BLAS or FFT at decode time. The basis is the integer table ``T = rint(2**14 * C)`` (C the
orthonormal 64-point DCT-II matrix; every entry of ``2**14 * C`` lies at least 0.0106 from a rounding tie,
so no libm's cosine can round it differently, and the table's digest is checked at import). A block's
kept coefficients fall into at most a few quantization chunks; for each (block, chunk) group the decoder
forms ``S = sum code * T[f, :]`` exactly (integers below ``64 * 127 * 2**14 < 2**27``, exact in float64
whatever the summation order), then
``float64(S) * float64(scale) * 2**-14`` (one rounding, then an exact power of two), adds a block's
groups in chunk order, and rounds once to float32. Integer arithmetic and single IEEE-754 operations in a
fixed order: the same bits on every platform. The encoder (``dct_coefficients``, any float code) uses
``T / 2**14`` transposed, the inverse to 1e-4.

bf16 keeps float32's range with 8 significant bits: relative error ``<= 2**-8`` per entry, half the bytes
of dense-f32, no top-k. It is the dense baseline of Streaming DiLoCo; the sparse codecs are far smaller.

Rejected alternatives: u32 indices (4 bytes each; they were 80 % of a q8 payload at 5 % density); a
bitmap (``length/8`` bytes: smaller only above ~12 % density); entropy-coded gaps (another ~1.4x, at the
cost of a bit-level parser in the trust boundary); per-tensor scales (one outlier wrecks the whole
fragment's resolution); stochastic rounding (needs randomness in crdt; the trainer's error feedback
already removes the bias).
"""

from __future__ import annotations

import hashlib

import numpy as np

from crdt.errors import ValidationError

__all__ = [
    "CHUNK_SIZE",
    "CODECS",
    "DCT_BLOCK",
    "DENSE_CODECS",
    "MAX_LENGTH",
    "TRANSFORM_CODECS",
    "dct_coefficients",
    "decode_payload",
    "encode_payload",
    "payload_error_bound",
]

# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

#: Values per quantization scale. 64 matches the block sizes of common low-bit formats (GGML q4_0 uses 32,
#: bitsandbytes 64): small enough to track local magnitude, big enough that the scale costs 0.5 bit/value.
CHUNK_SIZE = 64
#: Counts are u32 on the wire, so a fragment can have at most 2**32 - 1 entries.
MAX_LENGTH = 2**32 - 1
#: Bytes of the longest varint (a gap below 2**32 needs 32 bits = 5 groups of 7).
_MAX_VARINT = 5
#: Code format of each quantized codec.
_CODES = {"sparse-q8": "q8", "sparse-q4": "q4", "sparse-q2": "q2", "dct-q8": "q8"}
#: Largest |code| per code format (symmetric ranges; q8 leaves -128 unused so that negation is exact).
_QMAX = {"q8": 127, "q4": 7, "q2": 3}
#: q2 levels, indexed by the 2-bit code. Odd levels, no zero: see the module docstring.
_Q2_LEVELS = np.array([-3.0, -1.0, 1.0, 3.0], dtype=np.float32)
#: Every codec name this module understands (the order is irrelevant; it is a set in spirit).
CODECS: tuple[str, ...] = (
    "dense-f32", "dense-bf16", "sparse-f32", "sparse-q8", "sparse-q4", "sparse-q2", "dct-q8"
)
#: Codecs that carry every entry of the fragment (no indices; top-k does not apply).
DENSE_CODECS: tuple[str, ...] = ("dense-f32", "dense-bf16")
#: Codecs whose indices and values are transform coefficients (see ``dct_coefficients``), not entries.
TRANSFORM_CODECS: tuple[str, ...] = ("dct-q8",)
#: Entries per DCT block of ``dct-q8``.
DCT_BLOCK = 64
#: Fixed-point bits of the integer DCT basis.
_DCT_BITS = 14
#: blake2b-128 of the little-endian int64 basis table (see "Exact inverse DCT").
_DCT_BASIS_DIGEST = "7b4084048350dcb1faebc4cb90265684"

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
    if codec in TRANSFORM_CODECS and _dct_slots(int(length)) > MAX_LENGTH:
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


def _dct_basis() -> np.ndarray:
    """(DCT_BLOCK, DCT_BLOCK) int64 ``rint(2**14 * C)``, row f = frequency f of the orthonormal DCT-II."""
    f = np.arange(DCT_BLOCK, dtype=np.float64)[:, None]
    j = np.arange(DCT_BLOCK, dtype=np.float64)[None, :]
    c = np.cos(np.pi * (2 * j + 1) * f / (2 * DCT_BLOCK)) * np.sqrt(2 / DCT_BLOCK)
    c[0] /= np.sqrt(2)
    table = np.rint(c * 2**_DCT_BITS).astype(np.int64)
    digest = hashlib.blake2b(table.astype("<i8").tobytes(), digest_size=16).hexdigest()
    if digest != _DCT_BASIS_DIGEST:  # pragma: no cover - would take a cosine off by ~1e-6
        raise RuntimeError(f"DCT basis digest {digest} != {_DCT_BASIS_DIGEST}: this platform's cos() differs")
    table.flags.writeable = False
    return table


_DCT_BASIS = _dct_basis()
_DCT_BASIS_F64 = _DCT_BASIS.astype(np.float64)


def _dct_slots(length: int) -> int:
    """P: the fragment's length rounded up to whole DCT blocks."""
    return -(-length // DCT_BLOCK) * DCT_BLOCK


def dct_coefficients(values: np.ndarray) -> np.ndarray:
    """Encoder side of ``dct-q8``: float64 (P,) DCT-II coefficients of a fragment's (length,) values.

    Pick the coefficients to send (top-k by magnitude) and pass their indices and values to
    :func:`encode_payload`; the decoder's synthesis inverts this to about 1e-4 relative."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    blocks = np.zeros(_dct_slots(x.size), dtype=np.float64)
    blocks[: x.size] = x
    return (blocks.reshape(-1, DCT_BLOCK) @ (_DCT_BASIS.T / 2.0**_DCT_BITS)).reshape(-1)


def _dct_synthesis(length: int, indices: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The exact inverse DCT of the module docstring: (length,) float32, the same bits everywhere."""
    out = np.zeros((_dct_slots(length) // DCT_BLOCK, DCT_BLOCK), dtype=np.float64)
    n = indices.size
    if n:
        block = indices.astype(np.int64) // DCT_BLOCK
        chunk = np.arange(n) // CHUNK_SIZE
        first = np.ones(n, dtype=bool)
        first[1:] = (block[1:] != block[:-1]) | (chunk[1:] != chunk[:-1])
        group = np.cumsum(first) - 1  # (block, chunk) groups are runs: indices are increasing
        rows = np.zeros((int(group[-1]) + 1, DCT_BLOCK), dtype=np.float64)
        rows[group, indices.astype(np.int64) % DCT_BLOCK] = codes
        # Integers in float64: every product and partial sum is an integer below 2**27 < 2**53, so BLAS
        # computes the exact sums whatever its order, blocking or FMA use (7x faster than int64 matmul).
        exact = rows @ _DCT_BASIS_F64
        parts = exact * scales[chunk[first]].astype(np.float64)[:, None] * 2.0**-_DCT_BITS
        g_block = block[first]
        rank = np.arange(g_block.size) - np.searchsorted(g_block, g_block)  # a block's groups: 0, 1, ...
        for r in range(int(rank.max()) + 1):  # in chunk order; each step adds to distinct blocks
            at = rank == r
            out[g_block[at]] += parts[at]
    with np.errstate(over="ignore"):  # an overflow to inf is refused by the caller's finiteness check
        return out.reshape(-1)[:length].astype(np.float32)


def _n_chunks(n: int) -> int:
    return -(-n // CHUNK_SIZE)


def _chunk_max_abs(values: np.ndarray) -> np.ndarray:
    """Per-chunk max |v| in float64 (the last chunk is zero-padded, which cannot raise a maximum)."""
    n = values.size
    padded = np.zeros(_n_chunks(n) * CHUNK_SIZE, dtype=np.float64)
    padded[:n] = np.abs(values.astype(np.float64))
    return padded.reshape(-1, CHUNK_SIZE).max(axis=1)


def _expand_scales(scales: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(scales, CHUNK_SIZE)[:n]


def _encode_gaps(indices: np.ndarray) -> bytes:
    """Strictly increasing indices -> LEB128 varints of their gaps (see the module docstring)."""
    gaps = indices.astype(np.uint64)
    gaps[1:] = np.diff(gaps) - np.uint64(1)
    width = np.ones(gaps.size, dtype=np.int64)
    for k in range(1, _MAX_VARINT):
        width += gaps >= np.uint64(1 << (7 * k))
    start = np.cumsum(width) - width
    out = np.zeros(int(width.sum()), dtype=np.uint8)
    for k in range(_MAX_VARINT):
        has = width > k
        group = (gaps[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = np.where(width[has] > k + 1, 0x80, 0).astype(np.uint64)
        out[start[has] + k] = (group | more).astype(np.uint8)
    return out.tobytes()


def _decode_gaps(raw: np.ndarray, n: int, length: int) -> np.ndarray:
    """LEB128 gap bytes -> uint32 indices, enforcing every rule in the module docstring."""
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != n or (raw.size and (ends.size == 0 or ends[-1] != raw.size - 1)):
        raise ValidationError(f"index gaps: {raw.size} bytes do not hold exactly {n} varints")
    width = np.diff(ends, prepend=-1)
    if width.size and int(width.max()) > _MAX_VARINT:
        raise ValidationError(f"index gaps: a varint is longer than {_MAX_VARINT} bytes")
    if bool(np.any((width > 1) & (raw[ends] == 0))):
        raise ValidationError("index gaps: overlong varint encoding")
    start = ends - width + 1
    gaps = np.zeros(n, dtype=np.uint64)
    for k in range(_MAX_VARINT):
        has = width > k
        gaps[has] |= (raw[start[has] + k].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * k)
    if n and int(gaps.max()) >= length:
        raise ValidationError(f"index gaps: a gap is out of range for fragment length {length}")
    indices = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)  # < n * length < 2**64: no overflow
    if n and int(indices[-1]) >= length:
        raise ValidationError(f"index {int(indices[-1])} out of range for fragment length {length}")
    return indices.astype(np.uint32)


# ---------------------------------------------------------------------------------------------------------
# Quantizers (encoder side: any deterministic choice works, the decoder defines the values)
# ---------------------------------------------------------------------------------------------------------


def _quantize(fmt: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (f32 scales per chunk, int codes). For q2 the codes are 0..3 level indices."""
    qmax = _QMAX[fmt]
    scales = (_chunk_max_abs(values) / qmax).astype(np.float32)
    if not bool(np.all(np.isfinite(scales))):  # pragma: no cover - max|f32| / qmax is always finite
        raise ValidationError("values too large to quantize")
    per = _expand_scales(scales, values.size).astype(np.float64)
    safe = np.where(per > 0, per, 1.0)
    ratio = values.astype(np.float64) / safe
    if fmt == "q2":
        # nearest odd level in {-3,-1,1,3}: level = 2*rint((r-1)/2) + 1, clipped; code = (level + 3) / 2
        level = np.clip(2.0 * np.rint((ratio - 1.0) / 2.0) + 1.0, -3.0, 3.0)
        codes = ((level + 3.0) / 2.0).astype(np.int64)
    else:
        codes = np.clip(np.rint(ratio), -qmax, qmax).astype(np.int64)
    return scales, codes


def _pack_codes(fmt: str, codes: np.ndarray) -> bytes:
    if fmt == "q8":
        return codes.astype(np.int8).tobytes()
    if fmt == "q4":
        nib = (codes + 8).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    c = codes.astype(np.uint8)
    pad = (-c.size) % 4
    if pad:
        c = np.append(c, np.zeros(pad, dtype=np.uint8))
    c = c.reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8).tobytes()


def _code_bytes(fmt: str, n: int) -> int:
    return {"q8": n, "q4": -(-n // 2), "q2": -(-n // 4)}[fmt]


def _unpack_levels(fmt: str, raw: np.ndarray, n: int) -> np.ndarray:
    """Bytes -> float32 levels (code values), validating reserved codes and zero padding."""
    if fmt == "q8":
        codes = raw.view(np.int8)
        if bool(np.any(codes == -128)):
            raise ValidationError("q8 code -128 is reserved")
        return codes.astype(np.float32)
    if fmt == "q4":
        nib = np.empty(raw.size * 2, dtype=np.uint8)
        nib[0::2] = raw & 0x0F
        nib[1::2] = raw >> 4
        if bool(np.any(nib[n:] != 0)):
            raise ValidationError("q4 padding nibble must be 0")
        nib = nib[:n]
        if bool(np.any(nib == 0)):
            raise ValidationError("q4 nibble 0 (code -8) is reserved")
        return nib.astype(np.float32) - np.float32(8)
    codes = np.empty(raw.size * 4, dtype=np.uint8)
    for k in range(4):
        codes[k::4] = (raw >> (2 * k)) & 0x03
    if bool(np.any(codes[n:] != 0)):
        raise ValidationError("q2 padding bits must be 0")
    return _Q2_LEVELS[codes[:n]]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _slots(codec: str, length: int) -> int:
    """Index space of a payload: the fragment's entries, or its DCT coefficients."""
    return _dct_slots(length) if codec in TRANSFORM_CODECS else length


def encode_payload(codec: str, length: int, indices: np.ndarray | None, values: np.ndarray) -> bytes:
    """Encode a fragment update.

    Args:
        codec: one of :data:`CODECS`.
        length: fragment length (number of model entries the fragment covers).
        indices: uint32-convertible, strictly increasing, ``< length`` (``< P``, coefficient indices, for
            ``dct-q8``); ``None`` means all of them (then ``values`` has one entry per slot). For the
            dense codecs given indices are scattered into a zero vector.
        values: finite float32-convertible values, one per index (coefficients for ``dct-q8``).

    Returns:
        The payload bytes (layout in the module docstring).

    Raises:
        ValidationError: unknown codec, bad length, mismatched sizes, unsorted/out-of-range indices,
            non-finite values.
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
    gaps = _encode_gaps(idx)
    header = np.array([idx.size, len(gaps)], dtype=_U32).tobytes() + gaps
    if codec == "sparse-f32":
        return header + vals.astype(_F32).tobytes()
    fmt = _CODES[codec]
    scales, codes = _quantize(fmt, vals)
    data = header + scales.astype(_F32).tobytes() + _pack_codes(fmt, codes)
    # Guard the decoder's finiteness rule on the encoder side too (code * scale could round up to inf).
    if codec in TRANSFORM_CODECS:
        _check_finite(_dct_synthesis(length, idx, codes, scales), "synthesized values")
    else:
        levels = _Q2_LEVELS[codes] if fmt == "q2" else codes.astype(np.float32)
        _check_finite(_expand_scales(scales, vals.size) * levels, "quantized values")
    return data


def decode_payload(codec: str, length: int, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode payload bytes into ``(indices uint32, values float32)`` of fragment entries, validating
    every rule (``dct-q8`` decodes to all ``length`` entries).

    The returned arrays are fresh, writable and native-endian. Decoding is strict: the byte length must be
    exactly what the header implies, padding must be zero, reserved codes are refused, scales must be
    finite and ``>= 0``, decoded values must be finite.

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
    slots = _slots(codec, length)
    if len(buf) < 8:
        raise ValidationError("sparse payload shorter than its 8-byte header")
    n, m = (int(x) for x in np.frombuffer(buf, dtype=_U32, count=2))
    if n > slots:
        raise ValidationError(f"sparse payload claims {n} entries for {slots} slots")
    fmt = _CODES.get(codec, "")
    value_bytes = 4 * n if codec == "sparse-f32" else 4 * _n_chunks(n) + _code_bytes(fmt, n)
    expected = 8 + m + value_bytes
    if len(buf) != expected:
        raise ValidationError(f"{codec} payload with {n} entries must be {expected} bytes, got {len(buf)}")
    indices = _decode_gaps(np.frombuffer(buf, dtype=np.uint8, count=m, offset=8), n, slots)
    off = 8 + m
    if codec == "sparse-f32":
        values = np.frombuffer(buf, dtype=_F32, count=n, offset=off).astype(np.float32)
        _check_finite(values, "values")
        return indices, values
    nc = _n_chunks(n)
    scales = np.frombuffer(buf, dtype=_F32, count=nc, offset=off).astype(np.float32)
    if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
        raise ValidationError("chunk scales must be finite and >= 0")
    off += 4 * nc
    levels = _unpack_levels(fmt, np.frombuffer(buf, dtype=np.uint8, offset=off), n)
    if codec in TRANSFORM_CODECS:
        values = _dct_synthesis(length, indices, levels.astype(np.int64), scales)
        _check_finite(values, "synthesized values")
        return np.arange(length, dtype=np.uint32), values
    with np.errstate(over="ignore"):
        values = (levels * _expand_scales(scales, n)).astype(np.float32)  # one f32 rounding per entry
    _check_finite(values, "decoded values")
    return indices, values


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
    m = _expand_scales(_chunk_max_abs(vals), vals.size)
    step = m / _QMAX[fmt]
    half = 1.0 if fmt == "q2" else 0.5  # q2 levels are 2 apart (odd), others 1 apart
    return step * half * (1 + 1e-5) + m * 1e-6 + 1e-30
