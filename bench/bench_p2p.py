"""p2p throughput bench: fetch_blob and Host.request vs a plain asyncio TCP socket, sender and receiver in
separate processes (one peer per process, as in production), loopback, same run.

The parent process is the receiver; it spawns a sender process that serves the same N MB payload three ways:
a blob (`Host.serve_blobs`, fetched with `Host.fetch_blob`: chunked, blake2b-verified), a request handler
returning the payload (`Host.request`: one frame on one stream), and an asyncio TCP server writing it in
1 MiB slices. Each side measures its asyncio event loop's worst scheduling delay (a 1 ms ticker) during each
transfer: it bounds how long the daemon's API, gossip and timers stall while a snapshot moves.

``--profile`` adds one cProfile'd fetch in the receiver's libp2p (trio) thread and prints the top functions:
that is where py-libp2p spends the time.

Usage: python bench/bench_p2p.py [--mb 64] [--repeats 3] [--profile]
       -> prints a table, writes bench/results/p2p.json
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import p2p

SOURCE = "/meshtrain/bench-source/1"
BLOB_ID = b"bench/blob"
TICK_S = 0.001  # loop-lag sampling period
RESULTS = Path(__file__).parent / "results" / "p2p.json"


class LagProbe:
    """Measures the asyncio loop's worst scheduling delay since the last `reset()`."""

    def __init__(self) -> None:
        self.max_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.max_lag_s = max(self.max_lag_s, time.perf_counter() - t0 - TICK_S)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def reset(self) -> None:
        self.max_lag_s = 0.0


# ---------------------------------------------------------------------------------------------- sender


async def sender(mb: int) -> None:
    """Child process: serve the payload; stdin lines "lag-reset" / "lag" are the parent's probe controls."""
    payload = os.urandom(mb * 1024 * 1024)
    source = p2p.BlobSource.from_bytes(payload)
    probe = LagProbe()
    probe.start()

    async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        view = memoryview(payload)
        while await reader.read(1):
            for off in range(0, len(view), 1 << 20):
                writer.write(view[off : off + (1 << 20)])
                await writer.drain()
        writer.close()

    async def serve_request(peer_id: str, data: bytes) -> bytes:
        return payload

    tcp = await asyncio.start_server(serve_tcp, "127.0.0.1", 0)
    async with p2p.Host(p2p.Identity.generate()) as host:
        host.serve_blobs(lambda blob_id: source if blob_id == BLOB_ID else None)
        host.set_request_handler(SOURCE, serve_request)
        hello = {"addr": host.listen_addrs()[0], "tcp_port": tcp.sockets[0].getsockname()[1]}
        print(json.dumps(hello), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).strip():
            if line == b"lag-reset":
                probe.reset()
                print("ok", flush=True)
            elif line == b"lag":
                print(f"{probe.max_lag_s * 1e3:.2f}", flush=True)
            elif line == b"prof-start":
                prof = cProfile.Profile()
                await in_trio(host, prof.enable)
                print("ok", flush=True)
            elif line == b"prof-stop":
                await in_trio(host, prof.disable)
                print(json.dumps(top_functions(prof)), flush=True)
    tcp.close()


# ---------------------------------------------------------------------------------------------- receiver


