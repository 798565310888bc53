"""Quantization of the sparse codecs' values: per-chunk float32 scales and q8/q4/q2 codes.

Theory of operation
-------------------
Quantization (encoder side): values are cut into chunks of ``CHUNK_SIZE`` in index order; per chunk
``scale = float32(max|v| / QMAX)`` where QMAX is 127 (q8), 7 (q4); q2 fits its scale by least squares
(Lloyd's algorithm for the fixed levels, from 0.7 x max/3) within ``[max/6, max/3]``, because the top-k
values it carries are heavy tailed (3x less error than max/3); q1 keeps only the sign, with the chunk's
mean |v| as the scale (the least-squares scale of the levels -1, +1; DeMo and signSGD send signs too).
Codes are the nearest level, clipped. Error bound per entry, for a chunk whose largest magnitude is
``m``: q8 ``<= m/254``, q4 ``<= m/14``, q2 ``<= m/2``, q1 ``<= m`` (plus float32 rounding, ~1e-7
relative). An all-zero chunk gets scale 0 and decodes to zeros (q2 and q1 too, since level * 0 = 0).

The decoder (:func:`unpack_levels`, then ``level * scale`` in ``crdt/payload.py``) defines the values;
the encoder (:func:`quantize`) may be any deterministic choice, and its error goes back to the trainer
through error feedback. Codes are packed densely (q8 one byte, q4 a nibble, q2 two bits, q1 one bit,
lowest bits first); reserved codes and nonzero padding are rejected, so every value has one encoding.

Rejected: per-tensor scales (one outlier wrecks the whole fragment's resolution); stochastic rounding
(needs randomness in crdt; the trainer's error feedback already removes the bias); a zero q2 level (a
top-k entry is never zero, so it would waste a quarter of the code space).
"""

from __future__ import annotations

import numpy as np

from crdt.errors import ValidationError

__all__ = [
    "CHUNK_SIZE",
    "Q1_LEVELS",
    "Q2_LEVELS",
    "QMAX",
    "chunk_max_abs",
    "code_bytes",
    "expand_scales",
    "levels",
    "n_chunks",
    "pack_codes",
    "q2_scales",
    "quantize",
    "unpack_levels",
]

#: Values per quantization scale. 64 matches the block sizes of common low-bit formats (GGML q4_0 uses 32,
#: bitsandbytes 64): small enough to track local magnitude, big enough that the scale costs 0.5 bit/value.
CHUNK_SIZE = 64
#: Largest |code| per code format (symmetric ranges; q8 leaves -128 unused so that negation is exact).
QMAX = {"q8": 127, "q4": 7, "q2": 3, "q1": 1}
#: q2 levels, indexed by the 2-bit code. Odd levels, no zero: see the module docstring.
Q2_LEVELS = np.array([-3.0, -1.0, 1.0, 3.0], dtype=np.float32)
#: q1 levels, indexed by the 1-bit code: the sign.
Q1_LEVELS = np.array([-1.0, 1.0], dtype=np.float32)
#: The q2 encoder's first scale, as a fraction of max/3, and its Lloyd iterations: top-k values are heavy
#: tailed, so max/3 puts most of them on the +-1 level far above their size. On a real update at density
#: 1/64 the relative error of the kept values was 0.37 with max/3, 0.12 from 0.7 x max/3, 0.11 after one
#: iteration (training.codec_report); a second changes nothing measurable.
_Q2_START = 0.7
_Q2_ITERATIONS = 2


