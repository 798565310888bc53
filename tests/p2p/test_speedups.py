"""p2p/_speedups.py: each py-libp2p 0.8.1 workaround, shown against the stock behaviour first, and a stock
peer (another process with MESHTRAIN_P2P_SPEEDUPS=0) interoperating with a patched one."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import libp2p.stream_muxer.yamux.yamux as lp_yamux
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.io.utils import read_exactly
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter

import p2p
from p2p import _speedups
from p2p._node import parse_peer_id

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


@pytest.fixture
def stock() -> Iterator[None]:
    """py-libp2p exactly as shipped, for the duration of one test."""
    _speedups.uninstall()
    try:
        yield
    finally:
        _speedups.install()


def test_installed_by_default() -> None:
    assert _speedups.enabled() and lp_yamux.MAX_MESSAGE_SIZE == _speedups.YAMUX_FRAME_BYTES


# ---------------------------------------------------------------------------------------------- 1. reads


class FakeSocketStream:
    """A trio SocketStream stand-in: counts receive_some calls (each is one recv syscall in trio)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.calls += 1
        out, self.data = self.data[: max_bytes or len(self.data)], self.data[max_bytes or len(self.data) :]
        return out


def read_noise_like(tcp: TrioTCPStream, messages: int) -> tuple[bytes, int]:
    """Read ``messages`` length-prefixed messages as the Noise reader does: 2 bytes, then the body, each
    with libp2p's read_exactly (which reads again while short)."""

    async def main() -> bytes:
        out = []
        for _ in range(messages):
            (length,) = struct.unpack(">H", await read_exactly(tcp, 2))
            out.append(await read_exactly(tcp, length))
        return b"".join(out)

    data = trio.run(main)
    return data, tcp.stream.calls  # type: ignore[attr-defined]


def wire(messages: int) -> tuple[bytes, bytes]:
    bodies = [bytes([i]) * 65535 for i in range(messages)]
    return b"".join(struct.pack(">H", len(b)) + b for b in bodies), b"".join(bodies)


def test_stock_reads_cost_a_syscall_per_read_ours_one_per_256_kib(stock: None) -> None:
    raw, expected = wire(8)
    data, calls = read_noise_like(TrioTCPStream(FakeSocketStream(raw)), 8)  # type: ignore[arg-type]
    assert data == expected and calls == 16  # stock: 2 recv per 64 KiB message
    _speedups.install()
    data, calls = read_noise_like(TrioTCPStream(FakeSocketStream(raw)), 8)  # type: ignore[arg-type]
    assert data == expected and calls == 3  # 512 KiB + 16 B in 256 KiB reads


# ---------------------------------------------------------------------------------------------- 2+3. writes


class FakeConn:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(data)


class FakeNoiseState:
    """Encrypts by appending a 16-byte tag, as ChaCha20-Poly1305 grows a message."""

    def encrypt(self, data: bytes) -> bytes:
        assert isinstance(data, bytes) and len(data) <= MAX_PLAINTEXT_LENGTH
        return data + b"T" * 16


def noise_write(msg: bytes) -> list[bytes]:
    conn = FakeConn()
    writer = NoiseTransportReadWriter(conn, FakeNoiseState())  # type: ignore[arg-type]
    trio.run(writer.write_msg, msg)
    return conn.writes


def parse_noise(stream: bytes) -> list[bytes]:
    plaintexts, off = [], 0
    while off < len(stream):
        (length,) = struct.unpack_from(">H", stream, off)
        plaintexts.append(stream[off + 2 : off + 2 + length - 16])
        off += 2 + length
    return plaintexts


def test_stock_noise_writes_a_syscall_per_message_ours_one_per_frame(stock: None) -> None:
    frame = os.urandom(MIB + 12)
    stock_writes = noise_write(frame)
    assert len(stock_writes) == 17  # 16 messages of 65519 B and a tail, one socket write each
    _speedups.install()
    (ours,) = noise_write(frame)
    assert b"".join(stock_writes) == ours  # byte for byte the same Noise messages
    assert b"".join(parse_noise(ours)) == frame and max(map(len, parse_noise(ours))) == MAX_PLAINTEXT_LENGTH
    assert parse_noise(noise_write(b"")[0]) == [b""]  # an empty message stays one empty message


