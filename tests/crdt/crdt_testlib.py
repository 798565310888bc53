"""Shared builders for crdt tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable

import numpy as np

from crdt import (
    MAX_AUTHORS,
    Contribution,
    Genesis,
    Signer,
    Snapshot,
    SnapshotReader,
    encode_payload,
    make_contribution,
)

BASE = b"\x00" * 32


def signer(i: int) -> Signer:
    return Signer.from_seed(hashlib.sha256(b"seed-%d" % i).digest())


SIGNERS = [signer(i) for i in range(6)]


def genesis(length: int = 96, n_fragments: int = 3, seed: int = 0) -> Genesis:
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(length).astype(np.float32)
    step = length // n_fragments
    bounds = [i * step for i in range(n_fragments)] + [length]
    return Genesis(params, tuple(itertools.pairwise(bounds)), {"task": "test"})


def contribution(g: Genesis, s: Signer, seq: int, *, seed: int = 0, codec: str = "sparse-q8",
                 weight: float = 0.5, density: float = 0.3) -> Contribution:
    rng = np.random.default_rng([seed, seq, s.public_key[0]])
    fragment = int(rng.integers(len(g.fragments)))
    n = g.fragment_length(fragment)
    k = max(1, int(n * density))
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.uint32)
    vals = (rng.standard_normal(k) * 0.01).astype(np.float32)
    payload = encode_payload(codec, n, idx,
                             vals)
    return make_contribution(s, genesis_id=g.id, seq=seq, fragment=fragment, codec=codec, payload=payload,
                             weight=weight, base_version=BASE)


def history(g: Genesis, n_authors: int, per_author: int, *, seed: int = 0) -> list[Contribution]:
    codecs = ["sparse-q8", "sparse-q4", "sparse-q2", "sparse-f32"]
    return [contribution(g, SIGNERS[a], s, seed=seed, codec=codecs[(a + s) % 4], weight=0.25 * (1 + a))
            for a in range(n_authors) for s in range(1, per_author + 1)]


def read_snapshot(g: Genesis, stream: bytes | Iterable[bytes], *, max_authors: int = MAX_AUTHORS,
                  chunk: int = 0) -> Snapshot:
    """Decode a snapshot stream (fed in ``chunk``-byte pieces when chunk > 0)."""
    data = stream if isinstance(stream, bytes) else b"".join(stream)
    reader = SnapshotReader(g, max_authors=max_authors)
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        reader.feed(data[i : i + step])
    return reader.finish()
