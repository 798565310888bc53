"""p2p/_blobsink.py without a network: resume scans, sparse holes, short pwritev, the frontier hash, the
memory result, one worker hop per chunk, nothing unverified kept."""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import mmap
import os
import random
import resource
from pathlib import Path

import pytest
import trio

from p2p import IntegrityError, _blobsink
from p2p._blobsink import BlobSink
from p2p._transfer import MIN_CHUNK_BYTES, Manifest

CHUNK = MIN_CHUNK_BYTES
DATA = random.Random(5).randbytes(6 * CHUNK + 100)  # 7 chunks
MANIFEST = Manifest.build(DATA, chunk_size=CHUNK)


def pieces(index: int, n: int = 3) -> tuple[bytes, ...]:
    """Chunk ``index`` cut in ``n`` pieces, as the transport might deliver it."""
    offset, length = MANIFEST.chunk_range(index)
    chunk = DATA[offset : offset + length]
    cuts = [0, *sorted(random.Random(index).sample(range(1, length), n - 1)), length]
    return tuple(chunk[a:b] for a, b in itertools.pairwise(cuts))


def run(sink: BlobSink, order: list[int]) -> tuple[set[int], memoryview | Path]:
    async def main() -> tuple[set[int], memoryview | Path]:
        have = await sink.open()
        for index in order:
            if index not in have:
                assert await sink.verify_and_store(index, pieces(index)) == MANIFEST.chunk_digests[index]
        return have, await sink.finish()

    return trio.run(main)


@pytest.mark.parametrize("verify_whole", [False, True])
def test_memory_sink_places_chunks_at_their_offsets_in_any_order(verify_whole: bool) -> None:
    have, data = run(BlobSink(MANIFEST, None, verify_whole=verify_whole), [3, 0, 6, 1, 2, 5, 4])
    assert have == set() and data == DATA and isinstance(data, memoryview) and not data.readonly
    assert bytes(data[CHUNK : CHUNK + 10]) == DATA[CHUNK : CHUNK + 10]


def test_empty_blob_in_memory() -> None:
    empty = Manifest.build(b"", chunk_size=CHUNK)
    assert run(BlobSink(empty, None, verify_whole=True), []) == (set(), b"")


