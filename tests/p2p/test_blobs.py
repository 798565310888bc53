"""Blob fetching through real libp2p hosts on 127.0.0.1 (p2p/_blobs.py over p2p/_blobserve.py sessions)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from libp2p.custom_types import TProtocol

import p2p
from p2p import BlobLimits, BlobSource, Host, HostConfig, Identity, Manifest
from p2p._blobserve import BLOB_PROTOCOL
from p2p._framing import FrameKind
from p2p._reqresp import write_frame
from p2p._transfer import MIN_CHUNK_BYTES

pytestmark = pytest.mark.timeout(60)

CHUNK = 4 * MIN_CHUNK_BYTES  # 256 KiB: many chunks from a small blob
BLOB = random.Random(7).randbytes(24 * CHUNK + 1234)  # 25 chunks, ~6 MiB
BLOB_ID = b"snapshot/test"
MANIFEST = Manifest.build(BLOB, chunk_size=CHUNK)


def fast_limits(**overrides: float) -> HostConfig:
    return HostConfig(blobs=BlobLimits(**{"chunk_timeout_s": 5.0, **overrides}))  # type: ignore[arg-type]


@pytest.fixture
async def mesh() -> AsyncIterator[list[Host]]:
    """Fetcher hosts[0] connected to servers hosts[1..3]."""
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(Host(Identity.generate(), config=fast_limits())) for _ in range(4)
        ]
        for server in hosts[1:]:
            await hosts[0].connect(server.listen_addrs()[0])
        yield hosts


class Throttle:
    """Chunk reads that wait for the test's go-ahead (they run in the server's worker threads)."""

    def __init__(self) -> None:
        self.allowed = threading.Semaphore(0)
        self.open = False
        self.reads = 0

    def allow(self, n: int) -> None:
        for _ in range(n):
            self.allowed.release()

    def release_all(self) -> None:
        self.open = True
        self.allow(1000)

    def source(
        self, data: bytes = BLOB, *, corrupt: Callable[[int, bytes], bytes] | None = None
    ) -> BlobSource:
        def read(offset: int, length: int) -> bytes:
            if not self.open:
                self.allowed.acquire()
            self.reads += 1
            chunk = data[offset : offset + length]
            return corrupt(offset, chunk) if corrupt else chunk

        return BlobSource(Manifest.build(data, chunk_size=CHUNK), read)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def served(host: Host) -> int:
    return host.stats()["blob_chunks_served"]


# ---------------------------------------------------------------------------------------------- happy path


async def test_fetch_from_three_peers_in_parallel_from_files(mesh: list[Host], tmp_path: Path) -> None:
    fetcher, *servers = mesh
    path = tmp_path / "blob.bin"
    path.write_bytes(BLOB)
    assert await servers[0].serve_file(b"hashed-here", path) == Manifest.build(BLOB)  # default chunking
    for server in servers:  # a manifest stored beside the file spares the hashing
        assert await server.serve_file(BLOB_ID, path, manifest=MANIFEST) == MANIFEST
    data = await fetcher.fetch_blob(BLOB_ID, peers=[s.peer_id for s in servers], root=MANIFEST.root)
    assert data == BLOB
    assert all(served(s) >= 1 for s in servers)  # every peer did part of the work
    assert sum(served(s) for s in servers) >= 25
    stats = fetcher.stats()
    assert stats["blob_chunks_fetched"] == 25 and stats["blob_bytes_fetched"] == len(BLOB)
    assert stats["blob_fetches_ok"] == 1 and stats["blob_peers_dropped"] == 0
    assert fetcher.blob_fetches() == []  # nothing in progress any more


async def test_fetch_to_dest_with_the_whole_digest_pinned(mesh: list[Host], tmp_path: Path) -> None:
    fetcher, server = mesh[0], mesh[1]
    server.serve_blob(BLOB_ID, BlobSource.from_bytes(BLOB, chunk_size=CHUNK))
    dest = tmp_path / "sub" / "snap.bin"
    progress = p2p.BlobProgress()
    result = await fetcher.fetch_blob(
        BLOB_ID, peers=[server.peer_id], digest=MANIFEST.digest, size=len(BLOB), dest=dest, progress=progress
    )
    assert result == dest and dest.read_bytes() == BLOB and not (dest.parent / "snap.bin.part").exists()
    snapshot = progress.as_dict()
    assert snapshot["state"] == "done" and snapshot["bytes_done"] == snapshot["bytes_total"] == len(BLOB)
    assert snapshot["chunks_done"] == 25 and snapshot["rate_bytes_per_s"] > 0 and snapshot["dropped"] == {}


# ---------------------------------------------------------------------------------------------- resume


KILLED_FETCHER = """
import asyncio, sys
import p2p

