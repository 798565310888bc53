"""Convergence benchmark: meshtrain (4 DiLoCo peers, sparse updates) vs one process vs dense DDP.

Run from the repo root:  python -m bench.convergence [--preset long|full|large|tiny] [--mode cluster|sim]

--mode cluster (default): meshtrain runs as 4 real daemons (daemon.cluster.Cluster, libp2p on loopback,
one training child each); bytes_sent is what the kernel counted on their TCP sockets, broken down by
_overhead.py (payloads, record envelopes, the genesis download, gossip, anti-entropy, transport).
--mode sim: 4 PeerTrainers in one process merging through crdt.ModelState in lockstep; bytes = encoded
contributions x (N - 1). Prints a table and writes bench/results/convergence.json (convergence_<preset>.json
for the other presets) with each contender's val_loss, bytes_sent, bytes per parameter per inner step (per
rank), loss gap and byte ratio against DDP, wall_s, curve and command; and a .png beside it (val loss vs
samples and vs bytes). --merge adds contenders to an existing file of the same configuration (so each can
run under its own lock hold), --name labels a meshtrain variant (e.g. one per H).

Every contender sees the same total samples (peers x steps x batch) of the same task config, from the same
init, with the same inner AdamW; see _methods.py for how each one is run and how bytes are counted. The
"long" preset (default) is the default task at 0.28M parameters (stdlib-lm, 2 layers x 96 wide, 64-byte
context) for 2,400 inner steps per peer, long enough for H = 30 to 120, with the inner lr decaying along
a cosine to a tenth over the run (every contender, stretched to its own steps); its meshtrain contender
runs H = 30, rice-q2 at 1/16 and outer lr 2 with the daemons in lockstep (``--node
training.lockstep=false`` lets them run free); "full" is the 1,200-step
preset of the 2026-11-23 benchmark (H = 10); "large" is 3.3M parameters (4 layers x 256) for 600 steps;
"tiny" is for development (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python bench/convergence/run.py` works too

import training
from bench.convergence import _methods, _overhead

RESULTS = Path(__file__).resolve().parents[1] / "results"
TASK = "stdlib-lm"
CLUSTER_TASK = "bench.convergence.tasks:{preset}"  # the same configs as plug-ins the daemons can load

PRESETS: dict[str, dict[str, Any]] = {
    "long": {  # the default: long enough for H of 30 to 120, all three contenders in ~25 min on 2 cores
        "task_options": {"n_layer": 2, "n_embd": 96, "n_head": 4, "block_size": 64},
        "peers": 4,
        "steps": 2400,
        "evals": 8,
        # The best measured near 1000x (2026-12-02, sim and 4 daemons): outer lr 2, in lockstep, signs of
        # the top 1/16 (rice-q1: 13 % fewer bytes than rice-q2 at the same loss in simulation; README).
        "diloco": {"inner_steps": 30, "batch_size": 32, "codec": "rice-q1", "topk_density": 1 / 16,
                   "outer_lr": 2.0},
        "node": {"training.lockstep": True},
        "cosine": True,
    },
    "full": {  # the 2026-11-23 benchmark (171x at +1.4 %): H = 10, sparse-q8 at 5 %
        "task_options": {"n_layer": 2, "n_embd": 96, "n_head": 4, "block_size": 64},
        "peers": 4,
        "steps": 1200,
        "evals": 12,
        "diloco": {"inner_steps": 10, "batch_size": 32, "codec": "sparse-q8", "topk_density": 0.05},
    },
    "large": {  # 12x the parameters (3.3M), fewer steps so that each contender fits about 25 minutes
        "task_options": {"n_layer": 4, "n_embd": 256, "n_head": 8, "block_size": 64},
        "peers": 4,
        "steps": 600,
        "evals": 5,
        "diloco": {"inner_steps": 30, "batch_size": 16, "codec": "rice-q1", "topk_density": 1 / 16,
                   "outer_lr": 2.0},  # the long preset's setting
        "node": {"training.lockstep": True},
        "cosine": True,
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
        "steps": 80,
        "evals": 4,
        "diloco": {"inner_steps": 10, "batch_size": 16},
    },
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="long")
    parser.add_argument(
        "--mode",
        choices=["sim", "cluster"],
        default="cluster",
        help="meshtrain in-process (sim) or as real daemons over libp2p (cluster)",
    )
    parser.add_argument("--steps", type=int, help="override the preset's inner steps per peer")
    parser.add_argument("--only", default="meshtrain,single,ddp", help="comma-separated subset to run")
    parser.add_argument("--name", default="meshtrain", help="label of the meshtrain contender")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [diloco] option, e.g. --set topk_density=0.05 (repeatable)",
    )
    parser.add_argument(
        "--sync",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [sync] option of the cluster's daemons, e.g. --sync interval_s=2 (repeatable)",
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a [node] option (or SECTION.KEY) of the cluster's daemons, e.g. --node nat.autonat=false",
    )
    parser.add_argument(
        "--prototype",
        default="",
        metavar="SPEC",
        help="measure proposed daemon changes (prototype/sitecustomize.py): heartbeat_s=60,discovery_s=300",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other contenders of an existing result file of the same preset and steps",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    peers, steps = preset["peers"], args.steps or preset["steps"]
    task_options = preset["task_options"]
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    sync = {k: _value(v) for k, v in (s.split("=", 1) for s in args.sync)}  # over the daemon defaults
    node = {**preset.get("node", {}), **{k: _value(v) for k, v in (s.split("=", 1) for s in args.node)}}
    task = training.load_task(TASK, **task_options)
    schedule = {"total_steps": steps} if preset.get("cosine") else {}  # cosine decay over the whole run
    options = {**preset["diloco"], **schedule, **overrides, "expected_peers": peers, "device": "cpu"}
    diloco = training.DilocoConfig.for_task(task, options)
    if steps % diloco.inner_steps:
        parser.error(f"{steps} steps are not a whole number of rounds of H={diloco.inner_steps}")
    rounds = steps // diloco.inner_steps  # per DiLoCo peer; DDP ranks take `steps` steps
    eval_every = max(1, rounds // preset["evals"])
    params = training.num_params(task.build_model())
    only = set(args.only.split(","))
    command = "python -m bench.convergence " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"convergence: {TASK} {task_options} params={params} peers={peers} steps={steps} rounds={rounds} "
        f"mode={args.mode}\n  diloco={diloco}",
        flush=True,
    )

    results: dict[str, Any] = {}
    if "meshtrain" in only:
        print(f"{args.name} ...", flush=True)
        if args.mode == "sim":
            torch.set_num_threads(1)
            result = _methods.meshtrain_sim(
                TASK, task_options, diloco, peers=peers, rounds=rounds, eval_every=eval_every
            )
        else:
            netns = _overhead.enter_private_netns()
            if not netns:
                print("  (no private network namespace: wire bytes from ss, short-lived connections missed)")
            cluster_options = {k: v for k, v in dataclasses.asdict(diloco).items() if k != "torch_threads"}
            with tempfile.TemporaryDirectory(prefix="meshtrain-bench-") as tmp:
                result = _methods.meshtrain_cluster(
                    CLUSTER_TASK.format(preset=args.preset),
                    cluster_options,
                    peers=peers,
                    rounds=rounds,
                    eval_every=eval_every,
                    workdir=Path(tmp),
                    sync=sync,
                    node=node,
                    prototype=args.prototype,
                    netns=netns,
                )
        results[args.name] = {**result, "diloco": dataclasses.asdict(diloco)}
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
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in results.values():
        r["bytes_per_param_step"] = round(r["bytes_sent"] / (params * steps * peers), 6)
        r.update(command=command, when=when)

    path = args.out / ("convergence.json" if args.preset == "long" else f"convergence_{args.preset}.json")
    config = {
        "task": TASK,
        "task_options": task_options,
        "params": params,
        "peers": peers,
        "steps": steps,
        "samples": peers * steps * diloco.batch_size,
        "batch_size": diloco.batch_size,
        "inner_lr": diloco.inner_lr,
        "lr_schedule": {"warmup_steps": diloco.warmup_steps, "total_steps": diloco.total_steps,
                        "min_lr_ratio": diloco.min_lr_ratio},
    }
    if args.merge and path.exists():
        previous = json.loads(path.read_text())
        if previous.get("config") != config:
            parser.error(f"{path} holds another configuration: {previous.get('config')}")
        results = {**previous["results"], **results}
    _compare(results)
    report = {
        "results": results,
        "config": config,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    _print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    _plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return report


def _value(text: str) -> Any:
    """A --set value: JSON (numbers, true/false) or else the raw string (codec names)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _compare(results: dict[str, Any]) -> None:
    """Each contender against DDP: the loss gap and how many times fewer bytes."""
    ddp = results.get("ddp")
    for r in results.values():
        if ddp:
            r["vs_ddp_loss"] = round(r["val_loss"] / ddp["val_loss"] - 1, 5)
            r["ddp_bytes_ratio"] = round(ddp["bytes_sent"] / r["bytes_sent"], 1) if r["bytes_sent"] else None


def _print_table(results: dict[str, Any]) -> None:
    print(
        f"\n{'method':<22}{'val_loss':>10}{'vs ddp':>9}{'bytes_sent':>16}{'B/param/step':>14}"
        f"{'ddp/bytes':>11}{'overhead':>10}{'wall_s':>9}"
    )
    for name, r in results.items():
        vs = f"{100 * r['vs_ddp_loss']:+.1f}%" if "vs_ddp_loss" in r else "-"
        ratio = f"{r['ddp_bytes_ratio']:.0f}x" if r.get("ddp_bytes_ratio") else "-"
        share = r.get("overhead", {}).get("overhead_share")
        over = f"{100 * share:.1f}%" if share is not None else "-"
        print(
            f"{name:<22}{r['val_loss']:>10.4f}{vs:>9}{r['bytes_sent']:>16,}{r['bytes_per_param_step']:>14.5f}"
            f"{ratio:>11}{over:>10}{r['wall_s']:>9.1f}"
        )


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
