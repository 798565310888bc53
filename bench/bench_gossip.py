"""Gossip delivery latency: N nodes (one process each, default 8), every node publishing announcements.

Each node is a `p2p.Host` in its own process, connected to every other node (gossipsub then keeps a mesh of
D=6 of them), with the announcement topic validated by a schema check (as the daemon does) and peer scoring
on. Every node publishes ``--rate`` messages per second for ``--seconds`` (default 1/s per node: 8/s in
total, above the daemon's real rate of about one announcement per node per training round), each carrying
its send time; receivers record ``now - sent`` (one machine, one clock). The parent prints p50/p90/p99/max
latency and the delivered fraction (every node should get every other node's messages exactly once).

Usage: python bench/bench_gossip.py [--nodes 8] [--rate 1] [--seconds 20]
       -> prints a table, writes bench/results/gossip.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import p2p

TOPIC = "meshtrain/bench/announce"
PAYLOAD_BYTES = 200  # an announcement: author, seq, content id, version digest
MESH_SETTLE_S = 6.0  # connect + subscribe + a few 1 s heartbeats to graft the mesh before publishing
DRAIN_S = 5.0  # after the last publish, wait this long for stragglers
RESULTS = Path(__file__).parent / "results" / "gossip.json"
HEADER = struct.Struct(">dII")  # sent wall time, publisher index, sequence


def valid(from_peer: str, data: bytes) -> bool:
    return len(data) == PAYLOAD_BYTES


async def node(index: int, rate: float, seconds: float) -> None:
    """Child: print our addr, read {"peers": [...], "start_at": t} from stdin, run, print results."""
    async with p2p.Host(p2p.Identity.generate()) as host:
        host.set_topic_validator(TOPIC, valid)
        queue = host.subscribe(TOPIC)
        print(json.dumps({"addr": host.listen_addrs()[0]}), flush=True)
        config = json.loads(await asyncio.to_thread(sys.stdin.readline))
        for addr in config["peers"][:index]:  # dial the lower-indexed nodes: every pair once
            await host.connect(addr)
        latencies: list[float] = []
        seen: set[tuple[int, int]] = set()
        duplicates = 0

        async def receive() -> None:
            nonlocal duplicates
            while True:
                msg = await queue.get()
                sent, publisher, seq = HEADER.unpack_from(msg.data)
                latencies.append(time.time() - sent)
                if (publisher, seq) in seen:
                    duplicates += 1
                seen.add((publisher, seq))

        receiver = asyncio.create_task(receive())
        await asyncio.sleep(max(0.0, config["start_at"] - time.time()))
        count = int(rate * seconds)
        t0 = time.monotonic()
        for seq in range(count):  # paced on an absolute schedule so a slow publish does not drift the rate
            await asyncio.sleep(max(0.0, t0 + seq / rate - time.monotonic()))
            body = HEADER.pack(time.time(), index, seq)
            await host.publish(TOPIC, body + b"\0" * (PAYLOAD_BYTES - len(body)))
        await asyncio.sleep(DRAIN_S)
        receiver.cancel()
        stats = host.stats()
        print(
            json.dumps(
                {
                    "latencies": latencies,
                    "unique": len(seen),
                    "duplicates": duplicates,
                    "published": count,
                    "dropped_queue_full": stats["gossip_dropped_queue_full"],
                    "rejected": stats["gossip_rejected_invalid"],
                }
            ),
            flush=True,
        )


def run(nodes: int, rate: float, seconds: float) -> dict[str, object]:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--role", str(i), "--rate", str(rate), "--seconds", str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(nodes)
    ]
    try:
        addrs = [json.loads(p.stdout.readline())["addr"] for p in procs]  # type: ignore[union-attr]
        config = json.dumps({"peers": addrs, "start_at": time.time() + MESH_SETTLE_S})
        for p in procs:
            p.stdin.write(config + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        reports = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
    finally:
        for p in procs:
            p.wait(timeout=30)
    latencies = sorted(x * 1e3 for r in reports for x in r["latencies"])
    published = sum(r["published"] for r in reports)
    expected = sum(published - r["published"] for r in reports)  # everyone else's messages

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else -1.0

    return {
        "nodes": nodes,
        "rate_per_node_per_s": rate,
        "total_rate_per_s": rate * nodes,
        "seconds": seconds,
        "payload_bytes": PAYLOAD_BYTES,
        "delivered": sum(r["unique"] for r in reports),
        "expected": expected,
        "duplicates": sum(r["duplicates"] for r in reports),
        "dropped_queue_full": sum(r["dropped_queue_full"] for r in reports),
        "rejected": sum(r["rejected"] for r in reports),
        "latency_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "max": round(latencies[-1], 2) if latencies else -1.0,
            "mean": round(statistics.fmean(latencies), 2) if latencies else -1.0,
        },
        "setup": "a process per node, all pairs connected, loopback, gossipsub D=6, scoring, validator",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def print_table(r: dict[str, object]) -> None:
    lat = r["latency_ms"]
    assert isinstance(lat, dict)
    print(
        f"{r['nodes']} nodes, {r['rate_per_node_per_s']}/s per node ({r['total_rate_per_s']}/s total), "
        f"{r['seconds']} s, {r['payload_bytes']} B messages, loadavg {r['loadavg_1m_at_end']}"
    )
    print("delivered  expected  dups  dropped  p50 ms  p90 ms  p99 ms  max ms")
    print(
        f"{r['delivered']:<10} {r['expected']:<9} {r['duplicates']:<5} {r['dropped_queue_full']:<8} "
        f"{lat['p50']:<7} {lat['p90']:<7} {lat['p99']:<7} {lat['max']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1.0, help="messages per second per node")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role != "parent":
        asyncio.run(node(int(args.role), args.rate, args.seconds))
        sys.exit(0)
    result = run(args.nodes, args.rate, args.seconds)
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
