"""meshtrain over an emulated WAN against the same run on loopback: 8 daemons, digits.

Each scenario starts 8 real daemons (``meshtrain daemon`` through the cluster harness), each in its own
network namespace of tests/netns/wan.py (userspace link emulator: delay, rate, loss; home NATs), trains R
rounds per node and measures, from the moment every node is connected:

* ``agree_s``: until all 8 hold all 8*R contributions under one state hash;
* ``rounds_s``: until every node finished its R rounds (training time, with merges in between; nodes
  start training as soon as they hold the genesis, so some rounds may precede "connected");
* ``tail_s``: from the last node done to agreement (``agree_s - rounds_s``): what the network adds once
  nobody computes any more;
* ``wire_mb``: bytes the emulator carried (both directions of every access link: libp2p framing, Noise,
  DHT, gossip and sync; what an ISP would bill), and ``payload_mb``: sync payload the nodes counted;
* ``pulls``, ``pull_failures`` (timeouts and errors of anti-entropy pulls), ``stale_skipped`` (rounds
  not contributed because too much landed while they trained), ``relayed`` (connections through a
  relay at the end), and the link model's drops (loss and full buffers).

Scenarios: ``loopback`` (no namespaces), ``wan`` (the mixed WAN: RTT 20-200 ms, 10-100 Mbit/s, 0.5 %
loss, two NATed nodes), ``rtt200`` (every path 200 ms RTT, 100 Mbit/s), ``10mbit`` (every link 10
Mbit/s, 20 ms RTT), and ``rtt200-fast-ae`` (rtt200 with ``[sync] interval_s = 0.5``: does a shorter
anti-entropy period buy anything at that latency?).

The default task (stdlib-lm) is too slow for 8 daemons on 2 cores; digits (H=10) keeps a run under
three minutes. Needs root (namespaces). Run under the shared lock:
``flock /work/heavy.lock python bench/bench_wan.py [--rounds 20] [--scenarios loopback,wan,...]``.
Prints a table, writes bench/results/wan.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "netns"))

from wan import DEFAULT_SITES, Site, open_wan_cluster  # noqa: E402

from daemon.cli.cluster import Cluster, converged  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NODES = 8
TIMEOUT_S = 900.0
# The five default sites and three more: RTTs 20-200 ms, 10-100 Mbit/s, two NATed nodes, one slow link.
MIXED = (
    *DEFAULT_SITES,
    Site(delay_ms=25, rate_mbit=50),
    Site(delay_ms=10, rate_mbit=20),
    Site(delay_ms=40, rate_mbit=100),
)
SCENARIOS: dict[str, dict[str, Any]] = {
    "loopback": {"sites": None},
    "wan": {"sites": MIXED},
    "rtt200": {"sites": [replace(s, delay_ms=50, rate_mbit=100) for s in MIXED]},
    "10mbit": {"sites": [replace(s, delay_ms=5, rate_mbit=10) for s in MIXED]},
    "rtt200-fast-ae": {
        "sites": [replace(s, delay_ms=50, rate_mbit=100) for s in MIXED],
        "sync": {"interval_s": 0.5},
    },
}


def _run(group: Cluster, rounds: int) -> dict[str, Any]:
    """From connected to agreement; the measurements that need the daemons."""
    started = time.monotonic()
    done = group.wait_until(
        lambda s: all(x.get("training") == "done" for x in s), timeout_s=TIMEOUT_S, what="every node done"
    )
    rounds_s = time.monotonic() - started
    final = group.wait_until(
        lambda s: converged(s, contributions=NODES * rounds), timeout_s=TIMEOUT_S, what="agreement"
    )
    agree_s = time.monotonic() - started
    counters = [s["counters"] for s in final]
    return {
        "rounds_s": round(rounds_s, 1),
        "agree_s": round(agree_s, 1),
        "tail_s": round(agree_s - rounds_s, 1),
        "payload_mb": round(sum(s["bytes_sent"] for s in final) / 1e6, 2),
        "pulls": sum(c["pulls"] for c in counters),
        "pull_failures": sum(c["pull_failures"] for c in counters),
        "stale_skipped": sum(c["stale_rounds_skipped"] for c in counters),
        "relayed": sum(v == "relayed" for s in final for v in s["connections"].values()),
        "done_at_round": [s["round"] for s in done],
    }


def measure(name: str, rounds: int, workdir: Path) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    options = {
        "task": "digits",
        "training": {"max_rounds": rounds, "eval_every": 1000},
        "diloco": {"inner_steps": 10},
        "sync": scenario.get("sync"),
    }
    begun = time.monotonic()
    if scenario["sites"] is None:
        group = Cluster(workdir / name)
        try:
            group.up(NODES, timeout_s=TIMEOUT_S, **options)
            row = {"startup_s": round(time.monotonic() - begun, 1), **_run(group, rounds)}
        finally:
            group.down()
        return {"scenario": name, **row, "wire_mb": None, "drops": None}
    with open_wan_cluster(workdir / name, scenario["sites"], seed=7, show_logs=False, **options) as (
        wan,
        group,
    ):
        row = {"startup_s": round(time.monotonic() - begun, 1), **_run(group, rounds)}
        links = wan.stats().values()
    wire = sum(link[d]["bytes"] for link in links for d in ("up", "down")) / 2  # each byte crosses 2 links
    drops: dict[str, int] = {}
    for link in links:
        for direction in ("up", "down"):
            for reason, n in link[direction]["dropped"].items():
                drops[reason] = drops.get(reason, 0) + n
    return {"scenario": name, **row, "wire_mb": round(wire / 1e6, 2), "drops": drops}


COLUMNS = [
    "scenario",
    "startup_s",
    "rounds_s",
    "agree_s",
    "wire_mb",
    "payload_mb",
    "pulls",
    "pull_failures",
    "stale_skipped",
    "relayed",
    "drops",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshtrain-wan-") as tmp:
        for name in args.scenarios.split(","):
            rows.append(measure(name, args.rounds, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(" | ".join(COLUMNS))
    print(" | ".join("---" for _ in COLUMNS))
    for row in rows:
        print(" | ".join(str(row[key]) for key in COLUMNS))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "nodes": NODES,
        "rounds_per_node": args.rounds,
        "task": "digits",
        "inner_steps": 10,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    (args.out / "wan.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