class Sender:
    """The parent's handle on the sender process (line protocol over its stdin/stdout)."""

    def __init__(self, mb: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "sender", "--mb", str(mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.hello = json.loads(self.proc.stdout.readline())

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def measure(snd: Sender, probe: LagProbe, nbytes: int, transfer) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(MB/s, receiver lag ms, sender lag ms) of one ``await transfer()``."""
    await asyncio.to_thread(snd.ask, "lag-reset")
    probe.reset()
    t0 = time.perf_counter()
    got = await transfer()
    dt = time.perf_counter() - t0
    recv_lag = probe.max_lag_s * 1e3
    send_lag = float(await asyncio.to_thread(snd.ask, "lag"))
    assert got == nbytes, (got, nbytes)
    return nbytes / dt / 1e6, recv_lag, send_lag


async def receiver(mb: int, repeats: int, profile: bool) -> dict[str, object]:
    nbytes = mb * 1024 * 1024
    snd = await asyncio.to_thread(Sender, mb)
    probe = LagProbe()
    probe.start()
    rows: dict[str, list[tuple[float, float, float]]] = {"fetch_blob": [], "request": [], "asyncio_tcp": []}
    profile_text = ""
    try:
        async with p2p.Host(p2p.Identity.generate()) as host:
            peer = await host.connect(snd.hello["addr"])

            async def fetch() -> int:
                return len(await host.fetch_blob(BLOB_ID, peers=[peer], timeout_s=120))

            async def request() -> int:
                return len(await host.request(peer, SOURCE, b"", timeout_s=120))

            reader, writer = await asyncio.open_connection("127.0.0.1", snd.hello["tcp_port"])

            async def tcp() -> int:
                writer.write(b"g")
                got = 0
                while got < nbytes:
                    got += len(await reader.read(min(nbytes - got, 1 << 20)))
                return got

            await fetch()  # warm-up: connection, stream protocols, page cache
            for _ in range(repeats):
                for name, fn in (("fetch_blob", fetch), ("request", request), ("asyncio_tcp", tcp)):
                    rows[name].append(await measure(snd, probe, nbytes, fn))
            if profile:
                profile_text = await profile_fetch(host, snd, fetch)
            writer.close()
    finally:
        await asyncio.to_thread(snd.close)

    def summary(name: str) -> dict[str, object]:
        rates = [r[0] for r in rows[name]]
        return {
            "mb_s_median": round(statistics.median(rates), 1),
            "mb_s_all": [round(r, 1) for r in rates],
            "receiver_loop_max_lag_ms": round(max(r[1] for r in rows[name]), 2),
            "sender_loop_max_lag_ms": round(max(r[2] for r in rows[name]), 2),
        }

    paths = {name: summary(name) for name in rows}
    tcp_rate = paths["asyncio_tcp"]["mb_s_median"]
    assert isinstance(tcp_rate, float)
    for name in ("fetch_blob", "request"):
        rate = paths[name]["mb_s_median"]
        assert isinstance(rate, float)
        paths[name]["ratio_to_tcp"] = round(rate / tcp_rate, 3)
    return {
        "payload_mb": mb,
        "repeats": repeats,
        "paths": paths,
        "setup": "sender and receiver in separate processes, loopback, libp2p TCP+Noise+Yamux",
        "profile_top": profile_text,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the box skews every path
        "machine": platform.machine(),
    }


async def in_trio(host: p2p.Host, fn) -> None:  # type: ignore[no-untyped-def]
    """Run the sync ``fn`` in the host's trio thread and wait (cProfile profiles the calling thread)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def call() -> None:
        fn()
        loop.call_soon_threadsafe(done.set)

    host._bridge.call_soon_in_trio(call)
    await done.wait()


def top_functions(prof: cProfile.Profile, n: int = 20) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    return text[text.find("   ncalls") :] if "   ncalls" in text else text


async def profile_fetch(host: p2p.Host, snd: Sender, fetch) -> str:  # type: ignore[no-untyped-def]
    """cProfile one fetch in both processes' trio threads (where libp2p runs); top functions by own time."""
    prof = cProfile.Profile()
    await asyncio.to_thread(snd.ask, "prof-start")
    await in_trio(host, prof.enable)
    t0 = time.perf_counter()
    await fetch()
    dt = time.perf_counter() - t0
    await in_trio(host, prof.disable)
    sender_text = json.loads(await asyncio.to_thread(snd.ask, "prof-stop"))
    return (
        f"--- profiled fetch took {dt:.2f} s\n--- RECEIVER trio thread\n{top_functions(prof)}"
        f"--- SENDER trio thread\n{sender_text}"
    )


def print_table(result: dict[str, object]) -> None:
    paths = result["paths"]
    assert isinstance(paths, dict)
    rows = [("path", "MB/s (median)", "runs", "vs tcp", "recv lag ms", "send lag ms")]
    for name, p in paths.items():
        rows.append(
            (
                name,
                str(p["mb_s_median"]),
                " ".join(map(str, p["mb_s_all"])),
                str(p.get("ratio_to_tcp", 1.0)),
                str(p["receiver_loop_max_lag_ms"]),
                str(p["sender_loop_max_lag_ms"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"{result['payload_mb']} MB per transfer, loadavg {result['loadavg_1m_at_end']}")
    if result["profile_top"]:
        print(result["profile_top"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one fetch in the receiver")
    parser.add_argument("--role", choices=["receiver", "sender"], default="receiver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sender":
        asyncio.run(sender(args.mb))
        sys.exit(0)
    result = asyncio.run(receiver(args.mb, args.repeats, args.profile))
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
