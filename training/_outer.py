"""The outer half of a DiLoCo round: Nesterov step on the pseudo-gradient, then top-k and encoding.

Theory of operation
-------------------
    m      = μ·m + Δ                        per-peer outer momentum (skipped when μ = 0)
    update = -(outer_lr / N)·(Δ + μ·m)      Nesterov, as an additive update
    u      = update + r                     error feedback
    sent   = decode(encode(topk(u)))        exactly what every peer will add
    r      = u - sent

Memory. For a model of D parameters the trainer keeps θ_local (the model), AdamW's two moments, r,
and m when μ > 0; these functions add one D-sized float32 work vector (Δ, turned into u in place, then
into the new residual) and nothing else that grows with D: the outer step runs in place through torch
views of the numpy buffers (an axpy without a temporary), and top-k selects chunk by chunk.
Measured at 85M parameters (bench/bench_memory.py, 2026-12-01): the training process peaks at 33.6
bytes per parameter (26.9 with μ = 0), down from 57.8 before these changes.

Chunked top-k: the fragment is cut into TOPK_CHUNK-entry chunks and each chunk keeps its share of the
k entries (k·b//n - k·a//n for chunk [a, b), so the total is exactly k). Selection is each peer's own
business (receivers decode whatever indices arrive), so this changes nothing on the wire; for
fragments up to TOPK_CHUNK entries it is exactly the global top-k. A global argpartition of an 85M-entry
fragment took 12 bytes per entry of temporaries (|u| float32 + int64 indices).
"""

import math
from typing import NamedTuple

import numpy as np
import torch

import crdt

TOPK_CHUNK = 1 << 20  # entries per top-k pass: ~12 MiB of temporaries; a multiple of crdt.DCT_BLOCK
MAX_TOPK_CHUNK_BITS = 16  # the chunked codecs' largest chunk (crdt's limit); also divides TOPK_CHUNK


def outer_update(
    delta: np.ndarray,
    momentum: np.ndarray | None,
    *,
    outer_lr: float,
    outer_momentum: float,
    expected_peers: int,
) -> np.ndarray:
    """Nesterov step on pseudo-gradient `delta` as an additive update, computed in place in `delta`
    (returned); `momentum` is updated in place (unused, may be None, when outer_momentum is 0).

    Matches torch.optim.SGD(nesterov=True, lr=outer_lr/expected_peers) applied to one peer's Δ.
    """
    d = torch.from_numpy(delta)  # shares memory: every op below writes the numpy buffers
    if outer_momentum:
        assert momentum is not None and momentum.shape == delta.shape  # the trainer allocates it when μ > 0
        m = torch.from_numpy(momentum)
        m.mul_(outer_momentum).add_(d)
        d.add_(m, alpha=outer_momentum)
    d.mul_(-(outer_lr / expected_peers))
    return delta


class Compressed(NamedTuple):
    payload: bytes
    """crdt-encoded payload."""
    indices: np.ndarray
    """(m,) uint32: entries the decoded payload adds to (all n for the dense codecs and dct-q8)."""
    values: np.ndarray
    """(m,) float32: what every receiver adds there (exactly the decoded payload)."""
    kept: np.ndarray
    """(k,) uint32: the slots present in the payload: entries, or DCT coefficients for dct-q8 (a
    quantized value may still be 0); density = k / n."""

    def dense(self, n: int) -> np.ndarray:
        """(n,) float32: the decoded update as a dense vector (tests and reports)."""
        sent = np.zeros(n, dtype=np.float32)
        sent[self.indices.astype(np.int64)] = self.values
        return sent


def chunk_bits_for(density: float) -> int:
    """b of the chunked codecs' 2**b-entry chunks at top-k `density`: 64 entries (6 bits per index) down
    to density 1/64, then the smallest chunk that still keeps one entry at that density."""
    return max(crdt.DEFAULT_CHUNK_BITS, min(MAX_TOPK_CHUNK_BITS, math.ceil(math.log2(1 / density))))


def _chunked_topk(x: np.ndarray, *, bits: int, k: int) -> np.ndarray:
    """Sorted indices of the k largest |x| in every 2**bits-entry chunk (the last: min(k, its length))."""
    size = 1 << bits
    rows = -(-len(x) // size)
    mag = np.full(rows * size, -1.0, dtype=np.float32)  # padding never beats a real |x| >= 0
    mag[: len(x)] = np.abs(x)
    mag = mag.reshape(rows, size)
    if k == 1:
        top = np.argmax(mag, axis=1)[:, None]
    else:
        top = np.sort(np.argpartition(mag, size - k, axis=1)[:, size - k :], axis=1)
    sel = (top + (np.arange(rows, dtype=np.int64) * size)[:, None]).reshape(-1)
    return sel[sel < len(x)]


def compress(u: np.ndarray, *, codec: str, density: float, chunk_bits: int | None = None) -> Compressed:
    """Encode top-k(u) (all of u for the dense codecs, top-k of its DCT coefficients for dct-q8, top-k per
    2**chunk_bits entries for the chunked codecs, `chunk_bits_for(density)` unless given) and decode it
    back; `u` minus the decoded entries is the exact error-feedback residual."""
    n = u.shape[0]
    if codec in crdt.DENSE_CODECS:
        payload = crdt.encode_payload(codec, n, None, u)
        indices, values = crdt.decode_payload(codec, n, payload)
        return Compressed(payload, indices, values, indices)
    if codec in crdt.CHUNKED_CODECS:
        bits = chunk_bits or chunk_bits_for(density)
        k = min(1 << bits, max(1, round(density * (1 << bits))))
        parts = [a + _chunked_topk(u[a : a + TOPK_CHUNK], bits=bits, k=k) for a in range(0, n, TOPK_CHUNK)]
        kept = np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.uint32)
        payload = crdt.encode_payload(codec, n, kept, u[kept], chunk_bits=bits)
        indices, values = crdt.decode_payload(codec, n, payload)
        return Compressed(payload, indices, values, kept)
    transform = codec in crdt.TRANSFORM_CODECS
    k = min(-(-n // crdt.DCT_BLOCK) * crdt.DCT_BLOCK if transform else n, max(1, math.ceil(density * n)))
    parts, vals = [], []
    for a in range(0, n, TOPK_CHUNK):  # same k in both domains, so the same payload size
        b = min(n, a + TOPK_CHUNK)
        x = crdt.dct_coefficients(u[a:b]) if transform else u[a:b]  # DCT blocks never cross a chunk
        kc = min(len(x), k * b // n - k * a // n)
        if kc == 0:
            continue
        top = np.sort(np.argpartition(np.abs(x), len(x) - kc)[len(x) - kc :])
        parts.append((top + a).astype(np.uint32))
        vals.append(x[top].astype(np.float32))
    kept = np.concatenate(parts)
    payload = crdt.encode_payload(codec, n, kept, np.concatenate(vals))
    indices, values = crdt.decode_payload(codec, n, payload)
    return Compressed(payload, indices, values, kept)
