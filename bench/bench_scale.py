"""How meshtrain's cost grows with the mesh: clusters of 4, 8 and 16 real daemons on loopback.

For each size N, a cluster trains the tiny digits task for R rounds per node (H=10) and we measure:

* ``agree_s``: from the moment every node is connected until every node holds all N*R contributions
  under one state hash;
* memory per node: resident set size of the daemon plus its training process (psutil);
* traffic per node per local round, split by plane: anti-entropy (sync requests sent and bytes of
  request/response payload, from the p2p facade's counters), gossip (announcements received), DHT
  discovery rounds. Bytes are payload bytes at the facade; Noise/yamux framing and DHT messages are not
  in them (py-libp2p does not count them);
* idle control traffic: sync requests per node per second once training is done (the anti-entropy
  heartbeat, which is what a converged mesh keeps paying).

Run: ``python bench/bench_scale.py [--sizes 4,8,16] [--rounds 4]``. Prints a table, writes
bench/results/scale.json and bench/results/scale.png.
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

from daemon.cli.cluster import Cluster, converged

RESULTS = Path(__file__).resolve().parent / "results"
IDLE_WINDOW_S = 20.0


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def measure(nodes: int, rounds: int, workdir: Path) -> dict[str, Any]:
    group = Cluster(workdir / f"n{nodes}")
    try:
        group.create(
            nodes,
            task="digits",
            training={"max_rounds": rounds, "eval_every": 1000},
            diloco={"inner_steps": 10},
        )
        for index in range(nodes):
            group.start(index)
        group.wait_connected(timeout_s=600)
        started = time.monotonic()
        statuses = group.wait_until(
            lambda s: converged(s, contributions=nodes * rounds), timeout_s=1200, what="agreement"
        )
        agree_s = time.monotonic() - started
        memory = [_rss_mb(s["pid"]) for s in statuses]
        p2p = [s["p2p"] for s in statuses]
        idle_start = [s["p2p"]["requests_sent"] for s in statuses]
        time.sleep(IDLE_WINDOW_S)  # a measurement window, not synchronization
        idle_end = [s["p2p"]["requests_sent"] for s in group.status()]
    finally:
        group.down()
    per_round = nodes * rounds
    return {
        "nodes": nodes,
        "rounds_per_node": rounds,
        "agree_s": round(agree_s, 2),
        "rss_mb_per_node": round(sum(memory) / nodes, 1),
        "peers_per_node": round(sum(len(s["peers"]) for s in statuses) / nodes, 2),
        "sync_requests_per_node_round": round(sum(p["requests_sent"] for p in p2p) / per_round, 2),
        "payload_bytes_sent_per_node_round": round(sum(p["bytes_sent"] for p in p2p) / per_round),
        "gossip_received_per_node_round": round(sum(p["gossip_received"] for p in p2p) / per_round, 2),
        "dht_rounds_per_node": round(sum(p.get("discovery_rounds", 0) for p in p2p) / nodes, 1),
        "idle_sync_requests_per_node_s": round(
            sum(e - s for s, e in zip(idle_start, idle_end, strict=True)) / nodes / IDLE_WINDOW_S, 2
        ),
    }


COLUMNS = [
    ("nodes", "N"),
    ("agree_s", "agree s"),
    ("rss_mb_per_node", "RSS MB/node"),
    ("peers_per_node", "peers/node"),
    ("sync_requests_per_node_round", "sync req/node/round"),
    ("payload_bytes_sent_per_node_round", "bytes sent/node/round"),
    ("gossip_received_per_node_round", "gossip rx/node/round"),
    ("idle_sync_requests_per_node_s", "idle sync req/node/s"),
]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["nodes"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(
        axes,
        [
            ("agree_s", "time until all agree (s)"),
            ("payload_bytes_sent_per_node_round", "bytes sent per node per round"),
            ("sync_requests_per_node_round", "sync requests per node per round"),
        ],
        strict=True,
    ):
        ax.plot(sizes, [r[key] for r in rows], "o-")
        ax.set_xlabel("nodes")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(sizes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,16")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshtrain-scale-") as tmp:
        for nodes in (int(n) for n in args.sizes.split(",")):
            rows.append(measure(nodes, args.rounds, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(" | ".join(title for _, title in COLUMNS))
    print(" | ".join("---" for _ in COLUMNS))
    for row in rows:
        print(" | ".join(str(row[key]) for key, _ in COLUMNS))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps({"rows": rows}, indent=2))
    _plot(rows, args.out / "scale.png")


if __name__ == "__main__":
    main()