class FrameRecorder:
    """A yamux connection stand-in recording the frames a stream writes."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def _write_frame(self, data: bytes) -> None:
        self.frames.append(data)


def yamux_frames(payload: bytes) -> list[bytes]:
    conn = FrameRecorder()
    stream = lp_yamux.YamuxStream(1, conn, is_initiator=True)  # type: ignore[arg-type]
    stream.send_window = 16 * MIB  # as after window auto-tuning
    trio.run(stream.write, payload)
    return conn.frames


def test_stock_yamux_cuts_writes_in_64_kib_frames_ours_in_1_mib(stock: None) -> None:
    payload = os.urandom(2 * MIB)  # two 1 MiB writes' worth
    stock_frames = yamux_frames(payload)
    assert len(stock_frames) == 33 and len(stock_frames[0]) == 65536  # 65536 + 12 > one Noise message
    _speedups.install()
    frames = yamux_frames(payload)
    assert [len(f) for f in frames] == [MIB + 12, MIB + 12]
    assert b"".join(f[12:] for f in frames) == payload


# ---------------------------------------------------------------------------------------------- frame cuts


HOLD = TProtocol("/meshtrain/test-hold/1")


async def cancelled_writes_then_request(writer: p2p.Host, reader: p2p.Host) -> tuple[list[str], bool]:
    """Fill the connection while the reader's trio thread is frozen, cancel the writes, then thaw it.

    Returns the outcome of every socket write of the writer's yamux connection during the cancelled
    writes ("done", or "cut" when cancellation interrupted it) and whether a request still works after.
    """

    async def hold(stream) -> None:  # type: ignore[no-untyped-def]  # never reads
        await trio.sleep_forever()

    async def install() -> None:
        reader._node.host.set_stream_handler(HOLD, hold)

    await reader._bridge.run(install)
    echo = "/meshtrain/test-echo/1"

    async def serve(peer_id: str, data: bytes) -> bytes:
        return data

    reader.set_request_handler(echo, serve)
    await writer.connect(reader.listen_addrs()[0])
    outcomes: list[str] = []
    writing = [0]  # socket writes in progress
    frozen = threading.Event()

    async def flood() -> None:  # writer's trio thread
        host = writer._node.host
        pid = parse_peer_id(reader.peer_id)
        streams = [await host.new_stream(pid, [HOLD]) for _ in range(64)]
        conn = streams[0].muxed_conn.secured_conn
        original = conn.write

        async def recording_write(data: bytes) -> None:
            writing[0] += 1
            try:
                await original(data)
            except trio.Cancelled:
                outcomes.append("cut")
                raise
            finally:
                writing[0] -= 1
            outcomes.append("done")

        conn.write = recording_write
        reader._bridge.call_soon_in_trio(frozen.wait)  # the reader stops reading its socket
        try:
            with trio.CancelScope() as writes:
                async with trio.open_nursery() as nursery:
                    for stream in streams:  # 64 x 256 KiB of window: far more than the socket buffers
                        nursery.start_soon(stream.write, os.urandom(256 * 1024))
                    with trio.fail_after(10):  # until the socket is full, in the middle of a frame:
                        stable = 0  # a write in progress that made no progress for 20 polls
                        while stable < 20:
                            seen = len(outcomes)
                            await trio.sleep(0.01)
                            stable = stable + 1 if writing[0] and len(outcomes) == seen else 0
                    writes.cancel()
                    frozen.set()  # cancelled mid-frame, and then the reader drains the socket
        finally:
            frozen.set()
            conn.write = original

    await writer._bridge.run(flood)
    try:
        await writer.request(reader.peer_id, echo, b"still there?", timeout_s=5)
        alive = True
    except p2p.P2PError:
        alive = False
    return outcomes, alive


async def test_stock_cancellation_cuts_a_frame_ours_never_does() -> None:
    _speedups.uninstall()
    try:
        async with p2p.Host(p2p.Identity.generate()) as a, p2p.Host(p2p.Identity.generate()) as b:
            outcomes, _ = await cancelled_writes_then_request(a, b)
        assert "cut" in outcomes  # stock: the connection now carries half a frame
    finally:
        _speedups.install()
    async with p2p.Host(p2p.Identity.generate()) as a, p2p.Host(p2p.Identity.generate()) as b:
        outcomes, alive = await cancelled_writes_then_request(a, b)
    assert "cut" not in outcomes and "done" in outcomes and alive


# ---------------------------------------------------------------------------------------------- interop

STOCK_PEER = """
import asyncio, hashlib, sys
import p2p
from p2p import _speedups

async def main():
    assert not _speedups.enabled()
    async with p2p.Host(p2p.Identity.generate()) as host:
        await host.serve_file(b"from-stock", sys.argv[1])
        print(host.listen_addrs()[0], flush=True)
        peer = await host.connect(sys.stdin.readline().strip())
        data = await host.fetch_blob(b"from-patched", peers=[peer], timeout_s=30)
        print(hashlib.sha256(data).hexdigest(), flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""


async def test_a_patched_and_a_stock_peer_exchange_blobs_both_ways(tmp_path: Path) -> None:
    theirs, ours = os.urandom(6 * MIB + 5), os.urandom(5 * MIB + 7)
    (tmp_path / "theirs.bin").write_bytes(theirs)
    env = {**os.environ, _speedups.ENV_SWITCH: "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", STOCK_PEER, str(tmp_path / "theirs.bin")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with p2p.Host(p2p.Identity.generate()) as host:
            host.serve_blob(b"from-patched", p2p.BlobSource.from_bytes(ours))
            stock_addr = await asyncio.to_thread(proc.stdout.readline)
            proc.stdin.write(host.listen_addrs()[0] + "\n")
            proc.stdin.flush()
            stock_peer = stock_addr.strip().rsplit("/", 1)[1]
            await host.connect(stock_addr.strip())
            assert await host.fetch_blob(b"from-stock", peers=[stock_peer], timeout_s=30) == theirs
            assert (await asyncio.to_thread(proc.stdout.readline)).strip() == hashlib.sha256(ours).hexdigest()
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
