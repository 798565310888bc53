"""Which data each node trains on, without coordination: hash shards vs whole set vs member rank.

Rules compared (training/_assignment.py explains the choice):

* hash%4    the old default: shard = first 4 bytes of the peer's public key % 4, 4 shards
            (collisions: two peers on one shard, another shard untrained);
* whole     every peer streams the whole training set, seeded by training.data_seed(peer id);
* rank      shard = rank of the own id among the sorted ids in the peer's *view* of the members,
            num_shards = size of that view; re-derived when the view changes, resuming the stream at
            the batches consumed.

In-process, lockstep rounds as in bench/convergence (`meshtrain_sim`): every active peer trains a round
from the same θ and all updates are added (decoded payloads, float32; crdt's fixed-point sum differs in
the last bits only). Equal samples: every rule runs the same peers for the same rounds.

Scenarios: 4 and 6 static peers; churn: 6 possible peers, members 0-3 for the first third of the
rounds, 0-5 for the second, 2-5 for the last; existing members learn of a change 0-2 rounds late
(seeded), joiners see the current list at once. Each (scenario, rule) runs over TRIALS draws of peer
ids (which decide hash%4's collisions and the data seeds).

Run: `flock /work/heavy.lock .venv/bin/python bench/bench_data_assignment.py` (about 15 minutes on one
core); writes bench/results/data_assignment.json.
"""

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import crdt
import training
from training._stdlib_lm import _hash

TRIALS = 3  # peer-id draws per cell; hash%4's collisions vary with them
ROUNDS = 30  # lockstep rounds per run
LAG_ROUNDS = (0, 1, 2)  # how late an existing member learns of a membership change (churn scenario)
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "options": {},
        "diloco": {"inner_steps": 10, "batch_size": 32, "inner_lr": 3e-3, "outer_lr": 1.0,
                   "outer_momentum": 0.0, "codec": "sparse-q8", "topk_density": 0.1},
    },
    "stdlib-lm": {
        "options": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64,
                    "max_corpus_bytes": 1_000_000, "eval_bytes": 16_384},
        "diloco": {"inner_steps": 10, "batch_size": 16},  # over the task's tuned defaults
    },
}
OUT = Path(__file__).parent / "results" / "data_assignment.json"


def members_at(scenario: str, r: int) -> list[int]:
    if scenario != "churn":
        return list(range(int(scenario)))
    third = ROUNDS // 3
    return [0, 1, 2, 3] if r < third else list(range(6)) if r < 2 * third else [2, 3, 4, 5]


def rank_shard(own: bytes, view: list[bytes]) -> tuple[int, int]:
    ranked = sorted(set(view) | {own})
    return ranked.index(own), len(ranked)


def coverage(task: Any, assignment: list[tuple[int, int]]) -> tuple[float, float]:
    """Fractions of the training set (rows, or bytes of files) in no peer's shard and in two or more."""
    if task.name == "digits":
        weights = np.ones(len(task._train_idx))
        owned = [np.isin(task._train_idx, task.shard_indices(s, n)) for s, n in assignment]
    else:
        val_permille = task.config.val_permille
        train = [(rel, len(d)) for rel, d in task.files if _hash("split", rel) % 1000 >= val_permille]
        weights = np.array([size for _, size in train], dtype=np.float64)
        owned = [np.array([_hash("shard", rel) % n == s for rel, _ in train]) for s, n in assignment]
    counts = np.sum(owned, axis=0)
    total = weights.sum()
    return float(weights[counts == 0].sum() / total), float(weights[counts >= 2].sum() / total)


