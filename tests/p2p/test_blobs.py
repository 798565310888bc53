"""Bulk transfer through real libp2p hosts on 127.0.0.1 (p2p/_blobs.py over Host.request)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

import p2p
from p2p import BlobSource, Host, Identity
from p2p._transfer import MIN_CHUNK_BYTES, Manifest

pytestmark = pytest.mark.timeout(60)

CHUNK = 4 * MIN_CHUNK_BYTES  # 256 KiB: many chunks from a small blob
BLOB = random.Random(7).randbytes(24 * CHUNK + 1234)  # 25 chunks, ~6 MiB
BLOB_ID = b"snapshot/test"


@pytest.fixture
async def mesh() -> AsyncIterator[list[Host]]:
    """Fetcher hosts[0] connected to servers hosts[1..3]."""
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(Host(Identity.generate())) for _ in range(4)]
        for server in hosts[1:]:
            await hosts[0].connect(server.listen_addrs()[0])
        yield hosts


def serve(host: Host, data: bytes = BLOB, *, delay_s: float = 0.0) -> BlobSource:
    source = BlobSource.from_bytes(data, chunk_size=CHUNK)

    async def provider(blob_id: bytes) -> BlobSource | None:
        if delay_s:
            await asyncio.sleep(delay_s)
        return source if blob_id == BLOB_ID else None

    host.serve_blobs(provider)
    return source


async def test_fetch_from_three_peers_in_parallel(mesh: list[Host]) -> None:
    fetcher, *servers = mesh
    for s in servers:
        serve(s)
    digest = Manifest.build(BLOB, chunk_size=CHUNK).digest
    data = await fetcher.fetch_blob(BLOB_ID, peers=[s.peer_id for s in servers], digest=digest, timeout_s=30)
    assert data == BLOB
    served = [s.stats()["blob_chunks_served"] for s in servers]
    assert all(n >= 1 for n in served), served  # every peer did part of the work
    stats = fetcher.stats()
    assert stats["blob_chunks_fetched"] == 25 and stats["blob_bytes_fetched"] == len(BLOB)
    assert stats["blob_fetches_ok"] == 1 and stats["blob_peers_dropped"] == 0


async def test_fetch_to_file_resumes_from_a_partial_copy(mesh: list[Host], tmp_path: Path) -> None:
    fetcher, server = mesh[0], mesh[1]
    serve(server)
    dest = tmp_path / "snap.bin"
    partial = bytearray(BLOB[: 10 * CHUNK + 99])  # chunks 0..9 present, torn inside chunk 10
    partial[3 * CHUNK] ^= 0xFF  # and chunk 3 rotted
    (tmp_path / "snap.bin.part").write_bytes(partial)
    result = await fetcher.fetch_blob(BLOB_ID, peers=[server.peer_id], dest=dest, timeout_s=30)
    assert result == dest and dest.read_bytes() == BLOB
    assert not (tmp_path / "snap.bin.part").exists()
    assert server.stats()["blob_chunks_served"] == 25 - 9  # 9 good chunks were kept, not re-fetched


async def test_fetch_to_file_waits_for_the_last_writes(
    mesh: list[Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the fetch ended as soon as every chunk was *accepted*, cancelling writes still in
    flight, so the final hash sometimes read a gap (IntegrityError). Slow, shuffled writes expose it."""
    from p2p import _blobs

    store = _blobs._Sink.store
    rng = random.Random(3)

    async def slow_store(self: _blobs._Sink, index: int, data: bytes) -> None:
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        await store(self, index, data)

    monkeypatch.setattr(_blobs._Sink, "store", slow_store)
    fetcher, *servers = mesh
    for s in servers:
        serve(s)
    for attempt in range(3):
        dest = tmp_path / f"snap-{attempt}.bin"
        peers = [s.peer_id for s in servers]
        assert await fetcher.fetch_blob(BLOB_ID, peers=peers, dest=dest, timeout_s=30) == dest
        assert dest.read_bytes() == BLOB


async def test_peer_vanishing_mid_transfer_is_dropped_and_others_finish(mesh: list[Host]) -> None:
    fetcher, doomed, steady, _ = mesh
    serve(doomed, delay_s=0.05)
    serve(steady, delay_s=0.05)

    async def kill_when_busy() -> None:
        while doomed.stats()["blob_chunks_served"] < 2:
            await asyncio.sleep(0.01)
        await doomed.aclose()

    killer = asyncio.create_task(kill_when_busy())
    data = await fetcher.fetch_blob(
        BLOB_ID, peers=[doomed.peer_id, steady.peer_id], timeout_s=30, chunk_timeout_s=5
    )
    await killer
    assert data == BLOB
    stats = fetcher.stats()
    assert stats["blob_peers_dropped"] == 1 and stats["blob_chunk_failures"] >= 1


async def test_corrupting_peer_is_dropped(mesh: list[Host]) -> None:
    fetcher, liar, honest, _ = mesh
    bad = bytearray(BLOB)
    for i in range(1, 25):  # every chunk but the first is corrupt: its first batch holds a bad one
        bad[i * CHUNK + 1] ^= 1
    good_manifest = Manifest.build(BLOB, chunk_size=CHUNK)
    lying = BlobSource(good_manifest, lambda off, n: bytes(bad[off : off + n]), reads_block=False)
    liar.serve_blobs(lambda blob_id: lying)
    serve(honest, delay_s=0.02)
    data = await fetcher.fetch_blob(BLOB_ID, peers=[liar.peer_id, honest.peer_id], timeout_s=30)
    assert data == BLOB
    stats = fetcher.stats()
    assert stats["blob_corrupt_chunks"] >= 1 and stats["blob_peers_dropped"] == 1


async def test_not_found_pinned_digest_and_total_failure(mesh: list[Host]) -> None:
    fetcher, a, b, c = mesh
    serve(a)
    b.serve_blobs(lambda blob_id: None)
    with pytest.raises(p2p.BlobNotFound) as info:
        await fetcher.fetch_blob(b"nope", peers=[a.peer_id, b.peer_id, c.peer_id], timeout_s=10)
    errors = info.value.peer_errors
    assert errors[a.peer_id] == errors[b.peer_id] == "not served there"
    assert "ProtocolNotSupported" in errors[c.peer_id]  # c never called serve_blobs
    with pytest.raises(p2p.BlobNotFound) as info:  # a manifest that is not the pinned digest is refused
        await fetcher.fetch_blob(BLOB_ID, peers=[a.peer_id], digest=b"\0" * 32, timeout_s=10)
    assert "not the one pinned" in info.value.peer_errors[a.peer_id]
    await a.aclose()
    with pytest.raises(p2p.TransferFailed):
        await fetcher.fetch_blob(BLOB_ID, peers=[a.peer_id], timeout_s=10, chunk_timeout_s=2)
    assert fetcher.stats()["blob_fetches_failed"] == 3


async def test_deadline_gives_transfer_failed(mesh: list[Host]) -> None:
    fetcher, slow = mesh[0], mesh[1]
    serve(slow, delay_s=0.3)
    with pytest.raises(p2p.TransferFailed) as info:
        await fetcher.fetch_blob(BLOB_ID, peers=[slow.peer_id], timeout_s=1.0)
    assert "timed out" in str(info.value) and 0 < info.value.chunks_done < 25
