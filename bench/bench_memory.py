"""Host memory per parameter of one training process at GPT-2-small scale (stdlib-lm, ~86M params).

Measures the process's resident set (peak, ru_maxrss) after each phase, minus the resident set after
imports and corpus loading, divided by D: build the trainer, allocate θ (the global parameters the
daemon hands over: a pipe copy today, shared memory tomorrow), two rounds (the first creates AdamW's
moments), then state_dict + torch.save to a file (what the daemon does after each round). CPU, batch 1 of 64
bytes, one inner step: activations are negligible next to the D-sized state.

Run (under the heavy lock; about 1 minute and 6 GB at most; "before" is commit 8099188's training/
and crdt/, extracted with `git archive 8099188 training crdt | tar -x -C /tmp/before`):

    flock /work/heavy.lock .venv/bin/python bench/bench_memory.py            # this checkout
    PYTHONPATH=/tmp/before .venv/bin/python bench/bench_memory.py --label before
    .venv/bin/python bench/bench_memory.py --label after-mu0 --outer-momentum 0

Each run appends its row to bench/results/memory.json.
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

import training

TASK = {"n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 64, "max_corpus_bytes": 1_000_000}
OUT = Path(__file__).parent / "results" / "memory.json"


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    task = training.load_task("stdlib-lm", **TASK)
    config = training.DilocoConfig(
        inner_steps=1, batch_size=1, device="cpu", outer_momentum=args.outer_momentum, codec="sparse-q8",
        topk_density=0.02,
    )
    base = current_bytes()
    phases = {}
    trainer = training.PeerTrainer(task, config, shard=0, num_shards=1)
    dim = trainer.dim
    phases["trainer built"] = peak_bytes()
    theta = training.flatten_params(trainer.model)
    phases["global params"] = peak_bytes()
    for r in range(2):
        started = time.perf_counter()
        result = trainer.run_round(theta, fragment=0)
        phases[f"round {r + 1}"] = peak_bytes()
        print(f"round {r + 1}: {time.perf_counter() - started:.1f} s, payload {result.payload_bytes} bytes")
    with tempfile.TemporaryDirectory() as tmp:  # a file, as the daemon saves it (not a BytesIO in RAM)
        path = Path(tmp) / "trainer.pt"
        torch.save(trainer.state_dict(), path)
        phases["state saved"] = peak_bytes()
        state_bytes = path.stat().st_size
    row = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d"),
        "training_module": training.__file__,
        "params": dim,
        "outer_momentum": args.outer_momentum,
        "bytes_per_param_peak": {k: round((v - base) / dim, 1) for k, v in phases.items()},
        "steady_bytes_per_param": round((current_bytes() - base) / dim, 1),
        "state_file_bytes_per_param": round(state_bytes / dim, 1),
    }
    print(json.dumps(row, indent=1))
    rows = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
