"""Index codings of the sparse payload codecs: LEB128 gaps, fixed-k chunk positions, Rice-coded gaps.

Theory of operation
-------------------
A sparse payload names the fragment entries it updates, strictly increasing. Three codings:

**Gaps** (``sparse-*``, ``dct-q8``): ``n`` unsigned LEB128 varints, ``indices[0]`` then
``indices[i] - indices[i-1] - 1``, so any decodable sequence is strictly increasing by construction and
only the last index needs a range check. Strict: exactly ``n`` varints filling exactly ``m`` bytes, at most
5 bytes each, no overlong encodings (a multi-byte varint's last byte is not 0), every gap ``< length``.
At top-k density d a gap is about 1/d, so an index costs 1 byte up to d = 1/128 (and ~9 bits at 1/64,
where one gap in seven needs a second byte). Any selection of entries can be coded.

**Chunked** (``chunked-*``): the fragment is cut into chunks of ``B = 2**b`` entries (the last one
``length - (C - 1)·B`` long, C = ceil(length / B)) and every chunk carries exactly ``k`` entries (the last
``min(k, its length)``), so the entry count ``n`` follows from (length, b, k) and each index is its
``b``-bit position within its chunk: 6 bits at B = 64 whatever the values, a quarter below the varint
gaps at d = 1/64. The price is the selection: the encoder must pick top-k *per chunk* (DeMo, SparseLoCo),
which spreads the budget evenly where a global top-k follows the update (in training: 3 % higher loss at
the same density, about the same at the same bytes; README). Positions are
packed ``b`` bits each, least significant bit first, entry after entry (entry i holds bits
``[i·b, (i+1)·b)`` of the little-endian bit stream), unused tail bits 0. Strict: positions strictly
increase within a chunk and the last chunk's stay below its length; numpy's packbits/unpackbits with
``bitorder="little"`` are exact bit shuffles, the same on every platform.

**Rice** (``rice-*``): the gaps again, each group of ``RICE_GROUP`` = 64 consecutive gaps with its own
parameter ``r`` (a byte, ``<= 31``): a gap is its quotient ``gap >> r`` in unary (that many 0 bits, then
a 1) and its ``r`` low bits. Top-k is anything but uniform: it clusters in the tensors whose update is
largest (a tenth of the head's entries, almost none of others'), so the gaps run from 0 to thousands and
one varint byte per gap is mostly wasted; a Rice parameter per 64 gaps follows the local density. On real
stdlib-lm updates at density 1/64 the indices cost 3.4-3.9 bits instead of 8.0-8.2 (their empirical
entropy: 2.9-3.6 bits), at 1/32 2.0-2.8. Unary quotients and remainders travel in two separate bit
streams (least significant bit first), so decoding is vectorized: the positions of the 1 bits give every
quotient at once, and the remainders sit at offsets known from the parameters. Strict: exactly ``n`` 1
bits in the unary stream, which ends in the byte of its last 1 (no trailing byte), zero padding in both
streams, every gap below ``length`` (a quotient that would overflow 32 bits is refused before it is
shifted). The encoder picks each group's cheapest ``r``; any ``r <= 31`` decodes.

Rejected: arithmetic or ANS coding of the gaps (closer to the entropy by another ~0.5 bit, but a
sequential, stateful decoder in the trust boundary); Golomb codes with non-power-of-two divisors
(division per gap, a hair smaller); enumerating each chunk's k-subset (log2 C(B, k) bits:
for k = 1 it is the same 6 bits, for larger k it needs big-integer arithmetic for a tenth of a bit);
u32 indices (32 bits).
"""

from __future__ import annotations

import numpy as np

from crdt.errors import ValidationError

__all__ = [
    "MAX_CHUNK_BITS",
    "MAX_RICE_BITS",
    "RICE_GROUP",
    "chunk_counts_ok",
    "chunked_entries",
    "decode_gaps",
    "decode_positions",
    "decode_rice",
    "encode_gaps",
    "encode_positions",
    "encode_rice",
    "position_bytes",
    "rice_groups",
    "rice_remainder_bytes",
]

