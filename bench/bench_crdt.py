"""Benchmark the crdt merge path: apply throughput vs a dense numpy add, and digest/snapshot cost vs size.

Run: ``python bench/bench_crdt.py [--quick]``. Prints a table and writes bench/results/crdt.json.

What is measured (single thread, same process, same sizes):

* apply: ``ModelState.apply`` of signed sparse contributions (signature verify + payload decode + norm
  check + fixed-point scatter-add), reported as contributions/s and sparse entries/s, with a breakdown,
  next to the cost of a plain ``np.add`` of a dense float32 fragment (what a naive dense merge does) and a
  raw float32 scatter-add of the same entries (the floor for any sparse merge).
* per model size: state_hash after a change (blake2b over the int64 accumulator), Digest encode,
  snapshot encode + decode + from_snapshot, materialize.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

import crdt

RESULTS = Path(__file__).resolve().parent / "results" / "crdt.json"


def _best(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best-of-N wall time in seconds (least noisy estimate of the cost)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _genesis(d: int, n_frag: int) -> crdt.Genesis:
    bounds = np.linspace(0, d, n_frag + 1).astype(int).tolist()
    params = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    return crdt.Genesis(params, tuple(itertools.pairwise(bounds)), {"task": "bench"})


def _contributions(g: crdt.Genesis, n: int, density: float, codec: str) -> list[crdt.Contribution]:
    rng = np.random.default_rng(1)
    signers = [crdt.Signer.from_seed(hashlib.sha256(b"bench-%d" % i).digest()) for i in range(8)]
    out = []
    for k in range(n):
        frag = k % len(g.fragments)
        length = g.fragment_length(frag)
        nnz = max(1, int(length * density))
        idx = np.sort(rng.choice(length, size=nnz, replace=False)).astype(np.uint32)
        vals = (rng.standard_normal(nnz) * 1e-3).astype(np.float32)
        payload = crdt.encode_payload(codec, length, idx, vals)
        out.append(crdt.make_contribution(signers[k % 8], genesis_id=g.id, seq=k // 8 + 1, fragment=frag,
                                          codec=codec, payload=payload, weight=1.0, base_version=b"\0" * 32))
    return out


def bench_apply(d: int, n_frag: int, density: float, codec: str, n: int) -> dict[str, float]:
    g = _genesis(d, n_frag)
    cs = _contributions(g, n, density, codec)
    entries = sum(crdt.decode_payload(c.codec, g.fragment_length(c.fragment), c.payload)[0].size for c in cs)
    state = crdt.ModelState(g)
    t0 = time.perf_counter()
    for c in cs:
        state.apply(c)
    t_apply = time.perf_counter() - t0
    c0 = cs[0]
    flen = g.fragment_length(c0.fragment)
    t_verify = _best(lambda: c0.verify(), 20)
    t_decode = _best(lambda: crdt.decode_payload(c0.codec, flen, c0.payload), 20)
    t_wire = _best(lambda: crdt.Contribution.decode(c0.encode()), 20)
    dense = np.zeros(flen, np.float32)
    upd = np.random.default_rng(2).standard_normal(flen).astype(np.float32)
    t_dense = _best(lambda: np.add(dense, upd, out=dense), 20)
    idx, vals = crdt.decode_payload(c0.codec, flen, c0.payload)
    t_scatter = _best(lambda: dense.__setitem__(idx, dense[idx] + vals), 20)
    return {
        "model_params": d, "fragments": n_frag, "fragment_params": flen, "density": density, "codec": codec,
        "contributions": n, "payload_bytes": len(c0.payload),
        "contributions_per_s": n / t_apply, "entries_per_s": entries / t_apply,
        "apply_ms": 1e3 * t_apply / n, "verify_ms": 1e3 * t_verify, "decode_ms": 1e3 * t_decode,
        "wire_decode_ms": 1e3 * t_wire,
        "dense_f32_add_ms": 1e3 * t_dense, "f32_scatter_add_ms": 1e3 * t_scatter,
    }


def bench_size(d: int) -> dict[str, float]:
    g = _genesis(d, 8)
    state = crdt.ModelState(g)
    state.apply(_contributions(g, 1, 0.01, "sparse-q8")[0])

    def full_hash() -> str:
        state._cache_hash = None  # measure the real cost, not the cache
        state._frag_hash = [None] * len(g.fragments)
        return state.state_hash

    def hash_after_apply() -> str:
        state._cache_hash = None  # what a digest costs right after one apply (one fragment dirty)
        state._frag_hash[0] = None
        return state.state_hash

    snap = state.snapshot()
    blob = snap.encode()
    return {
        "model_params": d,
        "state_hash_full_ms": 1e3 * _best(full_hash, 3),
        "state_hash_after_apply_ms": 1e3 * _best(hash_after_apply, 3),
        "digest_encode_ms": 1e3 * _best(lambda: state.digest().encode(), 3),
        "snapshot_ms": 1e3 * _best(state.snapshot, 3),
        "snapshot_encode_ms": 1e3 * _best(snap.encode, 3),
        "snapshot_decode_ms": 1e3 * _best(lambda: crdt.Snapshot.decode(blob), 3),
        "from_snapshot_ms": 1e3 * _best(lambda: crdt.ModelState.from_snapshot(g, snap), 3),
        "materialize_ms": 1e3 * _best(state.materialize, 3),
        "dense_f32_add_ms": 1e3 * _best(lambda: np.add(g.params, g.params), 3),
        "snapshot_bytes": len(blob),
    }


def bench_peers(authors: int) -> dict[str, float]:
    """Cost of one anti-entropy exchange as the mesh grows: every author has contributed; the remote
    lacks the last contribution of every author (the worst case a round of gossip loss leaves)."""
    g = _genesis(10_000, 1)
    state = crdt.ModelState(g)
    payload = crdt.encode_payload("sparse-f32", 10_000, np.arange(8, dtype=np.uint32), np.ones(8, np.float32))
    for i in range(authors):
        signer = crdt.Signer.from_seed(hashlib.sha256(b"peer-%d" % i).digest())
        for seq in (1, 2):
            state.apply(crdt.make_contribution(signer, genesis_id=g.id, seq=seq, fragment=0,
                                               codec="sparse-f32", payload=payload, weight=1e-3,
                                               base_version=b"\0" * 32))
    remote_vv = crdt.VersionVector.from_dict({a: 1 for a in state.version_vector})
    remote = crdt.Digest(remote_vv, "00" * 32, remote_vv.total)
    wire = remote.encode()
    return {
        "authors": authors,
        "digest_bytes": len(wire),
        "digest_encode_ms": _best(remote.encode) * 1e3,
        "digest_decode_ms": _best(lambda: crdt.Digest.decode(wire)) * 1e3,
        "plan_sync_ms": _best(lambda: crdt.plan_sync(state, remote, max_count=authors)) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args()
    d = 1_000_000 if args.quick else 10_000_000
    n = 64 if args.quick else 256
    apply_rows = [bench_apply(d, 16, dens, codec, n)
                  for codec in ("sparse-q8", "sparse-q2", "sparse-f32") for dens in (0.01, 0.1)]
    apply_rows.append(bench_apply(d, 16, 0.01, "dct-q8", n))  # decodes every entry: inverse DCT
    apply_rows.append(bench_apply(d // 16, 16, 1.0, "dense-f32", n))
    sizes = [10**5, 10**6] + ([] if args.quick else [10**7, 3 * 10**7])
    size_rows = [bench_size(s) for s in sizes]
    peer_rows = [bench_peers(a) for a in (4, 16, 64, 256) + (() if args.quick else (1024,))]

    print(f"{'codec':<11}{'frag':>10}{'dens':>6}{'contrib/s':>11}{'Mentries/s':>11}{'apply ms':>9}"
          f"{'verify':>8}{'decode':>8}{'dense add':>10}{'scatter':>9}")
    for r in apply_rows:
        print(f"{r['codec']:<11}{r['fragment_params']:>10}{r['density']:>6}{r['contributions_per_s']:>11.0f}"
              f"{r['entries_per_s'] / 1e6:>11.2f}{r['apply_ms']:>9.3f}{r['verify_ms']:>8.3f}"
              f"{r['decode_ms']:>8.3f}{r['dense_f32_add_ms']:>10.3f}{r['f32_scatter_add_ms']:>9.3f}")
    print()
    print(f"{'params':>10}{'hash ms':>9}{'hash 1f':>8}{'digest':>8}{'snap':>8}{'enc':>8}{'dec':>8}"
          f"{'restore':>9}{'materlz':>9}{'dense add':>10}{'snap MB':>9}")
    for r in size_rows:
        print(f"{r['model_params']:>10}{r['state_hash_full_ms']:>9.2f}"
              f"{r['state_hash_after_apply_ms']:>8.2f}{r['digest_encode_ms']:>8.3f}"
              f"{r['snapshot_ms']:>8.2f}{r['snapshot_encode_ms']:>8.2f}{r['snapshot_decode_ms']:>8.2f}"
              f"{r['from_snapshot_ms']:>9.2f}{r['materialize_ms']:>9.2f}{r['dense_f32_add_ms']:>10.2f}"
              f"{r['snapshot_bytes'] / 2**20:>9.1f}")
    print()
    print(f"{'authors':>8}{'digest B':>10}{'enc ms':>8}{'dec ms':>8}{'plan_sync ms':>13}")
    for r in peer_rows:
        print(f"{r['authors']:>8}{r['digest_bytes']:>10}{r['digest_encode_ms']:>8.3f}"
              f"{r['digest_decode_ms']:>8.3f}{r['plan_sync_ms']:>13.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine()},
        "apply": apply_rows, "sizes": size_rows, "peers": peer_rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