async def main():
    async with p2p.Host(p2p.Identity.generate()) as host:
        peer = await host.connect(sys.argv[1])
        await host.fetch_blob(sys.argv[2].encode(), peers=[peer], dest=sys.argv[3])

asyncio.run(main())
"""


async def test_a_killed_fetch_resumes_from_its_part_file_fetching_only_missing_chunks(
    mesh: list[Host], tmp_path: Path
) -> None:
    """SIGKILL a fetching process midway; a new host fetching to the same dest asks only for the rest."""
    fetcher, server = mesh[0], mesh[1]
    throttle = Throttle()
    server.serve_blob(BLOB_ID, throttle.source())
    dest = tmp_path / "snap.bin"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_FETCHER, server.listen_addrs()[0], BLOB_ID.decode(), str(dest)]
    )
    part = dest.with_name("snap.bin.part")

    def first_chunk_on_disk() -> bool:
        with part.open("rb") as f:
            return f.read(CHUNK) == BLOB[:CHUNK]

    try:
        throttle.allow(10)
        await wait_for(lambda: served(server) == 10)  # ten chunks went out to the child
        await wait_for(lambda: part.exists() and first_chunk_on_disk())  # at least one is on its disk
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait, 10)
    finally:
        throttle.release_all()
        if child.poll() is None:
            child.kill()
    progress = p2p.BlobProgress()
    result = await fetcher.fetch_blob(BLOB_ID, peers=[server.peer_id], dest=dest, progress=progress)
    assert result == dest and dest.read_bytes() == BLOB
    resumed = progress.bytes_resumed // CHUNK
    assert 1 <= resumed <= 10  # what the killed process had verified and written survived the kill
    assert fetcher.stats()["blob_chunks_fetched"] == 25 - resumed  # only the missing chunks moved again
    # The dead child's session may still write out chunks it had asked for (at most fetch_depth) before the
    # server sees its connection gone: a write into the kernel's socket buffer succeeds.
    extra = served(server) - (10 + 25 - resumed)
    assert 0 <= extra <= BlobLimits().fetch_depth


async def test_a_cancelled_fetch_keeps_its_part_file_and_the_next_one_resumes(
    mesh: list[Host], tmp_path: Path
) -> None:
    fetcher, server = mesh[0], mesh[1]
    throttle = Throttle()
    server.serve_blob(BLOB_ID, throttle.source())
    dest = tmp_path / "snap.bin"
    progress = p2p.BlobProgress()
    task = asyncio.create_task(
        fetcher.fetch_blob(BLOB_ID, peers=[server.peer_id], dest=dest, progress=progress)
    )
    try:
        throttle.allow(7)
        await wait_for(lambda: progress.chunks_done == 7)
        assert fetcher.blob_fetches()[0]["sources"] == [server.peer_id]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        throttle.release_all()
    assert dest.with_name("snap.bin.part").exists() and not dest.exists()
    second = p2p.BlobProgress()
    assert await fetcher.fetch_blob(BLOB_ID, peers=[server.peer_id], dest=dest, progress=second) == dest
    assert second.bytes_resumed == 7 * CHUNK and fetcher.stats()["blob_chunks_fetched"] == 25
    assert dest.read_bytes() == BLOB


# ---------------------------------------------------------------------------------------------- bad peers


async def test_a_stalled_peer_is_dropped_while_the_others_finish(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        config = fast_limits(chunk_timeout_s=1.0)
        fetcher, stuck, steady = [
            await stack.enter_async_context(Host(Identity.generate(), config=config)) for _ in range(3)
        ]
        for server in (stuck, steady):
            await fetcher.connect(server.listen_addrs()[0])
        never, paced = Throttle(), Throttle()  # every read at "stuck" hangs; "steady" gives one per 50 ms
        stuck.serve_blob(BLOB_ID, never.source())
        steady.serve_blob(BLOB_ID, paced.source())

        async def pace() -> None:  # 25 chunks over ~1.3 s: still going when "stuck" misses its 1 s
            while not paced.open:
                paced.allow(1)
                await asyncio.sleep(0.05)

        pacer = asyncio.create_task(pace())
        progress = p2p.BlobProgress()
        try:
            data = await fetcher.fetch_blob(BLOB_ID, peers=[stuck.peer_id, steady.peer_id], progress=progress)
        finally:
            never.release_all()
            paced.release_all()
            await pacer
        assert data == BLOB
        assert progress.dropped[stuck.peer_id].startswith("stalled: no answer within 1.0 s")
        assert fetcher.stats()["blob_peers_dropped"] == 1


async def test_a_peer_sending_a_corrupt_chunk_is_dropped(mesh: list[Host]) -> None:
    fetcher, liar, honest, _ = mesh

    def flip(offset: int, chunk: bytes) -> bytes:
        return chunk if offset == 0 else bytes([chunk[0] ^ 1]) + chunk[1:]  # every chunk but the first

    throttle = Throttle()
    throttle.release_all()
    liar.serve_blob(BLOB_ID, throttle.source(corrupt=flip))
    honest.serve_blob(BLOB_ID, BlobSource.from_bytes(BLOB, chunk_size=CHUNK))
    progress = p2p.BlobProgress()
    data = await fetcher.fetch_blob(BLOB_ID, peers=[liar.peer_id, honest.peer_id], progress=progress)
    assert data == BLOB
    assert "failed verification" in progress.dropped[liar.peer_id]
    stats = fetcher.stats()
    assert stats["blob_corrupt_chunks"] >= 1 and stats["blob_peers_dropped"] == 1


async def test_peers_with_a_wrong_or_malformed_manifest_are_dropped(mesh: list[Host]) -> None:
    fetcher, impostor, garbler, honest = mesh
    impostor.serve_blob(BLOB_ID, BlobSource.from_bytes(BLOB[:-1], chunk_size=CHUNK))  # another blob, same id

    async def garbled(stream) -> None:  # type: ignore[no-untyped-def]  # answers OPEN with junk
        await stream.read(100)
        await write_frame(stream, FrameKind.RESPONSE, b"\x02not a manifest")
        await stream.close()

    async def install() -> None:
        garbler._node.host.set_stream_handler(TProtocol(BLOB_PROTOCOL), garbled)

    await garbler._bridge.run(install)
    honest.serve_blob(BLOB_ID, BlobSource.from_bytes(BLOB, chunk_size=CHUNK))
    progress = p2p.BlobProgress()
    peers = [impostor.peer_id, garbler.peer_id, honest.peer_id]
    assert await fetcher.fetch_blob(BLOB_ID, peers=peers, root=MANIFEST.root, progress=progress) == BLOB
    assert "not the one pinned" in progress.dropped[impostor.peer_id]
    assert "ProtocolViolation" in progress.dropped[garbler.peer_id]
    assert honest.peer_id not in progress.dropped


async def test_a_manifest_whose_chunks_lie_fails_the_pinned_digest_and_is_discarded(
    mesh: list[Host], tmp_path: Path
) -> None:
    fetcher, liar = mesh[0], mesh[1]
    other = bytearray(BLOB)
    other[5] ^= 1
    chunks = Manifest.build(bytes(other), chunk_size=CHUNK).chunk_digests  # self-consistent, but not BLOB
    lying = Manifest(MANIFEST.size, CHUNK, MANIFEST.digest, chunks)
    liar.serve_blob(BLOB_ID, BlobSource(lying, lambda off, n: bytes(other[off : off + n])))
    dest = tmp_path / "snap.bin"
    with pytest.raises(p2p.IntegrityError, match="discarded"):
        await fetcher.fetch_blob(BLOB_ID, peers=[liar.peer_id], digest=MANIFEST.digest, dest=dest)
    assert not dest.exists() and not dest.with_name("snap.bin.part").exists()


async def test_not_found_refusals_and_total_failure(mesh: list[Host]) -> None:
    fetcher, a, b, _ = mesh
    a.serve_blob(BLOB_ID, BlobSource.from_bytes(BLOB, chunk_size=CHUNK))
    with pytest.raises(p2p.BlobNotFound) as info:
        await fetcher.fetch_blob(b"nope", peers=[a.peer_id, b.peer_id])
    assert info.value.peer_errors == {a.peer_id: "not served there", b.peer_id: "not served there"}
    with pytest.raises(p2p.BlobNotFound) as info:  # a manifest that is not the pinned digest is refused
        await fetcher.fetch_blob(BLOB_ID, peers=[a.peer_id], digest=b"\0" * 32)
    assert "not the one pinned" in info.value.peer_errors[a.peer_id]
    with pytest.raises(p2p.BlobNotFound):
        await fetcher.fetch_blob(BLOB_ID, peers=[])
    stranger = Identity.generate().peer_id
    with pytest.raises(p2p.BlobNotFound) as info:
        await fetcher.fetch_blob(BLOB_ID, peers=[stranger])
    assert "PeerUnreachable" in info.value.peer_errors[stranger]
    assert fetcher.stats()["blob_fetches_failed"] == 4


async def test_a_peer_vanishing_midway_is_dropped_and_the_fetch_fails_when_none_is_left(
    mesh: list[Host],
) -> None:
    fetcher, doomed = mesh[0], mesh[1]
    throttle = Throttle()
    doomed.serve_blob(BLOB_ID, throttle.source())
    task = asyncio.create_task(fetcher.fetch_blob(BLOB_ID, peers=[doomed.peer_id]))
    throttle.allow(3)
    await wait_for(lambda: served(doomed) == 3)
    throttle.release_all()
    await doomed.aclose()
    with pytest.raises(p2p.TransferFailed) as info:
        await task
    assert not isinstance(info.value, p2p.BlobNotFound) and info.value.chunks_total == 25
    assert doomed.peer_id in info.value.peer_errors


async def test_the_deadline_gives_transfer_failed(mesh: list[Host]) -> None:
    fetcher, slow = mesh[0], mesh[1]
    throttle = Throttle()
    slow.serve_blob(BLOB_ID, throttle.source())
    throttle.allow(4)
    try:
        with pytest.raises(p2p.TransferFailed, match="timed out") as info:
            await fetcher.fetch_blob(BLOB_ID, peers=[slow.peer_id], timeout_s=1.0)
    finally:
        throttle.release_all()
    assert info.value.chunks_done == 4


# ---------------------------------------------------------------------------------------------- size bounds


class FullDisk:
    total, used, free = 10**12, 10**12 - 1000, 1000


async def test_size_bounds_memory_disk_and_caller(
    mesh: list[Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetcher, server = mesh[0], mesh[1]
    server.serve_blob(BLOB_ID, BlobSource.from_bytes(BLOB, chunk_size=CHUNK))
    with pytest.raises(p2p.BlobNotFound, match="limit of this fetch"):
        await fetcher.fetch_blob(
            BLOB_ID, peers=[server.peer_id], max_bytes=len(BLOB) - 1, dest=tmp_path / "x"
        )
    with pytest.raises(p2p.BlobNotFound, match="expected"):
        await fetcher.fetch_blob(BLOB_ID, peers=[server.peer_id], size=len(BLOB) + 1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: FullDisk())
    with pytest.raises(p2p.BlobNotFound, match="does not fit on disk"):
        await fetcher.fetch_blob(BLOB_ID, peers=[server.peer_id], dest=tmp_path / "y")
    async with Host(Identity.generate(), config=fast_limits(max_memory_bytes=len(BLOB) - 1)) as small:
        await small.connect(server.listen_addrs()[0])
        with pytest.raises(p2p.BlobNotFound, match="limit of this fetch"):
            await small.fetch_blob(BLOB_ID, peers=[server.peer_id])


# ---------------------------------------------------------------------------------------------- big blobs


async def test_a_blob_above_the_old_256_mib_frame_cap_moves_with_bounded_memory(tmp_path: Path) -> None:
    size = 300 * 1024 * 1024 + 17
    source, dest = tmp_path / "genesis.bin", tmp_path / "copy.bin"
    expected = hashlib.sha256()
    with source.open("wb") as f:  # written in 4 MiB pieces: this test never holds the blob in memory
        rng = random.Random(11)
        for off in range(0, size, 4 * 1024 * 1024):
            piece = rng.randbytes(min(4 * 1024 * 1024, size - off))
            expected.update(piece)
            f.write(piece)
    tracemalloc.start()  # Python allocations of every thread: the bytes objects chunks live in
    try:
        async with Host(Identity.generate()) as fetcher, Host(Identity.generate()) as server:
            await fetcher.connect(server.listen_addrs()[0])
            manifest = await server.serve_file(b"genesis/big", source)
            assert manifest.size == size and manifest.chunk_count == 76
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            fetched = await fetcher.fetch_blob(
                b"genesis/big", peers=[server.peer_id], root=manifest.root, dest=dest
            )
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fetched == dest
    got = hashlib.sha256()
    with dest.open("rb") as f:
        while piece := f.read(4 * 1024 * 1024):
            got.update(piece)
    assert got.digest() == expected.digest()
    # Both ends in this process: the fetcher's chunks in flight (3 x 4 MiB), the server's (2 x 4 MiB), yamux
    # buffers and libp2p's copies of the frames in transit. The blob itself would be 300 MiB.
    assert peak - before < 64 * 1024 * 1024, f"{(peak - before) / 2**20:.0f} MiB"