def test_memory_result_is_prefaulted_in_a_worker_thread_not_in_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """`open` maps the result lazily (opening a 64 MiB sink faults in almost nothing on its thread, where
    ``bytearray(size)`` would memset all of it before the first byte arrived) and hands the prefault to a
    worker thread it does not wait for."""
    started: list[object] = []
    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", lambda fn, deliver: started.append(fn))
    big = Manifest(64 << 20, 4 << 20, bytes(32), (bytes(32),) * 16)
    sink = BlobSink(big, None, verify_whole=False, prefault=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    trio.run(sink.open)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 256  # a touched 64 MiB is >= 1024 faults even at 64 KiB pages
    [prefault] = started
    assert isinstance(prefault, functools.partial) and prefault.func is _blobsink._prefault
    assert prefault.args[0] is sink._memory
    trio.run(BlobSink(big, None, verify_whole=False).open)  # an unpinned blob: the sender's word on size
    assert len(started) == 1  # its pages are committed only as verified chunks land


def _populate_supported() -> bool:
    probe = _blobsink._anonymous_memory(mmap.PAGESIZE)
    pages = (ctypes.c_char * len(probe)).from_buffer(probe)
    assert _blobsink._madvise is not None  # Linux: libc's madvise was found
    ok = _blobsink._madvise(ctypes.addressof(pages), len(probe), _blobsink._MADV_POPULATE_WRITE) == 0
    del pages
    return ok


@pytest.mark.skipif(not _populate_supported(), reason="MADV_POPULATE_WRITE needs Linux 5.14+")
def test_prefault_maps_every_page_and_keeps_bytes_already_written() -> None:
    """Prefaulting may run while chunks are copied in: bytes written before it stay, copies after it take no
    page faults, and the result is exactly the bytes written."""
    size = 16 << 20
    memory = _blobsink._anonymous_memory(size)
    early = random.Random(1).randbytes(1 << 20)
    memory[5 << 20 : 6 << 20] = early  # a chunk that landed before the worker thread got to it
    _blobsink._prefault(memory)
    late = random.Random(2).randbytes(size)
    view = memoryview(late)  # slices of bytes would be copies, with page faults of their own
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    memory[: 5 << 20] = view[: 5 << 20]
    memory[6 << 20 :] = view[6 << 20 :]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 64  # 15 MiB unpopulated: >= 3840
    assert memory == late[: 5 << 20] + early + late[6 << 20 :]
    _blobsink._prefault(memory)  # again, over written pages: nothing changes
    assert memory[5 << 20 : 6 << 20] == early and memory[: 5 << 20] == late[: 5 << 20]


def test_prefault_racing_the_stores_yields_the_exact_bytes() -> None:
    """The real worker thread, started by `open`, races 128 chunk stores of an 8 MiB blob."""
    data = random.Random(3).randbytes(8 << 20)
    manifest = Manifest.build(data, chunk_size=CHUNK)

    async def main() -> memoryview | Path:
        sink = BlobSink(manifest, None, verify_whole=True, prefault=True)
        await sink.open()
        for index in range(manifest.chunk_count):
            offset, length = manifest.chunk_range(index)
            await sink.verify_and_store(index, (data[offset : offset + length],))
        return await sink.finish()

    assert trio.run(main) == data


def test_prefault_failing_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hint: an old kernel (EINVAL), no libc madvise, or an empty result leave the copies to fault."""
    memory = _blobsink._anonymous_memory(1 << 20)
    monkeypatch.setattr(_blobsink, "_MADV_POPULATE_WRITE", 0x7FFF)  # unknown advice: EINVAL
    _blobsink._prefault(memory)
    monkeypatch.setattr(_blobsink, "_madvise", None)
    _blobsink._prefault(memory)
    _blobsink._prefault(_blobsink._anonymous_memory(0))
    assert memory == bytes(1 << 20)


def test_a_chunk_that_fails_its_digest_is_not_kept(tmp_path: Path) -> None:
    """The sink checks before it copies or writes: unverified bytes never reach the result or the disk."""

    async def main(sink: BlobSink) -> None:
        await sink.open()
        bad = (b"\xff" * 10, *pieces(2)[1:])
        assert await sink.verify_and_store(2, bad) != MANIFEST.chunk_digests[2]
        assert await sink.verify_and_store(2, pieces(2)[:-1]) != MANIFEST.chunk_digests[2]  # short
        for index in range(7):
            await sink.verify_and_store(index, pieces(index))
        assert await sink.finish() in (DATA, tmp_path / "blob.bin")

    trio.run(main, BlobSink(MANIFEST, None, verify_whole=True))
    part = tmp_path / "blob.bin.part"

    async def only_bad(sink: BlobSink) -> None:
        await sink.open()
        await sink.verify_and_store(2, (b"\xff" * 10, *pieces(2)[1:]))
        sink.close()

    trio.run(only_bad, BlobSink(MANIFEST, tmp_path / "blob.bin", verify_whole=False))
    assert part.read_bytes() == bytes(MANIFEST.size)  # the sparse part file holds no byte of it
    trio.run(main, BlobSink(MANIFEST, tmp_path / "blob.bin", verify_whole=True))
    assert (tmp_path / "blob.bin").read_bytes() == DATA


@pytest.mark.parametrize("to_file", [False, True])
def test_one_worker_hop_per_chunk_and_duplicates_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to_file: bool
) -> None:
    """Hash and store share one ``trio.to_thread.run_sync`` call; an endgame duplicate is not stored again
    (nor held for the frontier hash)."""
    hops: list[str] = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    writes: list[int] = []
    real_pwrite = _blobsink._pwrite_all

    def spy(fd: int, chunk: tuple[bytes, ...], offset: int) -> None:
        writes.append(offset)
        real_pwrite(fd, chunk, offset)

    monkeypatch.setattr(_blobsink, "_pwrite_all", spy)
    sink = BlobSink(MANIFEST, tmp_path / "blob.bin" if to_file else None, verify_whole=True)
    _, result = run(sink, [1, 1, 0, 2, 3, 2, 4, 5, 6])
    assert result == (tmp_path / "blob.bin" if to_file else DATA)
    assert hops.count("_verify_and_store_sync") == 9 and not sink._pending
    assert writes == ([CHUNK * i for i in (1, 0, 2, 3, 4, 5, 6)] if to_file else [])


def test_file_sink_starts_each_chunks_writeback_as_it_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So the final fsync does not wait for the whole blob's write-out after the last byte arrived."""
    real = _blobsink._sync_file_range
    assert real is not None  # Linux: libc's sync_file_range was found
    calls: list[tuple[int, int]] = []

    def spy(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(_blobsink, "_sync_file_range", spy)
    order = [4, 0, 6, 1, 2, 5, 3]
    dest = tmp_path / "blob.bin"
    assert run(BlobSink(MANIFEST, dest, verify_whole=False), order)[1] == dest
    assert calls == [MANIFEST.chunk_range(i) for i in order] and dest.read_bytes() == DATA


def test_writeback_hint_failing_is_not_an_error(tmp_path: Path) -> None:
    """A hint only: on a descriptor it cannot flush, nothing is raised (fsync reports real failures)."""
    fd = os.open(tmp_path / "x", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        _blobsink._start_writeback(fd, 0, 1 << 20)
    finally:
        os.close(fd)


def test_file_sink_makes_every_datasync_bytes_durable_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fdatasync per `DATASYNC_BYTES` written, in the storing worker thread, so the final fsync does not
    wait for the whole blob to reach the disk; a failing one fails the store (and so the fetch)."""
    monkeypatch.setattr(_blobsink, "DATASYNC_BYTES", 2 * CHUNK)
    real = os.fdatasync
    synced: list[int] = []

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    dest = tmp_path / "blob.bin"
    assert run(BlobSink(MANIFEST, dest, verify_whole=False), [4, 0, 6, 1, 2, 5, 3])[1] == dest
    assert len(synced) == 3 and dest.read_bytes() == DATA  # after chunks 4+0, 6+1+2, 5+3 (6 is 100 B)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)

    async def main(sink: BlobSink) -> None:
        await sink.open()
        await sink.verify_and_store(0, pieces(0))
        with pytest.raises(OSError, match="I/O error"):
            await sink.verify_and_store(1, pieces(1))
        sink.close()

    trio.run(main, BlobSink(MANIFEST, tmp_path / "other.bin", verify_whole=False))


@pytest.mark.parametrize("verify_whole", [False, True])
def test_file_sink_writes_in_any_order_and_renames(tmp_path: Path, verify_whole: bool) -> None:
    dest = tmp_path / "d" / "blob.bin"
    assert run(BlobSink(MANIFEST, dest, verify_whole=verify_whole), [6, 5, 0, 4, 1, 3, 2])[1] == dest
    assert dest.read_bytes() == DATA and not (tmp_path / "d" / "blob.bin.part").exists()


def test_resume_keeps_good_chunks_skips_holes_and_rewrites_rot(tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    part = bytearray(DATA)
    part[CHUNK + 5] ^= 1  # chunk 1 rotted on disk
    with (tmp_path / "blob.bin.part").open("wb") as f:
        f.write(part[: 2 * CHUNK])  # chunks 0, 1 written
        f.seek(4 * CHUNK)
        f.write(part[4 * CHUNK : 5 * CHUNK])  # chunk 4 written; 2, 3 are holes; file ends inside chunk 5
        f.write(part[5 * CHUNK : 5 * CHUNK + 10])
    sink = BlobSink(MANIFEST, dest, verify_whole=True)
    have, result = run(sink, list(range(7)))
    assert have == {0, 4} and sink.bytes_resumed == 2 * CHUNK
    assert result == dest and dest.read_bytes() == DATA  # the frontier hash read chunk 4 back from disk


def test_a_lying_manifest_fails_the_whole_digest(tmp_path: Path) -> None:
    lying = Manifest(MANIFEST.size, CHUNK, b"\0" * 32, MANIFEST.chunk_digests)
    sink = BlobSink(lying, tmp_path / "blob.bin", verify_whole=True)
    with pytest.raises(IntegrityError):
        run(sink, list(range(7)))
    assert (tmp_path / "blob.bin.part").exists()
    sink.discard()
    assert not (tmp_path / "blob.bin.part").exists() and not (tmp_path / "blob.bin").exists()


def test_short_pwritev_is_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    calls = []

    def at_most_1000_bytes(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(len(buffers))
        budget, out = 1000, []
        for b in buffers:
            out.append(b[:budget])
            budget -= len(out[-1])
        return real(fd, [b for b in out if len(b)], offset)

    monkeypatch.setattr(os, "pwritev", at_most_1000_bytes)
    dest = tmp_path / "blob.bin"
    run(BlobSink(MANIFEST, dest, verify_whole=False), list(range(7)))
    assert dest.read_bytes() == DATA and len(calls) >= len(DATA) // 1000


def test_pwritev_writing_nothing_is_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(OSError, match="wrote nothing"):
        run(BlobSink(MANIFEST, tmp_path / "blob.bin", verify_whole=False), [0])