#: Bytes of the longest varint (a gap below 2**32 needs 32 bits = 5 groups of 7).
_MAX_VARINT = 5
#: Largest b of a chunked coding: chunks of up to 65,536 entries, positions of up to 16 bits (a density
#: far below 1/65,536 is not a top-k anyone trains with).
MAX_CHUNK_BITS = 16
#: Gaps per Rice parameter: small enough to follow the density from one tensor to the next, big enough
#: that the parameter byte costs 1/8 bit per index (measured best of 16..128 on real updates).
RICE_GROUP = 64
#: Largest Rice parameter: gaps are below 2**32.
MAX_RICE_BITS = 31


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


# ---------------------------------------------------------------------------------------------------------
# Rice-coded gaps
# ---------------------------------------------------------------------------------------------------------


def rice_groups(n: int) -> int:
    """Groups of up to RICE_GROUP gaps, one Rice parameter each."""
    return -(-n // RICE_GROUP)


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = indices.astype(np.int64)
    gaps[1:] = np.diff(gaps) - 1
    return gaps


def encode_rice(indices: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """Strictly increasing indices -> (parameters, unary quotients, remainders): each group's ``r`` is the
    one that minimizes its bits, sum of ``(gap >> r) + 1 + r``."""
    gaps = _gaps(indices)
    n = gaps.size
    group = np.arange(n) // RICE_GROUP
    cost = np.stack([np.bincount(group, (gaps >> r) + 1 + r, minlength=rice_groups(n))
                     for r in range(MAX_RICE_BITS + 1)])  # (32, G) bits of each group at each r
    params = np.argmin(cost, axis=0).astype(np.uint8) if n else np.zeros(0, np.uint8)
    width = params[group].astype(np.int64)
    quotient = gaps >> width
    unary = np.zeros(int((quotient + 1).sum()), dtype=np.uint8)
    unary[np.cumsum(quotient + 1) - 1] = 1  # q zeros, then a one
    rest = np.zeros(int(width.sum()), dtype=np.uint8)
    offset = np.cumsum(width) - width
    for j in range(int(width.max()) if n else 0):
        has = width > j
        rest[offset[has] + j] = (gaps[has] >> j) & 1
    return params.tobytes(), _pack(unary), _pack(rest)


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def rice_remainder_bytes(params: np.ndarray, n: int) -> int:
    """Bytes of the remainder stream: ``r`` bits for every gap of a group with parameter ``r``."""
    sizes = np.full(params.size, RICE_GROUP, dtype=np.int64)
    if params.size:
        sizes[-1] = n - RICE_GROUP * (params.size - 1)
    return -(-int((params.astype(np.int64) * sizes).sum()) // 8)


def decode_rice(params: np.ndarray, unary: np.ndarray, rest: np.ndarray, n: int, length: int) -> np.ndarray:
    """The three streams of :func:`encode_rice` -> uint32 indices, enforcing every rule of the module
    docstring. The caller checked that every parameter is ``<= MAX_RICE_BITS`` and that ``rest`` has
    exactly ``rice_remainder_bytes(params, n)`` bytes (it sized the payload by them)."""
    bits = np.unpackbits(unary, bitorder="little")
    ones = np.flatnonzero(bits)
    if ones.size != n or (n and unary.size != -(-(int(ones[-1]) + 1) // 8)) or (not n and unary.size):
        raise ValidationError(f"rice gaps: {unary.size} unary bytes do not hold exactly {n} quotients")
    quotient = np.diff(ones, prepend=-1) - 1
    width = params[np.arange(n) // RICE_GROUP].astype(np.int64)
    if bool(np.any(quotient >= (np.int64(1) << (32 - width)))):  # the gap would not fit 32 bits
        raise ValidationError(f"rice gaps: a gap is out of range for fragment length {length}")
    flat = np.unpackbits(rest, bitorder="little")
    used = int(width.sum())
    if bool(np.any(flat[used:])):
        raise ValidationError("rice gaps: padding bits must be 0")
    offset = np.cumsum(width) - width
    gaps = quotient << width
    for j in range(int(width.max()) if n else 0):
        has = width > j
        gaps[has] |= flat[offset[has] + j].astype(np.int64) << j
    if n and int(gaps.max()) >= length:
        raise ValidationError(f"rice gaps: a gap is out of range for fragment length {length}")
    indices = np.cumsum(gaps + 1) - 1  # < n * 2**32 < 2**63: no overflow
    if n and int(indices[-1]) >= length:
        raise ValidationError(f"index {int(indices[-1])} out of range for fragment length {length}")
    return indices.astype(np.uint32)
