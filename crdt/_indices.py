"""Index codings of the sparse payload codecs: LEB128 gaps, and fixed-width positions in fixed-k chunks.

Theory of operation
-------------------
A sparse payload names the fragment entries it updates, strictly increasing. Two codings:

**Gaps** (``sparse-*``, ``dct-q8``): ``n`` unsigned LEB128 varints, ``indices[0]`` then
``indices[i] - indices[i-1] - 1``, so any decodable sequence is strictly increasing by construction and
only the last index needs a range check. Strict: exactly ``n`` varints filling exactly ``m`` bytes, at most
5 bytes each, no overlong encodings (a multi-byte varint's last byte is not 0), every gap ``< length``.
At top-k density d a gap is about 1/d, so an index costs 1 byte up to d = 1/128 (and ~9 bits at 1/64,
where one gap in seven needs a second byte). Any selection of entries can be coded.

**Chunked** (``chunked-*``): the fragment is cut into chunks of ``B = 2**b`` entries (the last one
``length - (C - 1)·B`` long, C = ceil(length / B)) and every chunk carries exactly ``k`` entries (the last
``min(k, its length)``), so the entry count ``n`` follows from (length, b, k) and each index is its
``b``-bit position within its chunk: 6 bits at B = 64 whatever the values, a quarter below the gaps at
d = 1/64, and below the ~7.4 bits that any coding of an unconstrained 1/64 subset needs (its entropy),
because the layout admits fewer subsets. The encoder must pick top-k *per chunk* (DeMo, SparseLoCo), which
error feedback makes nearly as good as a global top-k (``python -m training.codec_report``). Positions are
packed ``b`` bits each, least significant bit first, entry after entry (entry i holds bits
``[i·b, (i+1)·b)`` of the little-endian bit stream), unused tail bits 0. Strict: positions strictly
increase within a chunk and the last chunk's stay below its length; numpy's packbits/unpackbits with
``bitorder="little"`` are exact bit shuffles, the same on every platform.

Rejected: Golomb-Rice or arithmetic-coded gaps (~7.5 bits at d = 1/64, but a variable-length bit parser
in the trust boundary and a data-dependent size); enumerating each chunk's k-subset (log2 C(B, k) bits:
for k = 1 it is the same 6 bits, for larger k it needs big-integer arithmetic for a tenth of a bit);
u32 indices (32 bits).
"""

from __future__ import annotations

import numpy as np

from crdt.errors import ValidationError

__all__ = [
    "MAX_CHUNK_BITS",
    "chunk_counts_ok",
    "chunked_entries",
    "decode_gaps",
    "decode_positions",
    "encode_gaps",
    "encode_positions",
    "position_bytes",
]

#: Bytes of the longest varint (a gap below 2**32 needs 32 bits = 5 groups of 7).
_MAX_VARINT = 5
#: Largest b of a chunked coding: chunks of up to 65,536 entries, positions of up to 16 bits (a density
#: far below 1/65,536 is not a top-k anyone trains with).
MAX_CHUNK_BITS = 16


# ---------------------------------------------------------------------------------------------------------
# LEB128 gaps
# ---------------------------------------------------------------------------------------------------------


def encode_gaps(indices: np.ndarray) -> bytes:
    """Strictly increasing indices -> LEB128 varints of their gaps."""
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


def decode_gaps(raw: np.ndarray, n: int, length: int) -> np.ndarray:
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
# Fixed-k chunks
# ---------------------------------------------------------------------------------------------------------


def chunked_entries(length: int, bits: int, k: int) -> int:
    """n: entries of a chunked payload (every chunk k, the last ``min(k, its length)``). Python ints."""
    size = 1 << bits
    chunks = -(-length // size)
    if chunks == 0:
        return 0
    return (chunks - 1) * k + min(k, length - (chunks - 1) * size)


def chunk_counts_ok(indices: np.ndarray, length: int, bits: int, k: int) -> bool:
    """Whether strictly increasing ``indices`` hold exactly the chunked layout's count in every chunk."""
    chunks = -(-length // (1 << bits))
    if chunks == 0:
        return indices.size == 0
    counts = np.bincount(indices.astype(np.int64) >> bits, minlength=chunks)
    last = length - (chunks - 1) * (1 << bits)
    return bool(np.all(counts[:-1] == k)) and int(counts[-1]) == min(k, last)


def encode_positions(indices: np.ndarray, bits: int) -> bytes:
    """Indices of a valid chunked selection -> their ``bits``-bit in-chunk positions, packed LSB first."""
    pos = indices.astype(np.uint32) & np.uint32((1 << bits) - 1)
    flat = np.empty(pos.size * bits, dtype=np.uint8)
    for j in range(bits):  # bit j of every position: a strided plane, n bytes of temporaries
        flat[j::bits] = (pos >> np.uint32(j)) & np.uint32(1)
    return np.packbits(flat, bitorder="little").tobytes()


def position_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def decode_positions(raw: np.ndarray, length: int, bits: int, k: int) -> np.ndarray:
    """Packed positions -> uint32 fragment indices, enforcing the module docstring's rules; ``raw`` holds
    exactly ``position_bytes(n, bits)`` bytes (the caller checked the payload's size)."""
    n = chunked_entries(length, bits, k)
    flat = np.unpackbits(raw, bitorder="little")
    if bool(np.any(flat[n * bits :])):
        raise ValidationError("chunked positions: padding bits must be 0")
    pos = np.zeros(n, dtype=np.int64)
    for j in range(bits):
        pos |= flat[j : n * bits : bits].astype(np.int64) << j
    indices = ((np.arange(n, dtype=np.int64) // max(k, 1)) << bits) + pos  # entry i is in chunk i // k
    if n > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise ValidationError("chunked positions must increase strictly within a chunk")
    if n and int(indices[-1]) >= length:
        raise ValidationError(f"index {int(indices[-1])} out of range for fragment length {length}")
    return indices.astype(np.uint32)
