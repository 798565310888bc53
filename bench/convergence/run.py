"""Convergence benchmark: meshtrain (4 DiLoCo peers, sparse updates) vs one process vs dense DDP.

Run from the repo root:  python -m bench.convergence [--preset full|small|tiny] [--mode cluster|sim]

--mode cluster (default): meshtrain runs as 4 real daemons (daemon.cluster.Cluster, libp2p on loopback,
one training child each); bytes_sent is their summed wire bytes. --mode sim: 4 PeerTrainers in one
process merging through crdt.ModelState in lockstep; bytes = encoded contributions x (N - 1).
Prints a table, writes bench/results/convergence.json ({"meshtrain", "single", "ddp"} each with
val_loss, bytes_sent, wall_s, curve) and bench/results/convergence.png (val loss vs samples and vs bytes).

Every contender sees the same total samples (peers x rounds x H x batch) of the same task config, from
the same init, with the same inner AdamW; see _methods.py for how each one is run and how bytes are
counted. The "full" preset uses a smaller config of the default task (stdlib-lm, 2 layers x 96 wide,
64-byte context, ~0.28M params) so all three finish in about 20 minutes on 2 cores; "tiny" is for
development (about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python bench/convergence/run.py` works too

import training
from bench.convergence import _methods

RESULTS = Path(__file__).resolve().parents[1] / "results"
TASK = "stdlib-lm"
CLUSTER_TASK = "bench.convergence.tasks:{preset}"  # the same configs as plug-ins the daemons can load

PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "task_options": {"n_layer": 2, "n_embd": 96, "n_head": 4, "block_size": 64},
        "peers": 4,
        "rounds": 120,
        "eval_every": 10,
        "diloco": {"inner_steps": 10, "batch_size": 32, "topk_density": 0.05},
    },
    "small": {
        "task_options": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64},
        "peers": 4,
        "rounds": 24,
        "eval_every": 4,
        "diloco": {"inner_steps": 25, "batch_size": 32},
    },
    "tiny": {
        "task_options": {
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "block_size": 32,
            "max_corpus_bytes": 1_000_000,
        },
        "peers": 4,
        "rounds": 8,
        "eval_every": 2,
        "diloco": {"inner_steps": 10, "batch_size": 16},
    },
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument(
        "--mode",
        choices=["sim", "cluster"],
        default="cluster",
        help="meshtrain in-process (sim) or as real daemons over libp2p (cluster)",
    )
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--only", default="meshtrain,single,ddp", help="comma-separated subset to run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [diloco] option, e.g. --set topk_density=0.05 (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    peers, rounds, eval_every = preset["peers"], args.rounds or preset["rounds"], preset["eval_every"]
    task_options = preset["task_options"]
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    task = training.load_task(TASK, **task_options)
    options = {**preset["diloco"], **overrides, "expected_peers": peers, "device": "cpu"}
    diloco = training.DilocoConfig.for_task(task, options)
    steps = rounds * diloco.inner_steps  # per DiLoCo peer / per DDP rank
    only = set(args.only.split(","))
    print(
        f"convergence: {TASK} {task_options} params={training.num_params(task.build_model())} "
        f"peers={peers} rounds={rounds} mode={args.mode}\n  diloco={diloco}",
        flush=True,
    )

    results: dict[str, Any] = {}
    if "meshtrain" in only:
        print("meshtrain ...", flush=True)
        if args.mode == "sim":
            torch.set_num_threads(1)
            results["meshtrain"] = _methods.meshtrain_sim(
                TASK, task_options, diloco, peers=peers, rounds=rounds, eval_every=eval_every
            )
        else:
            cluster_options = {k: v for k, v in dataclasses.asdict(diloco).items() if k != "torch_threads"}
            with tempfile.TemporaryDirectory(prefix="meshtrain-bench-") as tmp:
                results["meshtrain"] = _methods.meshtrain_cluster(
                    CLUSTER_TASK.format(preset=args.preset),
                    cluster_options,
                    peers=peers,
                    rounds=rounds,
                    eval_every=eval_every,
                    workdir=Path(tmp),
                )
    if "single" in only:
        print("single ...", flush=True)
        torch.set_num_threads(1)
        results["single"] = _methods.single(
            TASK,
            task_options,
            diloco,
            steps=peers * steps,
            eval_every_steps=peers * eval_every * diloco.inner_steps,
        )
    if "ddp" in only:
        print("ddp ...", flush=True)
        results["ddp"] = _methods.ddp(
            TASK,
            task_options,
            diloco,
            ranks=peers,
            steps=steps,
            eval_every_steps=eval_every * diloco.inner_steps,
        )

    report = {
        **results,
        "config": {
            "task": TASK,
            "task_options": task_options,
            "peers": peers,
            "rounds": rounds,
            "mode": args.mode,
            "diloco": dataclasses.asdict(diloco),
            "samples": peers * steps * diloco.batch_size,
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.json").write_text(json.dumps(report, indent=1))
    _plot(results, args.out / "convergence.png")
    print(f"wrote {args.out / 'convergence.json'} and {args.out / 'convergence.png'}")
    return report


def _value(text: str) -> Any:
    """A --set value: JSON (numbers, true/false) or else the raw string (codec names)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _print_table(results: dict[str, Any]) -> None:
    ddp = results.get("ddp")
    print(f"\n{'method':<11}{'val_loss':>10}{'vs ddp':>9}{'bytes_sent':>16}{'ddp/bytes':>11}{'wall_s':>9}")
    for name, r in results.items():
        vs = f"{100 * (r['val_loss'] / ddp['val_loss'] - 1):+.1f}%" if ddp else "-"
        ratio = f"{ddp['bytes_sent'] / r['bytes_sent']:.0f}x" if ddp and r["bytes_sent"] else "-"
        print(f"{name:<11}{r['val_loss']:>10.4f}{vs:>9}{r['bytes_sent']:>16,}{ratio:>11}{r['wall_s']:>9.1f}")


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_samples, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        curve = r["curve"]
        by_samples.plot(
            _methods.as_array(curve, "samples"), _methods.as_array(curve, "val_loss"), "o-", ms=3, label=name
        )
        if r["bytes_sent"]:
            pts = [p for p in curve if p["bytes_sent"] > 0]
            by_bytes.plot(
                _methods.as_array(pts, "bytes_sent"),
                _methods.as_array(pts, "val_loss"),
                "o-",
                ms=3,
                label=name,
            )
    by_samples.set(
        xlabel="training samples (all peers)", ylabel="validation loss (nats/byte)", title="loss vs samples"
    )
    by_bytes.set(
        xscale="log",
        xlabel="bytes sent (all peers, log)",
        ylabel="validation loss (nats/byte)",
        title="loss vs bytes",
    )
    for ax in (by_samples, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
