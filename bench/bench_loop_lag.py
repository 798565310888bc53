"""What the model state's whole-model passes cost a node's event loop, at the model sizes users run.

A replica (daemon/node/replica.py) holds a state of N parameters with a few rice-q8 contributions at the
default density (2 %). Three passes over the whole model, each done two ways in one process:

* ``on the loop`` (what the daemon did until 2026-12-02): the pass runs on the event loop, which is
  blocked for all of it;
* ``worker`` (now): the state is frozen copy-on-write (crdt/frozen.py) and the pass runs in a worker
  thread while a 1 ms ticker on the loop measures its worst scheduling delay.

The passes: the node's own periodic snapshot (hash, encode, write, fsync: ``Replica.snapshot_and_compact``;
once more with a contribution accepted in the middle of the write, whose blocks are copied for the frozen
view first), the state hash a digest needs after every change (``Replica.digest``), and materializing the
merged model for the training process (``trainer_process.fill_from``). And one record's apply
(a 2 % rice-q8 record of the whole model): ``Replica.accept`` on the loop, and ``Replica.receive``, which
decodes the payload in a worker thread first (the scatter-add and the WAL append stay on the loop).

For each: wall time, the loop's worst lag (with a record accepted meanwhile: the accept itself, which
applies on the loop, is the worst; its time is reported beside), the bytes of blocks the frozen view
copied, and the process's peak resident memory above the state's (sampled every 10 ms), per parameter.

Run: ``python bench/bench_loop_lag.py [--params 101296128]``
(about 3 GB and two minutes at 100M; take the lock: ``flock /work/heavy.lock ...``). Prints a table,
writes bench/results/loop_lag.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crdt
from daemon.node.replica import Replica
from daemon.node.store import Store
from daemon.node.trainer_process import Fill, fill_from

DENSITY = 0.02  # training.DilocoConfig.topk_density
CODEC = "rice-q8"  # training.DilocoConfig.codec
RESULTS = Path(__file__).parent / "results" / "loop_lag.json"


class Ticker:
    """A 1 ms ticker on the loop: its worst delay, and the peak RSS sampled every 10 ms."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        process, last_rss = psutil.Process(), 0.0
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t - 0.001)
            if t - last_rss > 0.01:
                self.peak_rss, last_rss = max(self.peak_rss, process.memory_info().rss), t

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def _records(genesis: crdt.Genesis, signer: crdt.Signer, count: int, first_seq: int
             ) -> list[crdt.Contribution]:
    rng = np.random.default_rng(first_seq)
    n, k = genesis.length, int(genesis.length * DENSITY)
    out = []
    for seq in range(first_seq, first_seq + count):
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.uint32)
        vals = (rng.standard_normal(k) * 1e-3).astype(np.float32)
        out.append(crdt.make_contribution(signer, genesis_id=genesis.id, seq=seq, fragment=0, codec=CODEC,
                                          payload=crdt.encode_payload(CODEC, n, idx, vals), weight=1.0,
                                          base_version=b"\x00" * 32))
    return out