def n_chunks(n: int) -> int:
    return -(-n // CHUNK_SIZE)


def chunk_max_abs(values: np.ndarray) -> np.ndarray:
    """Per-chunk max |v| in float64 (the last chunk is zero-padded, which cannot raise a maximum)."""
    n = values.size
    padded = np.zeros(n_chunks(n) * CHUNK_SIZE, dtype=np.float64)
    padded[:n] = np.abs(values.astype(np.float64))
    return padded.reshape(-1, CHUNK_SIZE).max(axis=1)


def expand_scales(scales: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(scales, CHUNK_SIZE)[:n]




def q2_scales(values: np.ndarray) -> np.ndarray:
    """float64 q2 scale per chunk: Lloyd's least-squares scale for the levels (-3, -1, 1, 3), from
    ``_Q2_START x max/3``, kept within ``[max/6, max/3]`` (so no entry errs by more than max/2)."""
    n = values.size
    x = np.zeros(n_chunks(n) * CHUNK_SIZE, dtype=np.float64)
    x[:n] = values
    x = x.reshape(-1, CHUNK_SIZE)
    real = (np.arange(x.size) < n).reshape(x.shape)  # the last chunk's padding takes no level
    m = np.abs(x).max(axis=1)
    s = m * (_Q2_START / 3)
    for _ in range(_Q2_ITERATIONS):
        level = np.clip(2.0 * np.rint((x / np.where(s > 0, s, 1.0)[:, None] - 1.0) / 2.0) + 1.0, -3.0, 3.0)
        level = np.where(real, level, 0.0)
        fit = (x * level).sum(axis=1) / np.maximum((level * level).sum(axis=1), 1.0)
        s = np.clip(fit, m / 6, m / 3)
    return s


def q1_scales(values: np.ndarray) -> np.ndarray:
    """float64 q1 scale per chunk: the mean |v| over the chunk's real entries (least squares for +-s)."""
    n = values.size
    x = np.zeros(n_chunks(n) * CHUNK_SIZE, dtype=np.float64)
    x[:n] = np.abs(values.astype(np.float64))
    counts = np.full(n_chunks(n), CHUNK_SIZE, dtype=np.float64)
    if n % CHUNK_SIZE:
        counts[-1] = n % CHUNK_SIZE
    return x.reshape(-1, CHUNK_SIZE).sum(axis=1) / counts


def _scales(fmt: str, values: np.ndarray) -> np.ndarray:
    if fmt == "q2":
        return q2_scales(values)
    if fmt == "q1":
        return q1_scales(values)
    return chunk_max_abs(values) / QMAX[fmt]


def levels(fmt: str, codes: np.ndarray) -> np.ndarray:
    """float32 level of each code (the q2 and q1 codes are indices into their level tables)."""
    if fmt == "q2":
        return Q2_LEVELS[codes]
    if fmt == "q1":
        return Q1_LEVELS[codes]
    return codes.astype(np.float32)


def quantize(fmt: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (f32 scales per chunk, int codes). For q2 the codes are 0..3 level indices, for q1 0..1."""
    qmax = QMAX[fmt]
    scales = _scales(fmt, values).astype(np.float32)
    if not bool(np.all(np.isfinite(scales))):  # pragma: no cover - max|f32| / qmax is always finite
        raise ValidationError("values too large to quantize")
    per = expand_scales(scales, values.size).astype(np.float64)
    safe = np.where(per > 0, per, 1.0)
    ratio = values.astype(np.float64) / safe
    if fmt == "q2":
        # nearest odd level in {-3,-1,1,3}: level = 2*rint((r-1)/2) + 1, clipped; code = (level + 3) / 2
        level = np.clip(2.0 * np.rint((ratio - 1.0) / 2.0) + 1.0, -3.0, 3.0)
        codes = ((level + 3.0) / 2.0).astype(np.int64)
    elif fmt == "q1":
        codes = (values >= 0).astype(np.int64)
    else:
        codes = np.clip(np.rint(ratio), -qmax, qmax).astype(np.int64)
    return scales, codes


def pack_codes(fmt: str, codes: np.ndarray) -> bytes:
    if fmt == "q8":
        return codes.astype(np.int8).tobytes()
    if fmt == "q4":
        nib = (codes + 8).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    if fmt == "q1":
        return np.packbits(codes.astype(np.uint8), bitorder="little").tobytes()
    c = codes.astype(np.uint8)
    pad = (-c.size) % 4
    if pad:
        c = np.append(c, np.zeros(pad, dtype=np.uint8))
    c = c.reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8).tobytes()


def code_bytes(fmt: str, n: int) -> int:
    return {"q8": n, "q4": -(-n // 2), "q2": -(-n // 4), "q1": -(-n // 8)}[fmt]


def unpack_levels(fmt: str, raw: np.ndarray, n: int) -> np.ndarray:
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
    if fmt == "q1":
        bits = np.unpackbits(raw, bitorder="little")
        if bool(np.any(bits[n:] != 0)):
            raise ValidationError("q1 padding bits must be 0")
        return Q1_LEVELS[bits[:n]]
    codes = np.empty(raw.size * 4, dtype=np.uint8)
    for k in range(4):
        codes[k::4] = (raw >> (2 * k)) & 0x03
    if bool(np.any(codes[n:] != 0)):
        raise ValidationError("q2 padding bits must be 0")
    return Q2_LEVELS[codes[:n]]
