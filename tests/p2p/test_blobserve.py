"""p2p/_blobserve.py: blob sources read from disk, and the serving bounds against a hostile fetcher."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from libp2p.custom_types import TProtocol

import p2p
from p2p import BlobLimits, BlobSource, Host, HostConfig, Identity
from p2p._blobserve import BLOB_PROTOCOL, BlobChanged
from p2p._framing import FrameDecoder, FrameKind
from p2p._node import parse_peer_id
from p2p._reqresp import read_frame, write_frame
from p2p._transfer import MAX_MANIFEST_BYTES, MIN_CHUNK_BYTES, BlobRequest, Manifest, Op

pytestmark = pytest.mark.timeout(60)

CHUNK = MIN_CHUNK_BYTES
DATA = random.Random(3).randbytes(40 * CHUNK)  # 2.5 MiB, 40 chunks


def test_file_source_reads_chunks_and_refuses_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    source = BlobSource.from_file(path, chunk_size=CHUNK)
    assert source.manifest == Manifest.build(DATA, chunk_size=CHUNK)
    assert source.read_chunk(39) == DATA[39 * CHUNK :]
    with pytest.raises(IndexError):
        source.read_chunk(40)
    assert BlobSource.from_file(path, manifest=source.manifest).read_chunk(0) == DATA[:CHUNK]
    with pytest.raises(ValueError, match="describes"):
        BlobSource.from_file(path, manifest=Manifest.build(DATA[:-1], chunk_size=CHUNK))
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(DATA[::-1])
    os.replace(replacement, path)  # a new version renamed over the served file
    with pytest.raises(BlobChanged):
        source.read_chunk(0)


def test_a_paced_source_waits_before_each_served_chunk_but_not_while_hashing(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    paced: list[int] = []
    source = BlobSource.from_file(path, chunk_size=CHUNK, pace=paced.append)
    assert paced == []  # building the manifest read every chunk, unpaced
    assert source.read_chunk(39) == DATA[39 * CHUNK :] and source.read_chunk(0) == DATA[:CHUNK]
    assert paced == [len(DATA) - 39 * CHUNK, CHUNK]


async def test_a_changed_file_is_refused_to_fetchers_not_served(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    async with Host(Identity.generate()) as fetcher, Host(Identity.generate()) as server:
        await fetcher.connect(server.listen_addrs()[0])
        await server.serve_file(b"b", path)
        with path.open("r+b") as f:  # rewritten in place: same inode, new mtime
            f.write(b"\0" * 10)
        with pytest.raises(p2p.TransferFailed) as info:
            await fetcher.fetch_blob(b"b", peers=[server.peer_id])
        assert "BlobChanged" in info.value.peer_errors[server.peer_id]
        assert server.stats()["blob_serve_errors"] == 1


async def hostile_sessions(attacker: Host, server: Host, n: int, reads: int) -> list[str]:
    """Open ``n`` sessions, ask each for ``reads`` chunks and never read the answers past the first one.

    Returns what each session got first: "manifest" or the ERROR type.
    """

    async def attack() -> list[str]:
        host, pid = attacker._node.host, parse_peer_id(server.peer_id)
        firsts = []
        for _ in range(n):
            stream = await host.new_stream(pid, [TProtocol(BLOB_PROTOCOL)])
            await write_frame(stream, FrameKind.REQUEST, BlobRequest(Op.OPEN, b"b").encode())
            decoder = FrameDecoder(
                max_message_bytes=MAX_MANIFEST_BYTES,
                expected=frozenset({FrameKind.RESPONSE, FrameKind.ERROR}),
            )
            first = await read_frame(stream, decoder)
            firsts.append(
                "manifest" if first.kind is FrameKind.RESPONSE else first.payload.split(b"\n")[0].decode()
            )
            if first.kind is FrameKind.RESPONSE:
                for index in range(reads):
                    await write_frame(stream, FrameKind.REQUEST, BlobRequest(Op.READ, index=index).encode())
        return firsts

    return await attacker._bridge.run(attack)


async def test_sessions_and_chunk_reads_are_bounded_per_peer_and_an_honest_peer_is_served() -> None:
    limits = BlobLimits(max_sessions_per_peer=2, max_reads_per_peer=2, max_reads=3, idle_timeout_s=10)
    async with (
        Host(Identity.generate(), config=HostConfig(blobs=limits)) as server,
        Host(Identity.generate()) as attacker,
        Host(Identity.generate()) as honest,
    ):
        for client in (attacker, honest):
            await client.connect(server.listen_addrs()[0])
        big = random.Random(4).randbytes(8 * 1024 * 1024)  # 4 MiB chunks: writes outgrow yamux's window
        server.serve_blob(b"b", BlobSource.from_bytes(big))
        blobs = server._node.blobs

        firsts = await hostile_sessions(attacker, server, 4, reads=2)
        assert firsts == ["manifest", "manifest", "Busy", "Busy"]
        assert server.stats()["blob_sessions_refused"] == 2

        async def held() -> tuple[int, int]:  # chunk buffers held: this peer's, and everyone's
            peer = blobs._reads_peer[attacker.peer_id]
            return limits.max_reads_per_peer - peer.value, limits.max_reads - blobs._reads_total.value

        async with asyncio.timeout(10):
            while await server._bridge.run(held) != (2, 2):  # 4 chunks asked: 2 held, 2 wait for a token
                await asyncio.sleep(0.01)
        # The attacker holds 2 of the 3 tokens in total; the honest fetch goes through on the third.
        assert await honest.fetch_blob(b"b", peers=[server.peer_id]) == big
        assert await server._bridge.run(held) == (2, 2)


def test_limits_are_validated() -> None:
    for bad in ({"max_sessions": 0}, {"max_reads_per_peer": 0}, {"fetch_depth": 0}, {"chunk_timeout_s": 0}):
        with pytest.raises(ValueError):
            BlobLimits(**bad)  # type: ignore[arg-type]