async def _measure(params: int) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    genesis = crdt.Genesis((rng.standard_normal(params, dtype=np.float32) * 0.02), ((0, params),),
                           {"run": "bench-snapshot-lag"})
    signer = crdt.Signer.from_seed(b"\x01" * 32)
    records = _records(genesis, signer, 9, 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshtrain-snaplag-", dir=Path(__file__).parent) as tmp:
        replica = Replica.open(Store(Path(tmp) / "store"), genesis, snapshot_every=10**9)
        for c in records[:3]:
            replica.accept(c)
        base = psutil.Process().memory_info().rss

        def row(way: str, wall: float, lag: float, copied: int, peak: int, accept: float = 0.0) -> dict:
            return {"way": way, "params": params, "wall_s": round(wall, 3), "loop_worst_lag_s": round(lag, 3),
                    "accept_meanwhile_s": round(accept, 3),
                    "copied_bytes_per_param": round(copied / params, 3),
                    "peak_rss_above_state_bytes_per_param": round(max(0, peak - base) / params, 3)}

        state = replica.state
        t = time.perf_counter()
        state.state_hash  # noqa: B018 - what the loop computed first
        replica.store.write_snapshot(state.snapshot_parts(), floor=crdt.VersionVector())
        on_loop = time.perf_counter() - t
        rows.append(row("snapshot, on the loop", on_loop, on_loop, 0, psutil.Process().memory_info().rss))

        replica.accept(records[3])  # a fresh change: the hash is not cached
        wall, ticker = await _ticking(replica.snapshot_and_compact())
        rows.append(row("snapshot, worker", wall, ticker.worst, 0, ticker.peak_rss))

        replica.accept(records[4])
        copied = 0
        original = crdt.ModelState.freeze

        def spy(self: crdt.ModelState) -> crdt.FrozenState:
            nonlocal frozen
            frozen = original(self)
            return frozen

        frozen: crdt.FrozenState | None = None
        crdt.ModelState.freeze = spy  # type: ignore[method-assign]
        try:
            with Ticker() as ticker:
                t = time.perf_counter()
                writing = asyncio.create_task(replica.snapshot_and_compact())
                await asyncio.sleep(0.2)  # the worker is hashing by now
                a = time.perf_counter()
                replica.accept(records[5])
                accept = time.perf_counter() - a
                assert frozen is not None
                copied = frozen._acc.values.saved_bytes
                await writing
                wall = time.perf_counter() - t
                await asyncio.sleep(0.005)  # the ticker reads the delay of the publish (see _ticking)
        finally:
            crdt.ModelState.freeze = original  # type: ignore[method-assign]
        rows.append(row("snapshot, worker, a record accepted meanwhile", wall, ticker.worst, copied,
                        ticker.peak_rss, accept))

        assert not replica.state.hash_known  # the last record came after the freeze
        wall, ticker = await _ticking(replica.digest())
        rows.append(row("digest hash, worker", wall, ticker.worst, 0, ticker.peak_rss))
        replica.accept(records[6])
        t = time.perf_counter()
        replica.state.digest()
        on_loop = time.perf_counter() - t
        rows.append(row("digest hash, on the loop", on_loop, on_loop, 0, 0))

        t = time.perf_counter()
        replica.accept(records[7])
        on_loop = time.perf_counter() - t
        rows.append(row("record apply, on the loop", on_loop, on_loop, 0, 0))
        wall, ticker = await _ticking(replica.receive(records[8]))
        rows.append(row("record apply, decoded in a worker", wall, ticker.worst, 0, ticker.peak_rss))

        out = np.empty(params, dtype=np.float32)
        out.fill(0)  # touched: the handoff's pages are the child's, not a fresh mapping's faults here
        t = time.perf_counter()
        replica.state.materialize(out)
        on_loop = time.perf_counter() - t
        rows.append(row("materialize, on the loop", on_loop, on_loop, 0, 0))
        wall, ticker = await _ticking(asyncio.to_thread(_filled, fill_from(replica.state), out))
        rows.append(row("materialize, worker", wall, ticker.worst, 0, ticker.peak_rss))
        del out
        after = psutil.Process().memory_info().rss
        replica.close()
    return rows, {"state_rss_bytes_per_param": round(base / params, 3),
                  "rss_after_the_passes_bytes_per_param": round(after / params, 3)}


async def _ticking(work: Awaitable[object]) -> tuple[float, Ticker]:
    """Await ``work`` with a ticker on the loop: its wall time, and the ticker's readings."""
    with Ticker() as ticker:
        t = time.perf_counter()
        await work
        wall = time.perf_counter() - t
        # Let the ticker wake once more: the work's last stretch on the loop (an accept after its decode,
        # a snapshot's publish after its write) delays the tick that is due, which is only read here.
        await asyncio.sleep(0.005)
        return wall, ticker


def _filled(fill: Fill, out: np.ndarray) -> None:
    """``fill(out)``, returning nothing: a finished future keeps its result (here, the model) alive."""
    fill(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=101_296_128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows, resident = asyncio.run(_measure(args.params))
    print(f"{'pass':<46} {'params':>11} {'wall s':>7} {'loop lag s':>10} {'accept s':>8} {'copied B/p':>10}"
          f" {'peak B/p':>8}")
    for r in rows:
        print(f"{r['way']:<46} {r['params']:>11,} {r['wall_s']:>7.2f} {r['loop_worst_lag_s']:>10.3f}"
              f" {r['accept_meanwhile_s']:>8.3f}"
              f" {r['copied_bytes_per_param']:>10.2f} {r['peak_rss_above_state_bytes_per_param']:>8.2f}")
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
              "cpus": psutil.cpu_count(), "codec": CODEC, "density": DENSITY, "rows": rows, **resident}
    print(f"resident: {resident['state_rss_bytes_per_param']} B/param holding the state before the passes,"
          f" {resident['rss_after_the_passes_bytes_per_param']} after them")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
