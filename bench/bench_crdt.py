"""Benchmark the crdt: apply throughput, snapshot size/speed, the state's memory, digests vs authors.

Run: ``python bench/bench_crdt.py [--quick]``. Prints a table and writes bench/results/crdt.json.

What is measured (single thread, same process, same sizes):

* apply: ``ModelState.apply`` of signed sparse contributions (signature verify + payload decode + norm
  check + fixed-point scatter-add), reported as contributions/s and sparse entries/s, with a breakdown,
  next to the cost of a plain ``np.add`` of a dense float32 fragment (what a naive dense merge does) and a
  raw float32 scatter-add of the same entries (the floor for any sparse merge).
* real accumulators: a few rounds of real DiLoCo (digits, and stdlib-lm unless --quick) applied through
  ModelState; order-0 entropy of their zigzag byte planes against the snapshot encoding and plain
  zlib/zstd on the raw int64 layout.
* per model size (10M/30M/100M, 1M with --quick): accumulators bootstrapped (seeded, with replacement)
  from the real stdlib-lm one, so the per-entry distribution is a measured one; snapshot bytes per
  parameter, encode and decode+restore speed in MB of int64 accumulator per second, and the state's
  peak memory per parameter (genesis 4 B + accumulator 8 B + the operation's temporaries, traced with
  tracemalloc, which sees numpy's buffers) during encode, restore, full hash, apply and materialize(out=).
* per mesh size: digest bytes, encode/decode time (decoder capped at the author count), plan_sync.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
import tracemalloc
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


# -- snapshots and memory ------------------------------------------------------------------------------------


def real_accumulator(task: str, peers: int, rounds: int) -> np.ndarray:
    """The accumulator after ``rounds`` rounds of ``peers`` real DiLoCo peers on ``task`` (the task's
    default settings: sparse-q8, error feedback), every contribution applied through ModelState."""
    import torch

    import training

    torch.set_num_threads(1)
    t = training.load_task(task)
    cfg = training.DilocoConfig.for_task(t, {"expected_peers": peers, "device": "cpu"})
    trainers = [training.PeerTrainer(t, cfg, shard=i, num_shards=peers) for i in range(peers)]
    g = crdt.Genesis(training.flatten_params(t.build_model()), trainers[0].fragments, {"task": task})
    state = crdt.ModelState(g)
    signers = [crdt.Signer.from_seed(hashlib.sha256(b"real-%d" % i).digest()) for i in range(peers)]
    for r in range(rounds):
        theta = state.materialize()
        for i, tr in enumerate(trainers):
            res = tr.run_round(theta, fragment=r % len(g.fragments))
            state.apply(crdt.make_contribution(signers[i], genesis_id=g.id, seq=r + 1, fragment=res.fragment,
                                               codec=res.codec, payload=res.payload, weight=res.weight,
                                               base_version=b"\0" * 32))
    return state.accumulator.copy()


def _planes(acc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((acc << 1) ^ (acc >> 63)).view(np.uint8).reshape(-1, 8).T)


def entropy_row(task: str, acc: np.ndarray) -> dict[str, float | str]:
    """Order-0 entropy of each zigzag byte plane (their sum bounds the per-entry entropy from above)
    against what general-purpose compressors make of the raw and plane-split layouts."""
    import zlib

    import zstandard

    n = acc.size
    planes = _planes(acc)
    h = 0.0
    for p in planes:
        freq = np.bincount(p, minlength=256) / n
        h -= float(np.sum(freq[freq > 0] * np.log2(freq[freq > 0]))) / 8
    raw = acc.astype("<i8").tobytes()
    z = zstandard.ZstdCompressor(level=1)
    nz = acc[acc != 0].astype(np.float64) * crdt.QUANTUM
    return {
        "task": task, "params": n, "zero_fraction": float(np.mean(acc == 0)),
        "abs_p50_units": float(np.median(np.abs(nz))), "abs_p99_units": float(np.percentile(np.abs(nz), 99)),
        "plane_entropy_bytes_per_param": h,
        "zstd_planes_bytes_per_param": sum(len(z.compress(p.tobytes())) for p in planes if p.any()) / n,
        "zlib_planes_bytes_per_param": sum(len(zlib.compress(p.tobytes(), 6)) for p in planes if p.any()) / n,
        "zstd_raw_bytes_per_param": len(z.compress(raw)) / n,
        "zlib_raw_bytes_per_param": len(zlib.compress(raw, 6)) / n,
        "snapshot_bytes_per_param": len(b"".join(_state_from(acc).snapshot_parts())) / n,
    }


def _genesis_of(d: int) -> crdt.Genesis:
    bounds = np.linspace(0, d, 17).astype(int).tolist()  # 16 fragments
    params = np.zeros(d, dtype=np.float32)
    params[::7] = 0.02
    return crdt.Genesis(params, tuple(itertools.pairwise(bounds)), {"task": "bench"})


def _state_from(acc: np.ndarray, g: crdt.Genesis | None = None) -> crdt.ModelState:
    """A state holding ``acc`` (through the own-snapshot path, as a restarting node would)."""
    from crdt.snapshot import SnapshotHeader, combine_state_hash, encode_snapshot, fragment_digest

    g = g or crdt.Genesis(np.zeros(acc.size, np.float32), ((0, acc.size),))
    vv = crdt.VersionVector()
    header = SnapshotHeader(g.id, vv, combine_state_hash(g.id, vv, [fragment_digest(acc[a:b])
                                                                    for a, b in g.fragments]), True)
    reader = crdt.SnapshotReader(g, max_authors=crdt.MAX_AUTHORS)
    for part in encode_snapshot(g, header, acc):
        reader.feed(part)
    return crdt.ModelState.from_own_snapshot(g, reader.finish())


def _bootstrap(source: np.ndarray, d: int) -> np.ndarray:
    """``d`` entries drawn (seeded, with replacement) from a real accumulator: the same per-entry
    distribution, at any size; built in blocks so the sampling indices stay small."""
    rng = np.random.default_rng(7)
    out = np.empty(d, dtype=np.int64)
    for s in range(0, d, 2**22):
        e = min(s + 2**22, d)
        out[s:e] = source[rng.integers(0, source.size, e - s)]
    return out


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes allocated (numpy buffers included) at the peak of ``fn``, above what was live before it."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def bench_size(d: int, source: np.ndarray) -> dict[str, float]:
    """Snapshot size and speed, and the state's memory per parameter, for a model of ``d`` params whose
    accumulator is bootstrapped from a real one."""
    g = _genesis_of(d)
    state = _state_from(_bootstrap(source, d), g)
    base = g.params.nbytes + state.accumulator_bytes  # what the state holds for good: about 8 B/param
    t_enc = _best(lambda: sum(len(p) for p in state.snapshot_parts()), 2)
    parts = list(state.snapshot_parts())
    size = sum(len(p) for p in parts)

    def restore() -> crdt.ModelState:
        reader = crdt.SnapshotReader(g, max_authors=crdt.MAX_AUTHORS)
        for p in parts:
            reader.feed(p)
        return crdt.ModelState.from_own_snapshot(g, reader.finish())

    t_dec = _best(restore, 2)
    out = np.empty(d, np.float32)
    t_mat = _best(lambda: state.materialize(out=out), 2)

    def full_hash() -> str:
        state._cache_hash = None  # measure the real cost, not the cache
        state._acc._hashes = [None] * len(g.fragments)
        return state.state_hash

    t_hash = _best(full_hash, 2)
    frag = g.fragment_length(0)
    idx = np.arange(0, frag, 10, dtype=np.uint32)  # a 10 % sparse-q8 contribution to fragment 0
    payload = crdt.encode_payload("sparse-q8", frag, idx, np.full(idx.size, 1e-3, np.float32))
    one = crdt.make_contribution(crdt.Signer.from_seed(b"\7" * 32), genesis_id=g.id, seq=1, fragment=0,
                                 codec="sparse-q8", payload=payload, weight=1.0, base_version=b"\0" * 32)
    buf = np.empty(d, np.float32)  # the caller's buffer (e.g. shared memory): not the state's memory
    peaks = {
        "encode": base + _peak_bytes(lambda: sum(len(p) for p in state.snapshot_parts())),
        "restore": g.params.nbytes + _peak_bytes(restore),
        "state_hash": base + _peak_bytes(full_hash),
        "apply": base + _peak_bytes(lambda: (state.apply(one), state.state_hash)),
        "materialize_out": base + _peak_bytes(lambda: state.materialize(out=buf)),
    }
    return {
        "model_params": d,
        "snapshot_bytes": size,
        "snapshot_bytes_per_param": size / d,
        "encode_mb_per_s": 8 * d / t_enc / 1e6,
        "decode_restore_mb_per_s": 8 * d / t_dec / 1e6,
        "encode_s": t_enc,
        "decode_restore_s": t_dec,
        "materialize_out_ms": 1e3 * t_mat,
        "state_hash_full_ms": 1e3 * t_hash,
        **{f"peak_{k}_bytes_per_param": v / d for k, v in peaks.items()},
    }


def bench_peers(authors: int) -> dict[str, float | None]:
    """Cost of one anti-entropy exchange as the mesh grows: every author has contributed; the remote
    lacks the last contribution of every author (the worst case a round of gossip loss leaves). Above
    1,024 authors only the digest is timed (the decoder is given ``max_authors=authors``)."""
    signers = [hashlib.sha256(b"peer-%d" % i).digest() for i in range(authors)]
    remote_vv = crdt.VersionVector.from_dict(dict.fromkeys(signers, 1))
    remote = crdt.Digest(remote_vv, "00" * 32, remote_vv.total)
    wire = remote.encode()
    plan_ms = None
    if authors <= 1024:
        g = _genesis(10_000, 1)
        state = crdt.ModelState(g)
        payload = crdt.encode_payload("sparse-f32", 10_000, np.arange(8, dtype=np.uint32),
                                      np.ones(8, np.float32))
        for i in range(authors):
            signer = crdt.Signer.from_seed(hashlib.sha256(b"peer-%d" % i).digest())
            for seq in (1, 2):
                state.apply(crdt.make_contribution(signer, genesis_id=g.id, seq=seq, fragment=0,
                                                   codec="sparse-f32", payload=payload, weight=1e-3,
                                                   base_version=b"\0" * 32))
        remote_vv = crdt.VersionVector.from_dict(dict.fromkeys(state.version_vector, 1))
        remote = crdt.Digest(remote_vv, "00" * 32, remote_vv.total)
        plan_ms = _best(lambda: crdt.plan_sync(state, remote, max_count=authors)) * 1e3
    return {
        "authors": authors,
        "digest_bytes": len(wire),
        "digest_encode_ms": _best(lambda: crdt.Digest(remote_vv, "00" * 32, remote_vv.total).encode()) * 1e3,
        "digest_decode_ms": _best(lambda: crdt.Digest.decode(wire, max_authors=authors)) * 1e3,
        "plan_sync_ms": plan_ms,
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
    real = [("digits", real_accumulator("digits", 4, 20 if args.quick else 60))]
    if not args.quick:
        real.append(("stdlib-lm", real_accumulator("stdlib-lm", 2, 40)))
    entropy_rows = [entropy_row(task, acc) for task, acc in real]
    sizes = [10**6] if args.quick else [10**7, 3 * 10**7, 10**8]
    size_rows = [bench_size(s, real[-1][1]) for s in sizes]
    peer_rows = [bench_peers(a) for a in (16, 256, 1024, 4096) + (() if args.quick else (116_500,))]

    print(f"{'codec':<11}{'frag':>10}{'dens':>6}{'contrib/s':>11}{'Mentries/s':>11}{'apply ms':>9}"
          f"{'verify':>8}{'decode':>8}{'dense add':>10}{'scatter':>9}")
    for r in apply_rows:
        print(f"{r['codec']:<11}{r['fragment_params']:>10}{r['density']:>6}{r['contributions_per_s']:>11.0f}"
              f"{r['entries_per_s'] / 1e6:>11.2f}{r['apply_ms']:>9.3f}{r['verify_ms']:>8.3f}"
              f"{r['decode_ms']:>8.3f}{r['dense_f32_add_ms']:>10.3f}{r['f32_scatter_add_ms']:>9.3f}")
    print("\nreal accumulators, bytes per parameter:")
    print(f"{'task':<10}{'params':>9}{'zeros':>7}{'|x| p50':>9}{'entropy':>8}{'snapshot':>9}{'zstd pl':>8}"
          f"{'zlib pl':>8}{'zstd raw':>9}{'zlib raw':>9}")
    for r in entropy_rows:
        print(f"{r['task']:<10}{r['params']:>9}{r['zero_fraction']:>7.3f}{r['abs_p50_units']:>9.3g}"
              f"{r['plane_entropy_bytes_per_param']:>8.2f}{r['snapshot_bytes_per_param']:>9.2f}"
              f"{r['zstd_planes_bytes_per_param']:>8.2f}{r['zlib_planes_bytes_per_param']:>8.2f}"
              f"{r['zstd_raw_bytes_per_param']:>9.2f}{r['zlib_raw_bytes_per_param']:>9.2f}")
    print(f"\nsnapshots of accumulators bootstrapped from {real[-1][0]}'s; state peak bytes per parameter:")
    print(f"{'params':>11}{'B/param':>8}{'enc MB/s':>9}{'dec MB/s':>9}{'hash ms':>8}{'matlz ms':>9}"
          f"{'pk enc':>7}{'pk rest':>8}{'pk hash':>8}{'pk apply':>9}{'pk mat':>7}")
    for r in size_rows:
        print(f"{r['model_params']:>11}{r['snapshot_bytes_per_param']:>8.2f}{r['encode_mb_per_s']:>9.0f}"
              f"{r['decode_restore_mb_per_s']:>9.0f}{r['state_hash_full_ms']:>8.0f}"
              f"{r['materialize_out_ms']:>9.0f}{r['peak_encode_bytes_per_param']:>7.2f}"
              f"{r['peak_restore_bytes_per_param']:>8.2f}{r['peak_state_hash_bytes_per_param']:>8.2f}"
              f"{r['peak_apply_bytes_per_param']:>9.2f}{r['peak_materialize_out_bytes_per_param']:>7.2f}")
    print(f"\n{'authors':>8}{'digest B':>10}{'enc ms':>8}{'dec ms':>8}{'plan_sync ms':>13}")
    for r in peer_rows:
        plan = "-" if r["plan_sync_ms"] is None else f"{r['plan_sync_ms']:.3f}"
        print(f"{r['authors']:>8}{r['digest_bytes']:>10}{r['digest_encode_ms']:>8.3f}"
              f"{r['digest_decode_ms']:>8.3f}{plan:>13}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine()},
        "apply": apply_rows, "real_accumulators": entropy_rows, "sizes": size_rows, "peers": peer_rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
