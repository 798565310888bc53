"""Where the verified chunks of one fetch go: memory, or ``<dest>.part`` on disk.

Theory of operation
-------------------
With a destination path, chunks are written at their offsets into ``<dest>.part`` with ``os.pwritev`` in a
worker thread (a chunk arrives as the pieces the transport delivered; they are written as they are, never
joined), so memory stays bounded by the chunks in flight whatever the blob's size. The part file plus
the manifest is the whole resume state: `open` re-reads the part file left by an earlier, interrupted fetch
(this process or a previous one) and keeps every chunk whose digest matches; holes (never-written ranges of
the sparse file, found with ``SEEK_DATA``) are skipped without being read. `finish` fsyncs and renames the
part file into place, so ``dest`` only ever appears complete. Each chunk's write-out to disk is started as
it is stored (`_start_writeback`), and every `DATASYNC_BYTES` written are made durable with ``fdatasync`` in
the worker thread that wrote them (`_verify_and_store_sync`), so that the final fsync finds little left to
wait for. Why both: see `_start_writeback` and `DATASYNC_BYTES`.

Without a destination the blob is assembled in an anonymous private mapping of its exact size
(`_anonymous_memory`), each chunk copied straight to its offset as it is stored, in any order; the result is
a memoryview of that mapping (bytes-like: ``len``, slicing, ``==`` with bytes, ``bytes(result)``; the
mapping goes away with the last reference). Its pages are never zeroed in the trio thread: `open` maps it and,
for a blob the caller pinned (root, digest or size: then the size is the caller's word, not the sender's),
hands ``madvise(MADV_POPULATE_WRITE)`` of the whole mapping to a worker thread (`_prefault`), which faults
the pages in without the GIL while the first chunks are still on the wire, so the per-chunk copies that hold
the GIL no longer take a page fault every 4 KiB (16,384 per 64 MiB in this VM, two thirds of a copy's
time). The faults still happen (bench_p2p's receiver fault count does not drop), only not under the GIL.

Measured 2026-12-02 on a 2-core VM shared with other work (load 1.5-3.7), bench_p2p per-repeat ratios to the
bare stream, 3 runs x 7 repeats of the old and the new sink, interleaved: ``fetch_blob`` 0.73 -> 0.78
(interquartile 0.64-0.78 -> 0.76-0.85), ``dest=`` 0.61 -> 0.68 (0.57-0.64 -> 0.65-0.74). Earlier rounds that
day, each change alone (3 runs each): the prefault 0.77 -> 0.81, `DATASYNC_BYTES` 0.63 -> 0.74 (0.70 at 16
MiB). Most of what is left over a bare stream is CPU this side cannot shed: BLAKE3 (~44 ms per 64 MiB on this
VM's CPU), the result's page faults or the page-cache copy (21-43 ms), the sender's reads (~18 ms).
Rejected, memory result: a bytearray grown at the frontier (the previous version: chunks past a gap held in a
dict until it closed, and the copy ran in the trio thread: 22 ms per 64 MiB there, 2026-12-01 profile),
joining the pieces at the end (a 64 MiB join took 15-21 ms, all of it after the last byte arrived),
``bytearray(size)`` (12 ms of memset before the first byte, then a copy into it anyway), and
``madvise(MADV_HUGEPAGE)`` on the mapping. Huge pages cut the faults per 64 MiB from 4192 to 32 and the copy
from ~20 to ~9 ms when the kernel has warm 2 MiB blocks at hand, but in this VM (most likely the hypervisor
reclaims the guest's free 2 MiB blocks) a cold one costs ~1.3 ms: with 2.5 s between fetches the median was
the same (17 vs 16 ms) and the tail four times worse (81-86 ms), and six interleaved bench runs each way
(2026-12-01) gave the receiver 332 ms of CPU per 64 MiB with the advice against 243 without.

One worker-thread hop per chunk (`verify_and_store`): the chunk is hashed and, only if it is the chunk the
manifest describes, copied or written, in the same thread call, so bytes that fail their digest never reach
the result or the part file, and the trio thread never copies chunk data. The hashes of several chunks run
in parallel (BLAKE3 releases the GIL); their stores are serialized by one lock (the frontier hasher below is
sequential). A chunk stored before (a duplicate from the endgame) is skipped. The copy itself holds the GIL
(about 1 ms per 4 MiB chunk); copying through numpy, which releases it, made no difference measurable on
2 shared cores (16 interleaved bench runs each way, 2026-12-01), so it is not worth the dependency here.

Whole-blob check (``verify_whole``, used when the fetcher pinned `Manifest.digest`): every chunk already
matched its digest, so the whole-blob digest only adds something when the caller knows it in advance and the
manifest's chunk digests might lie. It is computed along the way rather than by reading the file again at
the end: the *frontier* hasher takes chunk ``i`` as soon as chunks ``0..i`` are stored (the chunk completing
the prefix is hashed from memory, later ones already on disk are read back); chunks arrive mostly in order
(lowest index first), so at the end little or nothing is left to read.

Rejected alternatives: a side file listing the verified chunks (it can disagree with the data after a crash;
re-verifying the data is the only state that cannot lie); mmap of the part file (SIGBUS on a full disk).
Measured and rejected 2026-12-02 (2-core VM, 64 MiB): hashing and copying each piece in one pass, while it is
in cache, instead of hashing the chunk and then copying it (51 vs 52 ms, and it would copy unverified bytes);
``O_DIRECT`` writes for ``dest`` (no less CPU: 19-21 vs 21-23 ms per 64 MiB; the final flush still waited
~90 ms, since this VM's host caches the disk; it needs aligned copies; and it leaves the file out of the page
cache the daemon reads it back from); ``posix_fallocate`` of the part file (the same write and fsync times);
and `_start_writeback` dropped once `DATASYNC_BYTES` was in (dest= 0.67 of the bare stream without it, 0.77
with it, 4 interleaved runs each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from p2p._framing import Pieces
from p2p._transfer import Manifest, check_blob, chunk_digest, new_blob_hasher

__all__ = ["PART_SUFFIX", "BlobSink"]

PART_SUFFIX = ".part"
_IOV_MAX = 1024  # Linux's limit on the pieces of one pwritev
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14+ (Python 3.11's mmap module lacks the constant)

DATASYNC_BYTES = 4 * 1024 * 1024
"""File mode: a worker thread that has written this many bytes since the last ``fdatasync`` calls it (once
per chunk at the default 4 MiB chunk size). `_start_writeback` alone is not enough in this VM: its disk is a
host file behind a write-back cache, so however early the guest writes a page out, the final fsync still
waits for the host to flush every byte written since the last flush (88 ms per 64 MiB here, 2026-12-02,
even after a 1 s pause or with O_DIRECT writes; 0.2 ms when each chunk had been synced). On a real disk
this costs one write-cache flush per chunk, in a worker thread, overlapped with the network."""


class BlobSink:
    """Verified chunks of one manifest -> memory (``dest`` None) or a file at ``dest`` (trio side)."""

    def __init__(self, manifest: Manifest, dest: Path | None, *, verify_whole: bool, prefault: bool = False
                 ) -> None:
        self.manifest = manifest
        self.dest = dest
        self.part = dest.with_name(dest.name + PART_SUFFIX) if dest is not None else None
        self._memory: memoryview | None = None  # memory mode: the result, mapped by `open`
        self._pending: dict[int, Pieces] = {}  # file mode: stored past the frontier, until it hashes them
        self._fd: int | None = None
        self._stored: set[int] = set()
        self._whole = new_blob_hasher() if verify_whole else None
        self._frontier = 0  # chunks 0.._frontier-1 are in the whole-blob hash
        self._lock = threading.Lock()  # stores and `finish` run in worker threads, one at a time
        self._undurable = 0  # file mode: bytes written since the last fdatasync (`DATASYNC_BYTES`)
        self.bytes_resumed = 0
        self._populate = prefault  # memory mode: the caller pinned the blob, so its size is the caller's

    async def open(self) -> set[int]:
        """Prepare the destination; return the chunks an earlier fetch already left in the part file."""
        if self.part is None:
            self._memory = _anonymous_memory(self.manifest.size)
            if self._populate and self.manifest.size:  # not awaited: pages fault in as chunks are on the way
                trio.lowlevel.start_thread_soon(partial(_prefault, self._memory), _ignore)
            return set()
        return await trio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> set[int]:
        assert self.part is not None
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._fd = fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
        available = os.fstat(fd).st_size
        for index in range(self.manifest.chunk_count):
            offset, length = self.manifest.chunk_range(index)
            if offset + length > available or _is_hole(fd, offset, length):
                continue
            data = os.pread(fd, length, offset)
            if chunk_digest(data) == self.manifest.chunk_digests[index]:
                self._stored.add(index)
                self.bytes_resumed += length
                if self._whole is not None and index == self._frontier:
                    self._whole.update(data)
                    self._frontier += 1
        os.ftruncate(fd, self.manifest.size)
        return set(self._stored)

    async def verify_and_store(self, index: int, pieces: Pieces) -> bytes:
        """Hash chunk ``index`` and keep it if it is the manifest's, in one worker-thread call.

        Returns its `chunk_digest`: the caller's `FetchPlan` decides what it means (accepted, duplicate,
        corrupt); the sink has already kept it if, and only if, it matched. Not cancellable once started (a
        worker thread cannot be interrupted): a chunk is either stored whole or not at all.
        """
        return await trio.to_thread.run_sync(self._verify_and_store_sync, index, pieces)

    def _verify_and_store_sync(self, index: int, pieces: Pieces) -> bytes:
        digest = chunk_digest(*pieces)
        offset, length = self.manifest.chunk_range(index)
        if digest != self.manifest.chunk_digests[index] or sum(len(p) for p in pieces) != length:
            return digest
        sync_fd: int | None = None
        with self._lock:
            if index in self._stored:  # a duplicate: the same bytes are already there
                return digest
            if self._memory is not None:
                for piece in pieces:
                    self._memory[offset : offset + len(piece)] = piece
                    offset += len(piece)
            else:
                assert self._fd is not None  # internal: `open` ran
                _pwrite_all(self._fd, pieces, offset)
                _start_writeback(self._fd, offset, length)
                self._undurable += length
                if self._undurable >= DATASYNC_BYTES:
                    self._undurable, sync_fd = 0, self._fd
                if self._whole is not None and index == self._frontier:
                    self._pending[index] = pieces  # hashed from memory just below, not read back
            self._stored.add(index)
            self._advance_frontier()
        if sync_fd is not None:  # outside the lock, so the next chunk's store does not wait for the disk.
            # The descriptor is still open: `finish` and `close` run once every store call has returned (the
            # fetch's nurseries wait for them). An error (EIO, ENOSPC) fails the fetch; the part file stays.
            os.fdatasync(sync_fd)
        return digest

    def _advance_frontier(self) -> None:
        """Feed the whole-blob hash every stored chunk that now continues its prefix (under the lock)."""
        if self._whole is None:
            return
        while self._frontier in self._stored:
            offset, length = self.manifest.chunk_range(self._frontier)
            pieces = self._pending.pop(self._frontier, None)
            if self._memory is not None:
                self._whole.update(self._memory[offset : offset + length])
            elif pieces is not None:
                for piece in pieces:
                    self._whole.update(piece)
            else:  # file mode, stored earlier out of order: read it back
                assert self._fd is not None
                self._whole.update(os.pread(self._fd, length, offset))
            self._frontier += 1

    async def finish(self) -> memoryview | Path:
        """Check the whole-blob digest (if asked to); return the blob, or fsync and rename the part file.

        Raises IntegrityError if the chunks, each matching its digest, do not add up to the manifest's
        whole-blob digest (a manifest whose chunk digests lie).
        """
        return await trio.to_thread.run_sync(self._finish_sync)

    def _finish_sync(self) -> memoryview | Path:
        with self._lock:
            assert len(self._stored) == self.manifest.chunk_count  # internal: called once every chunk is in
            if self._whole is not None:
                check_blob(self.manifest, self._whole.digest())
            if self._memory is not None:
                return self._memory
            assert self.part is not None and self.dest is not None
            os.fsync(self._fd)
            self.close()
            os.replace(self.part, self.dest)
            return self.dest

    def discard(self) -> None:
        """Drop the part file (its chunks match a manifest that turned out to lie)."""
        self.close()
        if self.part is not None:
            self.part.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the part file (kept on disk for a later resume). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _anonymous_memory(size: int) -> memoryview:
    """``size`` bytes of zeroed, private, anonymous memory, faulted in as it is written or by `_prefault` (not
    memset up front, as ``bytearray(size)`` would), freed with its last view."""
    if size == 0:
        return memoryview(bytearray())  # mmap refuses an empty mapping
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


def _prefault(memory: memoryview) -> None:
    """Fault ``memory`` (an `_anonymous_memory`) in, writable, in one ``madvise(MADV_POPULATE_WRITE)``, which
    runs without the GIL (a ctypes call releases it). A worker thread, not awaited; a hint: where it fails
    (a kernel before 5.14), the pages are faulted in by the copies, as before.

    Sound while chunks are copied in at the same time: populating maps a page that is not mapped yet and
    leaves one already written as it is (tests/p2p/test_blobsink.py checks both orders). The mapping cannot
    go away under it: this call holds a view of it. It does not raise the fetch's memory: every page is
    written by the end of a fetch anyway, and an abandoned fetch frees the mapping with its last view.

    Measured 2026-12-02 (2-core VM, 64 MiB): populating takes ~21 ms, and copying 16 chunks into the
    populated pages ~10 ms, where copying them into unpopulated pages took ~31 ms: the same CPU, but 21 ms of
    it no longer holds the GIL (a 4 MiB copy ~0.65 ms instead of ~1.9 ms). ``MAP_POPULATE`` at mmap time was
    not used: it populates before `open` returns, so the first READs would wait for it.
    """
    if _madvise is None or not memory:
        return
    try:
        pages = (ctypes.c_char * len(memory)).from_buffer(memory)
        _madvise(ctypes.addressof(pages), len(memory), _MADV_POPULATE_WRITE)
        del pages  # releases the buffer export
    except Exception:  # a hint: never fail a fetch over it
        pass


def _ignore(outcome: object) -> None:
    """`trio.lowlevel.start_thread_soon`'s ``deliver`` for `_prefault` (which never raises)."""


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """True if [offset, offset+length) of a sparse file was never written (no need to read and hash it)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        # ENXIO: no data at or after offset. Anything else (no SEEK_DATA support): read it to find out.
        return exc.errno == errno.ENXIO


def _pwrite_all(fd: int, pieces: Pieces, offset: int) -> None:
    """``os.pwritev`` until every byte is written (a regular file may take fewer: ENOSPC comes next)."""
    views = [memoryview(p) for p in pieces if p]
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        if written == 0:
            raise OSError(errno.ENOSPC, "pwritev wrote nothing")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _libc(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """libc's function ``name`` (Linux: ``sync_file_range(2)``, ``madvise(2)`` with an advice the mmap module
    does not know), for calls the os module does not wrap; None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _libc("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_madvise = _libc("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a stored chunk to disk now, without waiting for it.

    Without this, every byte of the blob is still dirty in the page cache when `finish` calls fsync, and the
    fetch waits for the whole write-out after the last byte arrived: 17-21 ms per 32 MiB on the VM measured
    2026-12-01, a quarter of the transfer. Started chunk by chunk, the write-out overlaps the network and the
    final fsync found almost nothing left (0.3 ms). On the VM measured 2026-12-02 that was not enough (the
    host flushes its own cache only on fsync): `DATASYNC_BYTES` covers it. A hint only: an error here is
    ignored, the fdatasync calls and the fsync in `finish` make the file durable and report a failed write.
    Not ``posix_fadvise(DONTNEED)``, which also starts writeback on Linux but then drops the cached pages the
    caller is about to read.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
