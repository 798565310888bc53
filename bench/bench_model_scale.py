"""What a node costs as the model grows: real daemons on loopback with the default task at ~10M, 30M, 100M
parameters.

For each size, three daemons: the founder and a joiner train R rounds each (small H, one sample of a short
context per inner step, so the CPU time is the daemon's and the transfers', not the model's), then a
late joiner (not training) comes and catches up from a snapshot. Measured:

* genesis: the joiner's download (``status.join.genesis_transfer``): bytes, seconds, rate;
* snapshot: the late joiner's download of the founder's (or joiner's) snapshot: bytes, seconds, and the
  time from its start until it holds the run's state (genesis + snapshot + install);
* resident memory after the rounds, daemon and training process apart, in bytes per parameter (psutil),
  and each daemon's peak since it started (VmHWM: founding, loading the genesis, a snapshot install);
* per-round spans from ``/v1/history`` (``spans_s``): the daemon's share of the round (everything but
  ``train``), and ``train`` per inner step, to project the share at the default H (50 inner steps of
  batch 32 x 128 bytes: see ``project``).

Run: ``flock /work/heavy.lock .venv/bin/python bench/bench_model_scale.py [--sizes 10M,30M,100M]``.
Prints a table and writes bench/results/model_scale.json (one row per size, rows of other sizes kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tomllib

import tomli_w

from daemon.cli.cluster import Cluster, ClusterError, converged
from daemon.home import Home
from daemon.node.store import read_genesis

RESULTS = Path(__file__).resolve().parent / "results" / "model_scale.json"
SHAPES = {  # GPT-2-like shapes of the default task (parameters ~ 12 x n_layer x n_embd^2)
    "10M": {"n_layer": 2, "n_embd": 640, "n_head": 8},
    "30M": {"n_layer": 4, "n_embd": 768, "n_head": 12},
    "100M": {"n_layer": 8, "n_embd": 1024, "n_head": 16},
}
ROUNDS = 3
INNER_STEPS = 4  # small H: the measured train span is per inner step, projected to the default
CONTEXT = {"block_size": 32, "max_corpus_bytes": 1_000_000}
DEFAULT_H = 50  # training.DilocoConfig.inner_steps
DEFAULT_TOKENS_PER_STEP = 32 * 128  # batch_size x block_size of the defaults
BENCH_TOKENS_PER_STEP = 1 * CONTEXT["block_size"]
DEADLINE_S = 900.0
COMPACT_WAIT_S = 60.0


def _rss(pid: int) -> tuple[int, int, int]:
    """(daemon, training process) resident bytes, and the daemon's peak (VmHWM: Linux only, else 0)."""
    proc = psutil.Process(pid)
    children = proc.children(recursive=True)
    return proc.memory_info().rss, sum(p.memory_info().rss for p in children), _peak(pid)


def _peak(pid: int) -> int:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return 0
    line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


