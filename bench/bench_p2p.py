"""p2p throughput bench: a 64 MB request through `p2p.Host` vs a plain asyncio TCP socket, same run.

Both hosts live in this process (each with its own trio thread), so libp2p's two ends share one GIL; the
notes measured ~150 MB/s in-process vs ~230 MB/s across processes for raw py-libp2p. The asyncio loop's
max lag is sampled by a 1 ms ticker while the transfer runs (it bounds how long the daemon's API, gossip
and timers can stall during a bulk transfer).

Usage: python bench/bench_p2p.py [--mb 64] [--repeats 3]   -> prints a table, writes bench/results/p2p.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import p2p

PROTOCOL = "/meshtrain/bench-sink/1"
TICK_S = 0.001  # loop-lag sampling period
RESULTS = Path(__file__).parent / "results" / "p2p.json"


class LagProbe:
    """Measures the asyncio loop's worst scheduling delay while active."""

    def __init__(self) -> None:
        self.max_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.max_lag_s = max(self.max_lag_s, time.perf_counter() - t0 - TICK_S)

    def __enter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def bench_libp2p(payload: bytes, repeats: int) -> tuple[list[float], list[float]]:
    async def sink(peer_id: str, data: bytes) -> bytes:
        return len(data).to_bytes(8, "big")

    rates, lags = [], []
    async with p2p.Host(p2p.Identity.generate()) as a, p2p.Host(p2p.Identity.generate()) as b:
        b.set_request_handler(PROTOCOL, sink)
        await a.connect(b.listen_addrs()[0])
        await a.request(b.peer_id, PROTOCOL, b"warmup" * 1000, timeout_s=10)
        for _ in range(repeats):
            with LagProbe() as probe:
                t0 = time.perf_counter()
                reply = await a.request(b.peer_id, PROTOCOL, payload, timeout_s=120)
                dt = time.perf_counter() - t0
            assert int.from_bytes(reply, "big") == len(payload)
            rates.append(len(payload) / dt / 1e6)
            lags.append(probe.max_lag_s * 1e3)
    return rates, lags


async def bench_asyncio_tcp(payload: bytes, repeats: int) -> tuple[list[float], list[float]]:
    """Same shape as the libp2p path: length prefix, payload, 8-byte ack; 1 MiB writes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                n = int.from_bytes(await reader.readexactly(8), "big")
            except asyncio.IncompleteReadError:
                break
            got = 0
            while got < n:
                got += len(await reader.read(min(n - got, 1 << 20)))
            writer.write(got.to_bytes(8, "big"))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rates, lags = [], []
    view = memoryview(payload)
    for _ in range(repeats):
        with LagProbe() as probe:
            t0 = time.perf_counter()
            writer.write(len(payload).to_bytes(8, "big"))
            for off in range(0, len(payload), 1 << 20):
                writer.write(view[off : off + (1 << 20)])
                await writer.drain()
            assert int.from_bytes(await reader.readexactly(8), "big") == len(payload)
            dt = time.perf_counter() - t0
        rates.append(len(payload) / dt / 1e6)
        lags.append(probe.max_lag_s * 1e3)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)  # let the server task see EOF and finish before the loop shuts down
    server.close()
    await server.wait_closed()
    return rates, lags


async def main(mb: int, repeats: int) -> dict[str, object]:
    payload = bytes(range(256)) * (mb * 1024 * 1024 // 256)
    lp_rates, lp_lags = await bench_libp2p(payload, repeats)
    tcp_rates, tcp_lags = await bench_asyncio_tcp(payload, repeats)
    lp, tcp = statistics.median(lp_rates), statistics.median(tcp_rates)
    return {
        "payload_mb": mb,
        "repeats": repeats,
        "libp2p_request_mb_s": {"median": round(lp, 1), "all": [round(r, 1) for r in lp_rates]},
        "asyncio_tcp_mb_s": {"median": round(tcp, 1), "all": [round(r, 1) for r in tcp_rates]},
        "libp2p_over_tcp_ratio": round(lp / tcp, 3),
        "loop_max_lag_ms": {"libp2p": round(max(lp_lags), 2), "asyncio_tcp": round(max(tcp_lags), 2)},
        "setup": "both ends in one process; libp2p hosts each in their own trio thread; loopback",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the box skews both paths
        "machine": platform.machine(),
    }


def print_table(result: dict[str, object]) -> None:
    lp = result["libp2p_request_mb_s"]
    tcp = result["asyncio_tcp_mb_s"]
    lag = result["loop_max_lag_ms"]
    assert isinstance(lp, dict) and isinstance(tcp, dict) and isinstance(lag, dict)
    rows = [
        ("path", "MB/s (median)", "runs", "loop max lag ms"),
        ("p2p.Host.request", f"{lp['median']}", " ".join(map(str, lp["all"])), f"{lag['libp2p']}"),
        ("asyncio TCP", f"{tcp['median']}", " ".join(map(str, tcp["all"])), f"{lag['asyncio_tcp']}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"ratio libp2p/tcp = {result['libp2p_over_tcp_ratio']}  ({result['payload_mb']} MB payload)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(main(args.mb, args.repeats))
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
