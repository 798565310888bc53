"""Where a daemon's resident memory goes: its real objects at ~100M parameters, built step by step in one
process, with the resident set after each step (bench/bench_model_scale.py measures whole daemons; this
tells the contributors apart).

Steps, in the order a founder lives them: the daemon's imports; the genesis from the trainer's fresh
parameters; the genesis file written and read back (as a joiner and every restart reads it); a
``crdt.ModelState``; contributions of the default codec (rice-q8) at the default density (2%) applied;
the merged model materialized into the trainer's shared-memory handoff; a snapshot written and read back
into a second state (a late joiner's install, a restart); the first state dropped. After each step it
prints RSS and its anonymous, file-backed and shared-memory parts (/proc/self/status), in MB and in
bytes per parameter.

Run: ``.venv/bin/python bench/probe_memory.py [--params 101296128] [--contributions 4]`` (about a
minute and 2 GB at 100M; take the lock: ``flock /work/heavy.lock ...``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DENSITY = 0.02  # training.DilocoConfig.topk_density
CODEC = "rice-q8"  # training.DilocoConfig.codec
UPDATE_SCALE = 1e-3  # a pseudo-gradient entry's typical magnitude
DAEMON_MODULES = ("daemon.cli.main", "daemon.node.node", "daemon.service.service")  # what a daemon imports


def _resident() -> dict[str, int]:
    """RssAnon, RssFile, RssShmem of /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Rss"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Meter:
    def __init__(self, params: int) -> None:
        self.params = params
        self.rows: list[tuple[str, int, int, int, int]] = []
        print(f"{'step':<44} {'RSS MB':>8} {'B/p':>6} {'anon':>6} {'file':>6} {'shmem':>6} {'s':>6}")
        self._t = time.monotonic()

    def __call__(self, step: str) -> None:
        gc.collect()
        rss = psutil.Process().memory_info().rss
        r = _resident()
        anon, file, shmem = r["RssAnon"], r["RssFile"], r["RssShmem"]
        now = time.monotonic()
        p = self.params
        print(f"{step:<44} {rss / 1e6:8.0f} {rss / p:6.2f} {anon / p:6.2f} {file / p:6.2f} {shmem / p:6.2f}"
              f" {now - self._t:6.1f}", flush=True)
        self._t = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=101_296_128)  # the bench's 100M shape
    parser.add_argument("--contributions", type=int, default=4)
    args = parser.parse_args()
    n = args.params
    meter = Meter(n)
    meter("interpreter + numpy + psutil")
    for module in DAEMON_MODULES:
        importlib.import_module(module)
    meter(f"daemon imports (torch imported: {'torch' in sys.modules})")

    import crdt
    from daemon.node.store import Store
    from daemon.node.store_files import read_genesis, read_snapshot
    from daemon.node.trainer_process import TrainerProcess, TrainerSpec, fill_from

    rng = np.random.default_rng(0)
    fresh = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float32)
    meter("trainer's fresh params (pickled array)")
    genesis = crdt.Genesis(fresh, ((0, n),), {"run": "probe", "task": "stdlib-lm"})
    del fresh
    meter("genesis (founder: params copied)")
    with tempfile.TemporaryDirectory(prefix="meshtrain-probe-") as tmp:
        store = Store(Path(tmp) / "store")
        store.write_genesis(genesis)
        meter("genesis file written")
        del genesis
        genesis = read_genesis(store.genesis_file)
        meter("genesis read back (joiner, restart)")
        state = crdt.ModelState(genesis)
        meter("ModelState")
        signer = crdt.Signer.from_seed(b"\x01" * 32)
        k = int(n * DENSITY)
        for seq in range(1, args.contributions + 1):
            idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.uint32)
            vals = (rng.standard_normal(k) * UPDATE_SCALE).astype(np.float32)
            payload = crdt.encode_payload(CODEC, n, idx, vals)
            del idx, vals
            c = crdt.make_contribution(signer, genesis_id=genesis.id, seq=seq, fragment=0, codec=CODEC,
                                       payload=payload, weight=1.0, base_version=b"\x00" * 32)
            del payload
            state.apply(c, before_commit=store.append)
            del c
            meter(f"contribution {seq} applied + logged")
        state_hash = state.state_hash
        meter("state hash")
        import asyncio

        async def handoff(state: crdt.ModelState) -> None:
            trainer = TrainerProcess(TrainerSpec(task="stdlib-lm", task_options={}, diloco={}, shard=0,
                                                 num_shards=1, threads=1, state_file=Path(tmp) / "t.pt"))
            trainer._send = _no_child  # type: ignore[method-assign]  # the parent's side only
            await trainer._call_with_params("round", fill_from(state), n)
            meter("materialized into the trainer handoff")
            trainer._release_params()

        asyncio.run(handoff(state))
        meter("handoff released")
        store.write_snapshot(state.snapshot_parts(), floor=state.version_vector)
        meter("snapshot written")
        snapshot = read_snapshot(store.snapshot_file, genesis, max_authors=crdt.MAX_AUTHORS)
        meter("snapshot read (install, restart)")
        back = crdt.ModelState.from_own_snapshot(genesis, snapshot, log=state.records())
        assert back.state_hash == state_hash
        meter("second state from it (adopt: two states)")
        del state, snapshot
        meter("first state dropped")
        store.close()


async def _no_child(command: str, args: tuple) -> None:
    return None


if __name__ == "__main__":
    main()