def _configure(group: Cluster, index: int, **sections: dict[str, Any]) -> None:
    home = Home(Path(group.node(index).home))
    config = tomllib.loads(home.config_file.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    home.config_file.write_text(tomli_w.dumps(config))


def measure(size: str, workdir: Path) -> dict[str, Any]:
    group = Cluster(workdir / size)
    try:
        group.create(3, task="stdlib-lm", training={"max_rounds": ROUNDS, "eval_every": 1000},
                     diloco={"inner_steps": INNER_STEPS, "batch_size": 1}, sync={"snapshot_every": 2})
        for index in range(3):  # the joiners download the genesis, as when the founder used init_from
            _configure(group, index, task={**SHAPES[size], **CONTEXT}, node={"rebuild_genesis": False})
        _configure(group, 2, training={"enabled": False})
        group.start(0)
        group.start(1)
        trained = group.wait_until(
            lambda s: all(x.get("contributions") == 2 * ROUNDS for x in s[:2]),
            timeout_s=DEADLINE_S, what="two nodes to train",
        )
        try:  # a late joiner catches up from a snapshot only if one of them compacted
            trained = group.wait_until(
                lambda s: min(x["retained_contributions"] for x in s[:2]) < 2 * ROUNDS,
                timeout_s=COMPACT_WAIT_S, what="one of them to compact",
            )
        except ClusterError as exc:
            print(f"no compaction, the late joiner replays records: {str(exc)[:200]}", file=sys.stderr)
        params = read_genesis(Path(group.node(0).home) / "store" / "genesis.bin").length
        founder_rss = _rss(trained[0]["pid"])
        joiner_rss = _rss(trained[1]["pid"])
        history = group.client(0).get("/v1/history")
        started = time.monotonic()
        group.start(2)
        statuses = group.wait_until(
            lambda s: converged(s, contributions=2 * ROUNDS), timeout_s=DEADLINE_S, what="the late joiner"
        )
        late_s = time.monotonic() - started
        late_rss = _rss(statuses[2]["pid"])
    finally:
        group.down()
    genesis = trained[1]["join"]["genesis_transfer"]
    snapshot = statuses[2]["join"]["snapshot_transfer"] or {}
    rounds = history["rounds"]
    spans = _mean_spans(rounds)
    round_s = sum(r["round_s"] for r in rounds) / len(rounds)
    overhead_s = sum(v for k, v in spans.items() if k != "train")
    return {
        "size": size,
        "params": params,
        "genesis_bytes": genesis["bytes_total"],
        "genesis_s": genesis["elapsed_s"],
        "genesis_rate_mb_s": round(genesis["bytes_total"] / max(genesis["elapsed_s"], 1e-6) / 1e6, 1),
        "snapshot_bytes": snapshot.get("bytes_total", 0),
        "snapshot_s": snapshot.get("elapsed_s", 0.0),
        "late_join_s": round(late_s, 2),
        "founder_daemon_b_per_param": round(founder_rss[0] / params, 2),
        "founder_trainer_b_per_param": round(founder_rss[1] / params, 2),
        "joiner_daemon_b_per_param": round(joiner_rss[0] / params, 2),
        "late_daemon_b_per_param": round(late_rss[0] / params, 2),
        "founder_daemon_peak_b_per_param": round(founder_rss[2] / params, 2),
        "joiner_daemon_peak_b_per_param": round(joiner_rss[2] / params, 2),
        "late_daemon_peak_b_per_param": round(late_rss[2] / params, 2),
        "round_s": round(round_s, 3),
        "spans_s": spans,
        "daemon_share": round(overhead_s / round_s, 3),
        "daemon_share_at_default_h": round(project(overhead_s, spans.get("train", 0.0)), 4),
    }


def _mean_spans(rounds: list[dict[str, Any]]) -> dict[str, float]:
    names = {name for r in rounds for name in r.get("spans_s", {})}
    total = {n: sum(r.get("spans_s", {}).get(n, 0.0) for r in rounds) for n in sorted(names)}
    return {n: round(t / len(rounds), 4) for n, t in total.items()}


def project(overhead_s: float, train_s: float) -> float:
    """The daemon's share of a round at the default H and batch: the train span scales with inner steps
    and tokens per step (compute-bound), the daemon's spans with the model size only (measured here)."""
    scale = (DEFAULT_H / INNER_STEPS) * (DEFAULT_TOKENS_PER_STEP / BENCH_TOKENS_PER_STEP)
    return overhead_s / (overhead_s + train_s * scale) if train_s else 0.0


COLUMNS = [
    ("size", "size"),
    ("params", "params"),
    ("genesis_bytes", "genesis B"),
    ("genesis_s", "genesis s"),
    ("genesis_rate_mb_s", "MB/s"),
    ("snapshot_bytes", "snapshot B"),
    ("snapshot_s", "snap s"),
    ("late_join_s", "late join s"),
    ("founder_daemon_b_per_param", "daemon B/p"),
    ("founder_trainer_b_per_param", "trainer B/p"),
    ("late_daemon_b_per_param", "late daemon B/p"),
    ("founder_daemon_peak_b_per_param", "peak B/p"),
    ("round_s", "round s"),
    ("daemon_share", "daemon share"),
    ("daemon_share_at_default_h", "share @H=50"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,30M")
    args = parser.parse_args()
    rows = {row["size"]: row for row in json.loads(RESULTS.read_text())} if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory(prefix="meshtrain-model-scale-") as tmp:
        for size in args.sizes.split(","):
            row = measure(size, Path(tmp))
            row["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            rows[size] = row
            RESULTS.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
            print(json.dumps(row), flush=True)
    print(" | ".join(title for _, title in COLUMNS))
    for row in rows.values():
        print(" | ".join(str(row.get(key, "")) for key, _ in COLUMNS))


if __name__ == "__main__":
    main()
