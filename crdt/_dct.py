"""The exact 64-point DCT of the ``dct-q8`` payload codec (see ``crdt/payload.py`` for its byte layout).

Theory of operation
-------------------
Every peer must synthesize bit-identical values, so the decoder uses no transcendental function, BLAS or
FFT at decode time. The basis is the integer table ``T = rint(2**14 * C)`` (C the orthonormal 64-point
DCT-II matrix; every entry of ``2**14 * C`` lies at least 0.0106 from a rounding tie, so no libm's cosine
can round it differently, and the table's digest is checked at import). A block's kept coefficients fall
into at most a few quantization chunks; for each (block, chunk) group the decoder forms
``S = sum code * T[f, :]`` exactly (integers below ``64 * 127 * 2**14 < 2**27``, exact in float64
whatever the summation order), then ``float64(S) * float64(scale) * 2**-14`` (one rounding, then an
exact power of two), adds a block's groups in chunk order, and rounds once to float32. Integer arithmetic
and single IEEE-754 operations in a fixed order: the same bits on every platform. The encoder
(:func:`dct_coefficients`, any float code) uses ``T / 2**14`` transposed, the inverse to 1e-4.

Rejected: an FFT or ``scipy.fft.idct`` at decode time (their rounding depends on the library, the CPU
and the summation order, and replicas would split on the last bit).
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["DCT_BLOCK", "dct_coefficients", "dct_slots", "dct_synthesis"]

#: Entries per DCT block of ``dct-q8`` (DeMo's chunk).
DCT_BLOCK = 64
#: Fixed-point bits of the integer DCT basis.
_DCT_BITS = 14
#: blake2b-128 of the little-endian int64 basis table (see the module docstring).
_DCT_BASIS_DIGEST = "7b4084048350dcb1faebc4cb90265684"


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


def dct_slots(length: int) -> int:
    """P: the fragment's length rounded up to whole DCT blocks."""
    return -(-length // DCT_BLOCK) * DCT_BLOCK


def dct_coefficients(values: np.ndarray) -> np.ndarray:
    """Encoder side of ``dct-q8``: float64 (P,) DCT-II coefficients of a fragment's (length,) values.

    Pick the coefficients to send (top-k by magnitude) and pass their indices and values to
    :func:`crdt.encode_payload`; the decoder's synthesis inverts this to about 1e-4 relative."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    blocks = np.zeros(dct_slots(x.size), dtype=np.float64)
    blocks[: x.size] = x
    return (blocks.reshape(-1, DCT_BLOCK) @ (_DCT_BASIS.T / 2.0**_DCT_BITS)).reshape(-1)


def dct_synthesis(
    length: int, indices: np.ndarray, codes: np.ndarray, scales: np.ndarray, *, chunk_size: int
) -> np.ndarray:
    """The exact inverse DCT of the module docstring: (length,) float32, the same bits everywhere.

    ``codes[i]`` (an integer) times ``scales[i // chunk_size]`` is coefficient ``indices[i]``."""
    out = np.zeros((dct_slots(length) // DCT_BLOCK, DCT_BLOCK), dtype=np.float64)
    n = indices.size
    if n:
        block = indices.astype(np.int64) // DCT_BLOCK
        chunk = np.arange(n) // chunk_size
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