def run(task_name: str, rule: str, scenario: str, trial: int) -> dict[str, Any]:
    spec = TASKS[task_name]
    task = training.load_task(task_name, **spec["options"])
    seeds = [hashlib.sha256(b"peer-%d-%d" % (trial, i)).digest() for i in range(6)]
    ids = [crdt.Signer.from_seed(seed).public_key for seed in seeds]
    expected = 4 if scenario == "churn" else int(scenario)
    overrides = {**spec["diloco"], "expected_peers": expected, "device": "cpu"}
    base = training.DilocoConfig.for_task(task, overrides)
    theta = training.flatten_params(task.build_model())
    rng = np.random.default_rng([trial, 99])
    trainers: dict[int, training.PeerTrainer] = {}
    views: dict[int, list[bytes]] = {}  # rank rule: each peer's current view of the member ids
    pending: list[tuple[int, int, list[bytes]]] = []  # (round it lands, peer, new view)
    curve, uncovered, doubled = [], [], []
    for r in range(ROUNDS):
        active = members_at(scenario, r)
        current = [ids[i] for i in active]
        if r == 0 or active != members_at(scenario, r - 1):
            for i in active:
                if i in views:
                    pending.append((r + int(rng.choice(LAG_ROUNDS)), i, current))
                else:
                    views[i] = current
        for item in [p for p in pending if p[0] <= r]:
            views[item[1]] = item[2]
            pending.remove(item)
        for i in active:
            if i not in trainers:
                if rule == "hash%4":
                    shard, num = int.from_bytes(ids[i][:4], "big") % 4, 4
                elif rule == "rank":
                    shard, num = rank_shard(ids[i], views[i])
                else:
                    shard, num = 0, 1
                cfg = dataclasses.replace(base, seed=training.data_seed(ids[i]) if rule == "whole" else 0)
                trainers[i] = training.PeerTrainer(task, cfg, shard=shard, num_shards=num)
            elif rule == "rank":
                shard, num = rank_shard(ids[i], views[i])
                t = trainers[i]
                if (shard, num) != (t.shard, t.num_shards):
                    t.shard, t.num_shards = shard, num
                    t._batches = None  # re-created at batches_consumed: the stream resumes, not restarts
        if rule != "whole":
            gap, dup = coverage(task, [(trainers[i].shard, trainers[i].num_shards) for i in active])
            uncovered.append(gap)
            doubled.append(dup)
        results = [trainers[i].run_round(theta, fragment=0) for i in active]
        theta = theta.copy()
        for res in results:
            idx, vals = crdt.decode_payload(res.codec, theta.size, res.payload)
            theta[idx] += res.weight * vals
        if (r + 1) % 5 == 0:
            curve.append(round(trainers[active[0]].evaluate(theta)["val_loss"], 4))
    return {
        "val_loss": curve[-1], "curve": curve,
        "untrained_share": round(float(np.mean(uncovered)), 4) if uncovered else None,
        "doubled_share": round(float(np.mean(doubled)), 4) if doubled else None,
    }


def main() -> None:
    torch.set_num_threads(1)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "rounds": ROUNDS, "trials": TRIALS}
    results["cells"] = []
    for task_name in (sys.argv[1:] or list(TASKS)):
        for scenario in ("4", "6", "churn"):
            for rule in ("hash%4", "whole", "rank"):
                started = time.perf_counter()
                runs = [run(task_name, rule, scenario, t) for t in range(TRIALS)]
                finals = [x["val_loss"] for x in runs]
                cell = {
                    "task": task_name, "scenario": scenario, "rule": rule,
                    "val_loss_mean": round(float(np.mean(finals)), 4), "val_loss_runs": finals,
                    "untrained_share": [x["untrained_share"] for x in runs],
                    "doubled_share": [x["doubled_share"] for x in runs],
                    "curve_mean": np.mean([x["curve"] for x in runs], axis=0).round(4).tolist(),
                    "wall_s": round(time.perf_counter() - started, 1),
                }
                results["cells"].append(cell)
                print(json.dumps(cell), flush=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print("| task | peers | rule | val loss (mean of trials) | untrained share | doubled share |")
    for c in results["cells"]:
        print(f"| {c['task']} | {c['scenario']} | {c['rule']} | {c['val_loss_mean']:.4f} "
              f"| {c['untrained_share']} | {c['doubled_share']} |")


if __name__ == "__main__":
    main()
