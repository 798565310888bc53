"""p2p throughput bench: every bulk path vs a plain socket, sender and receiver in separate processes
(one peer per process, as in production), loopback, same run.

The parent process is the receiver; it spawns a sender process that serves the same N MiB payload five ways:

* ``asyncio_tcp``: an asyncio TCP server writing it in 1 MiB slices (the ceiling);
* ``bare_libp2p_stream``: one raw py-libp2p stream on the very same hosts (TCP + Noise + Yamux, built by
  p2p/_libp2p.py, with p2p/_speedups.py's workarounds unless ``MESHTRAIN_P2P_SPEEDUPS=0``), 1 MiB writes,
  read in trio with no framing, bridge, hashing or copies of ours: what our layers are measured against;
* ``request``: a request handler returning the payload (`Host.request`: one frame on one stream);
* ``fetch_blob``: the payload served from a file (`Host.serve_file`) and fetched into memory
  (`Host.fetch_blob`: chunked, pipelined, BLAKE3-verified per chunk and as a whole);
* ``fetch_blob_dest``: the same, written to a file (``dest=``: part file, pwrite, fsync, rename).

Each side measures its asyncio event loop's worst scheduling delay (a 1 ms ticker) during each transfer: it
bounds how long the daemon's API, gossip and timers stall while a snapshot moves. Each side also counts the
CPU time its process spent (user + system, all threads), its minor page faults, and how busy its trio
thread was (CPU time over wall time) per transfer: on a box with few cores, throughput tracks the CPU both
processes spend per byte, these are steadier than MB/s, and a trio thread near 1.0 is the limit.

Each repeat runs every path once (in reverse order every other repeat, so a drift in load favours no path);
a ratio (to the bare stream, to TCP) is the median over the repeats of the two rates' ratio *within* a repeat,
steadier on a shared box than a ratio of medians taken at different moments (since 2026-12-02; before, 3
repeats and a ratio of medians). What each path, the baseline included, measures is unchanged.

``--profile`` adds one cProfile'd transfer of the bare stream and of fetch_blob, in both processes' trio
threads, and prints the top functions of each.

Usage: python bench/bench_p2p.py [--mb 64] [--repeats 7] [--profile] [--out bench/results/p2p.json]
       MESHTRAIN_P2P_SPEEDUPS=0 python bench/bench_p2p.py --out bench/results/p2p_stock.json  (stock libp2p)
       -> prints a table, writes the JSON
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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

import p2p
from p2p import _speedups
from p2p._node import parse_peer_id

SOURCE = "/meshtrain/bench-source/1"
BARE = TProtocol("/meshtrain/bench-bare/1")
BLOB_ID = b"bench/blob"
SLICE = 1 << 20  # write/read size of the socket and bare-stream paths
TICK_S = 0.001  # loop-lag sampling period
RESULTS = Path(__file__).parent / "results" / "p2p.json"


def usage(host: p2p.Host) -> tuple[float, int, float]:
    """(CPU seconds, minor page faults) of this process so far, all threads, and the CPU seconds of the
    host's trio thread alone (where libp2p runs: the busier it is, the closer a path is to its limit)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    thread = host._bridge._thread
    assert thread is not None and thread.ident is not None
    trio_s = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt, trio_s


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
    blob_file = tempfile.NamedTemporaryFile(prefix="bench_p2p_", suffix=".bin")  # noqa: SIM115 (lives as long as the run)
    blob_file.write(payload)
    blob_file.flush()
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

    async def serve_bare(stream) -> None:  # type: ignore[no-untyped-def]  # trio thread: plain libp2p
        await stream.read(1)
        view = memoryview(payload)
        for off in range(0, len(view), SLICE):
            await stream.write(view[off : off + SLICE])
        await stream.close()

    tcp = await asyncio.start_server(serve_tcp, "127.0.0.1", 0)
    async with p2p.Host(p2p.Identity.generate()) as host:
        await host.serve_file(BLOB_ID, blob_file.name)
        host.set_request_handler(SOURCE, serve_request)
        await in_trio(host, lambda: host._node.host.set_stream_handler(BARE, serve_bare))
        hello = {"addr": host.listen_addrs()[0], "tcp_port": tcp.sockets[0].getsockname()[1]}
        print(json.dumps(hello), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        mark = usage(host)  # CPU and faults at the last "lag-reset"
        while line := (await reader.readline()).strip():
            if line == b"lag-reset":
                probe.reset()
                mark = usage(host)
                print("ok", flush=True)
            elif line == b"lag":
                now = usage(host)
                print(json.dumps([probe.max_lag_s * 1e3, *(b - a for a, b in zip(mark, now, strict=True))]))
                sys.stdout.flush()
            elif line == b"prof-start":
                prof = cProfile.Profile()
                await in_trio(host, prof.enable)
                print("ok", flush=True)
            elif line == b"prof-stop":
                await in_trio(host, prof.disable)
                print(json.dumps(top_functions(prof)), flush=True)
    tcp.close()
    blob_file.close()


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


Sample = tuple[float, float, float, float, float, int, int, float, float]
"""One transfer: MB/s, then one value per `COLUMNS` entry, in order."""
COLUMNS = {  # table heading -> (JSON key, aggregate over the repeats, digits)
    "recv lag ms": ("receiver_loop_max_lag_ms", max, 2),
    "send lag ms": ("sender_loop_max_lag_ms", max, 2),
    "recv cpu ms": ("receiver_cpu_ms_median", statistics.median, 1),
    "send cpu ms": ("sender_cpu_ms_median", statistics.median, 1),
    "recv faults": ("receiver_minor_faults_median", statistics.median, None),
    "send faults": ("sender_minor_faults_median", statistics.median, None),
    "recv trio busy": ("receiver_trio_thread_busy_median", statistics.median, 2),  # CPU / wall time
    "send trio busy": ("sender_trio_thread_busy_median", statistics.median, 2),
}


async def measure(snd: Sender, probe: LagProbe, host: p2p.Host, nbytes: int, transfer) -> Sample:  # type: ignore[no-untyped-def]
    """One ``await transfer()``, measured on both sides."""
    await asyncio.to_thread(snd.ask, "lag-reset")
    probe.reset()
    cpu0, faults0, trio0 = usage(host)
    t0 = time.perf_counter()
    got = await transfer()
    dt = time.perf_counter() - t0
    cpu1, faults1, trio1 = usage(host)
    recv_lag = probe.max_lag_s * 1e3
    send_lag, send_cpu_s, send_faults, send_trio_s = json.loads(await asyncio.to_thread(snd.ask, "lag"))
    assert got == nbytes, (got, nbytes)
    costs = (recv_lag, send_lag, (cpu1 - cpu0) * 1e3, send_cpu_s * 1e3, faults1 - faults0, send_faults)
    return (nbytes / dt / 1e6, *costs, (trio1 - trio0) / dt, send_trio_s / dt)


PATHS = ("asyncio_tcp", "bare_libp2p_stream", "request", "fetch_blob", "fetch_blob_dest")


async def bare_read(host: p2p.Host, peer: str) -> int:
    """Trio thread: one raw libp2p stream, read to EOF in 1 MiB reads; returns the byte count."""
    stream = await host._node.host.new_stream(parse_peer_id(peer), [BARE])
    await stream.write(b"g")
    got = 0
    try:
        while True:
            got += len(await stream.read(SLICE))
    except StreamEOF:
        pass
    await stream.close()
    return got


async def receiver(mb: int, repeats: int, profile: bool) -> dict[str, object]:
    nbytes = mb * 1024 * 1024
    snd = await asyncio.to_thread(Sender, mb)
    probe = LagProbe()
    probe.start()
    rows: dict[str, list[Sample]] = {name: [] for name in PATHS}
    profile_text = ""
    work = Path(tempfile.mkdtemp(prefix="bench_p2p_"))
    try:
        async with p2p.Host(p2p.Identity.generate()) as host:
            peer = await host.connect(snd.hello["addr"])

            async def fetch() -> int:
                # size pinned, as the daemon pins what it fetches (an offer's root and size)
                return len(await host.fetch_blob(BLOB_ID, peers=[peer], size=nbytes, timeout_s=120))

            async def fetch_dest() -> int:
                path = await host.fetch_blob(BLOB_ID, peers=[peer], dest=work / "blob.bin", size=nbytes,
                                             timeout_s=120)
                assert isinstance(path, Path)
                size = path.stat().st_size
                path.unlink()
                return size

            async def request() -> int:
                return len(await host.request(peer, SOURCE, b"", timeout_s=120, max_response_bytes=nbytes))

            async def bare() -> int:
                return await host._bridge.run(bare_read, host, peer)

            reader, writer = await asyncio.open_connection("127.0.0.1", snd.hello["tcp_port"])

            async def tcp() -> int:
                writer.write(b"g")
                got = 0
                while got < nbytes:
                    got += len(await reader.read(min(nbytes - got, 1 << 20)))
                return got

            fns = {
                "asyncio_tcp": tcp,
                "bare_libp2p_stream": bare,
                "request": request,
                "fetch_blob": fetch,
                "fetch_blob_dest": fetch_dest,
            }
            for fn in fns.values():  # warm-up: connection, stream protocols, window growth, page cache
                await fn()
            for repeat in range(repeats):
                for name, fn in list(fns.items())[:: 1 if repeat % 2 == 0 else -1]:
                    rows[name].append(await measure(snd, probe, host, nbytes, fn))
            if profile:
                profile_text = "".join(
                    [f"=== {name}\n" + await profile_path(host, snd, fns[name]) for name in PROFILED]
                )
            writer.close()
    finally:
        await asyncio.to_thread(snd.close)
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()

    def summary(name: str) -> dict[str, object]:
        rates = [r[0] for r in rows[name]]
        out: dict[str, object] = {"mb_s_median": round(statistics.median(rates), 1)}
        out["mb_s_all"] = [round(r, 1) for r in rates]
        for i, (key, agg, digits) in enumerate(COLUMNS.values(), start=1):
            out[key] = round(agg(r[i] for r in rows[name]), digits)
        return out

    paths = {name: summary(name) for name in rows}
    for name, path in paths.items():  # ratios within each repeat, then their median (module docstring)
        to_bare = [a[0] / b[0] for a, b in zip(rows[name], rows["bare_libp2p_stream"], strict=True)]
        to_tcp = [a[0] / b[0] for a, b in zip(rows[name], rows["asyncio_tcp"], strict=True)]
        path["ratio_to_tcp"] = round(statistics.median(to_tcp), 3)
        path["ratio_to_bare_stream"] = round(statistics.median(to_bare), 3)
        path["ratio_to_bare_stream_all"] = [round(r, 3) for r in to_bare]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "payload_mb": mb,
        "repeats": repeats,
        "paths": paths,
        "libp2p_speedups": _speedups.enabled(),
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
    """The ``n`` functions with the most own time, after a line splitting the thread's time into busy and
    idle (waiting in epoll)."""
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    idle = sum(tt for (_, _, name), (_, _, tt, _, _) in stats.stats.items() if "poll" in name)  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    table = text[text.find("   ncalls") :] if "   ncalls" in text else text
    total = stats.total_tt  # type: ignore[attr-defined]
    return f"busy {total - idle:.3f} s, idle in epoll {idle:.3f} s\n{table}"


PROFILED = ("bare_libp2p_stream", "fetch_blob")  # what --profile compares


async def profile_path(host: p2p.Host, snd: Sender, fetch) -> str:  # type: ignore[no-untyped-def]
    """cProfile one transfer in both processes' trio threads (where libp2p runs): top functions."""
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
    rows = [("path", "MB/s (median)", "runs", "vs tcp", "vs bare", *COLUMNS)]
    for name, p in paths.items():
        runs = " ".join(map(str, p["mb_s_all"]))
        ratios = (p["ratio_to_tcp"], p["ratio_to_bare_stream"])
        cells = (p["mb_s_median"], runs, *ratios, *(p[c[0]] for c in COLUMNS.values()))
        rows.append((name, *map(str, cells)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    speedups, load = result["libp2p_speedups"], result["loadavg_1m_at_end"]
    print(f"{result['payload_mb']} MiB per transfer, libp2p speedups {speedups}, loadavg {load}")
    if result["profile_top"]:
        print(result["profile_top"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="cProfile one fetch in the receiver")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument("--role", choices=["receiver", "sender"], default="receiver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sender":
        asyncio.run(sender(args.mb))
        sys.exit(0)
    result = asyncio.run(receiver(args.mb, args.repeats, args.profile))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
