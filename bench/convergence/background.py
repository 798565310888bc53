"""What an idle 4-daemon cluster sends per second, and which daemon setting each byte comes from.

Run from the repo root (root: it needs a private network namespace):

    python -m bench.convergence.background

Each variant starts 4 daemons on the "tiny" preset in a fresh network namespace, lets them train two
rounds (so every node holds the genesis and a few contributions), waits 5 s, then counts the namespace's
loopback for IDLE_S seconds: every TCP byte the daemons send while nothing is trained (TCP payload, and
IP bytes with headers). The variants start from the old [sync] defaults, then switch background sources
off one at a time, cumulatively: anti-entropy (today's [sync] defaults), AutoNAT ([nat] autonat) and DHT
discovery (no knob yet: prototype/sitecustomize.py patches it). The membership heartbeat is sent on
change only. Prints one JSON line per variant and writes
bench/results/convergence_background.json.

Rejected: measuring during training (the background would be mixed with payloads, whose timing varies
from run to run; the convergence benchmark's breakdown covers that case).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.convergence import _methods, _overhead

IDLE_S = 60.0  # long enough for an idle heartbeat refresh and six discovery rounds at the defaults
OLD_SYNC = {"interval_s": 2.0, "fanout": 3}  # the daemon's [sync] defaults before 2026-12-01
VARIANTS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [  # name, [sync], [node], prototype
    ("anti-entropy every 2 s from 3 peers (old defaults)", OLD_SYNC, {}, ""),
    ("daemon defaults", {}, {}, ""),
    ("+ AutoNAT off", {}, {"nat.autonat": False}, ""),
    ("+ DHT discovery every 300 s (prototype)", {}, {"nat.autonat": False}, "discovery_s=300"),
]


def measure(sync: dict[str, Any], node: dict[str, Any], prototype: str) -> dict[str, Any]:
    """One variant, in this (child) process's own network namespace."""
    from daemon.cli.cluster import Cluster, converged

    if not _overhead.enter_private_netns():
        raise SystemExit("needs root: unshare(CLONE_NEWNET) was refused")
    with tempfile.TemporaryDirectory(prefix="meshtrain-background-") as tmp:
        group = Cluster(Path(tmp) / "cluster")
        _methods.start_cluster(
            group, 4, node=node, prototype=prototype, task="bench.convergence.tasks:tiny", run="idle",
            sync=sync, diloco={"inner_steps": 5, "batch_size": 8, "codec": "sparse-q2", "topk_density": 0.02},
            training={"max_rounds": 2, "eval_every": 100, "threads": 1},
        )
        try:
            group.wait_until(lambda st: converged(st, contributions=8), timeout_s=600, what="8 contributions")
            time.sleep(5)
            before, app_before, started = _overhead.loopback_sent(), _app_bytes(group), time.monotonic()
            time.sleep(IDLE_S)
            seconds = time.monotonic() - started
            after, app_after = _overhead.loopback_sent(), _app_bytes(group)
        finally:
            group.down()
    ip_bytes, packets = after[0] - before[0], after[1] - before[1]
    return {
        "seconds": round(seconds, 1),
        "tcp_payload_Bps": round(_overhead.tcp_payload(ip_bytes, packets) / seconds),
        "ip_Bps": round(ip_bytes / seconds),
        "packets_per_s": round(packets / seconds, 1),
        "app_Bps": round((app_after - app_before) / seconds),
    }


def _app_bytes(group: Any) -> int:
    return sum(int(s["bytes_sent"]) for s in group.status())


def _child(args: tuple[dict[str, Any], dict[str, Any], str]) -> dict[str, Any]:
    return measure(*args)


def main() -> None:
    results = []
    for name, sync, node, prototype in VARIANTS:
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh namespace per variant
            row = {"variant": name, "sync": sync, "node": node, "prototype": prototype,
                   **pool.apply(_child, ((sync, node, prototype),))}
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {"command": "python -m bench.convergence.background", "idle_s": IDLE_S, "peers": 4,
              "when": time.strftime("%Y-%m-%d %H:%M:%S"), "variants": results}
    out = Path(__file__).resolve().parents[1] / "results" / "convergence_background.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
