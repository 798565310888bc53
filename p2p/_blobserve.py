"""Serving blobs: a registry of blob id -> source (a file on disk, or bytes) and `/meshtrain/blob/2` sessions.

Theory of operation
-------------------
A `BlobSource` is a manifest plus a way to read one chunk. `BlobSource.from_file` hashes the file once (in
a worker thread: 4 GiB is ~5 s of blake2b) and then reads each requested chunk with ``os.pread`` in a worker
thread, on a file descriptor opened per chunk: the file is never held in memory, and a file replaced under
the same path (a new inode, size or mtime) is refused (ERROR ``BlobChanged``) instead of served as bytes the
manifest does not describe. Serve every version of a file under its own blob id.

A session (wire format in `p2p/_transfer.py`) is one stream: OPEN answered with the manifest, then READs
answered in order. Two tasks run per session: a reader that takes the next READ off the stream and reads its
chunk from disk, and a writer that writes chunks back; so the next chunk is read from disk while the current
one goes out, and the fetcher's pipelined READs keep the stream busy.

What one remote peer can make us hold, and the bound on each (`BlobLimits`):

* sessions: ``max_sessions_per_peer`` and ``max_sessions`` in total; one more is refused with ERROR ``Busy``
  before anything is read. Each session is admitted by the PeerGate first (membership, bans, request rate).
* chunk buffers: a chunk holds a read token from its disk read until it is written; tokens are bounded per
  peer (``max_reads_per_peer``) and in total (``max_reads``), so serving holds at most
  ``max_reads x chunk_size`` bytes of chunks (64 MiB at the defaults) however many sessions are open.
* time: a session with no request for ``idle_timeout_s`` is closed, and a chunk the fetcher does not take
  within ``write_timeout_s`` ends the session.

Rejected alternatives: serving through `Host.request` handlers (one stream and one bridge round trip per
chunk, and the handler would run on the daemon's event loop); mmap (a file truncated under us is SIGBUS in
the whole process, a pread is an error in one session); keeping one descriptor per served file (a replaced
file would be served from the old inode until someone closes it, and closing races the readers).

Sender cost, measured 2026-12-02 (bench/bench_p2p.py, 2-core VM, 64 MiB): serving a blob costs 35-60 ms of
CPU more than writing the same bytes to a bare stream (about 280 ms there); the sender's trio thread is no
busier, the difference is in the worker threads. The chunk reads are ~18 ms of it (page cache -> a new
bytes object, ``os.pread``; ``os.preadv`` into reused buffers measured the same, 17-19 ms), the only way
around which is mmap, rejected above. Nothing changed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream

from p2p._errors import P2PError, PeerUnreachable, ProtocolViolation
from p2p._framing import FrameDecoder, FrameKind, encode_error_payload
from p2p._reqresp import InFlight, finish_stream, read_frame, write_frame
from p2p._security import PeerGate
from p2p._transfer import MAX_BLOB_REQUEST_BYTES, BlobRequest, Manifest, Op

__all__ = ["BLOB_PROTOCOL", "BlobLimits", "BlobServer", "BlobSource"]

log = logging.getLogger(__name__)

BLOB_PROTOCOL = "/meshtrain/blob/2"


class BlobChanged(OSError):
    """The file behind a served blob was replaced or changed size since its manifest was built."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobLimits:
    """Bounds of blob serving and fetching (`HostConfig.blobs`)."""

    max_sessions_per_peer: int = 4
    """Sessions one peer may hold open: a fetch uses one per serving peer, so 4 covers a genesis and a
    snapshot fetched at once with room to spare."""
    max_sessions: int = 64
    """Sessions in total. A session holds a stream and a small decoder; its chunks count against max_reads."""
    max_reads_per_peer: int = 3
    """Chunks of one peer held at once (read from disk, not yet written): one going out, two read ahead
    (a disk read and its thread hand-off must not make the stream wait)."""
    max_reads: int = 16
    """Chunks held at once in total: 16 x 4 MiB = 64 MiB at the default chunk size."""
    idle_timeout_s: float = 60.0
    """A session closes when no request arrives for this long (a fetcher keeps READs outstanding)."""
    write_timeout_s: float = 60.0
    """A chunk not taken by the fetcher within this long ends the session (4 MiB at ~70 KB/s)."""
    chunk_timeout_s: float = 30.0
    """Fetching: a peer that does not open its session, answer OPEN, or deliver the chunk we wait for within
    this long is dropped as stalled (4 MiB in 30 s is 140 KB/s, a poor link; a dead one never answers)."""
    fetch_depth: int = 4
    """Fetching: chunks asked of one peer and not yet stored: enough that the server always has the next
    ones queued while we verify and store. Memory: peers x depth x chunk size (16 MiB per peer)."""
    max_memory_bytes: int = 512 * 1024 * 1024
    """Fetching without ``dest``: the largest blob assembled in memory (bigger ones need a file)."""

    def __post_init__(self) -> None:
        counts = (self.max_sessions_per_peer, self.max_sessions, self.max_reads_per_peer, self.max_reads)
        if min(*counts, self.fetch_depth, self.max_memory_bytes) < 1:
            raise ValueError("blob session, read, depth and memory bounds must be >= 1")
        if min(self.idle_timeout_s, self.write_timeout_s, self.chunk_timeout_s) <= 0:
            raise ValueError("blob timeouts must be positive")


class BlobSource:
    """What a server hands out for one blob id: its manifest and a way to read one chunk.

    Build one with `from_bytes` or `from_file`; both hash the blob once, up front (call `from_file` in a
    worker thread: `Host.serve_file` does).
    """

    __slots__ = ("_read", "manifest")

    def __init__(self, manifest: Manifest, read: Callable[[int, int], bytes]) -> None:
        self.manifest = manifest
        self._read = read  # blocking: the server calls `read_chunk` in a worker thread

    @classmethod
    def from_bytes(cls, data: bytes, *, chunk_size: int | None = None) -> BlobSource:
        view = memoryview(data)
        return cls(Manifest.build(view, chunk_size=chunk_size), lambda off, n: bytes(view[off : off + n]))

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        manifest: Manifest | None = None,
        pace: Callable[[int], None] | None = None,
    ) -> BlobSource:
        """A file that must not change while served (write a new file and serve it under a new id).

        ``manifest``: one computed earlier for this very file (e.g. stored beside it), to skip hashing.
        ``pace``: called with each served chunk's length before it is read, in the server's worker thread;
        it may block there to cap the bytes served per second (the daemon's bandwidth cap). Hashing the
        file up front is not paced.
        """
        path = os.fspath(path)
        stat = os.stat(path)
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

        def hash_read(offset: int, length: int) -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != identity:
                    raise BlobChanged(f"{path} changed since its manifest was built")
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        def read(offset: int, length: int) -> bytes:
            if pace is not None:
                pace(length)
            return hash_read(offset, length)

        if manifest is None:
            manifest = Manifest.build_from_reader(hash_read, stat.st_size, chunk_size=chunk_size)
        elif manifest.size != stat.st_size:
            raise ValueError(f"manifest describes {manifest.size} bytes, {path} has {stat.st_size}")
        return cls(manifest, read if pace is not None else hash_read)

    def read_chunk(self, index: int) -> bytes:
        """The bytes of chunk ``index``. Raises IndexError, BlobChanged or OSError."""
        offset, length = self.manifest.chunk_range(index)
        data = self._read(offset, length)
        if len(data) != length:  # the file shrank under us: never serve a short read as if it were whole
            raise BlobChanged(f"short read at {offset}: {len(data)} of {length} bytes")
        return data


# ---------------------------------------------------------------------------------------------- server


@dataclass(slots=True)
class _Out:
    """Reader -> writer hand-off: a chunk (holding read tokens) or the error that ends the session."""

    index: int = -1
    data: bytes = b""
    error: tuple[str, str] | None = None


class BlobServer:
    """The registry and the session handler. `add`/`remove` may be called from any thread (dict ops are
    atomic); sessions run in the trio thread."""

    def __init__(self, limits: BlobLimits, *, gate: PeerGate) -> None:
        self.limits = limits
        self._gate = gate
        self._sources: dict[bytes, BlobSource] = {}
        self._sessions = InFlight(per_peer=limits.max_sessions_per_peer, total=limits.max_sessions)
        self._reads_total = trio.Semaphore(limits.max_reads)
        self._reads_peer: dict[str, trio.Semaphore] = {}  # only peers with a session open: bounded
        self.counters = {
            "blob_sessions": 0,
            "blob_sessions_refused": 0,
            "blob_chunks_served": 0,
            "blob_bytes_served": 0,
            "blob_serve_errors": 0,
        }

    def add(self, blob_id: bytes, source: BlobSource) -> None:
        self._sources[blob_id] = source

    def remove(self, blob_id: bytes) -> None:
        self._sources.pop(blob_id, None)

    def served(self) -> dict[bytes, Manifest]:
        return {blob_id: source.manifest for blob_id, source in list(self._sources.items())}

    async def serve(self, stream: INetStream) -> None:
        """The libp2p stream handler of `BLOB_PROTOCOL`."""
        peer = stream.muxed_conn.peer_id.to_base58()
        refusal = self._gate.admit_request(peer)
        if refusal is None and not self._sessions.try_enter(peer):
            refusal = "Busy"
        if refusal is not None:
            self.counters["blob_sessions_refused"] += 1
            await _refuse(stream, refusal)
            return
        self.counters["blob_sessions"] += 1
        reads = self._reads_peer.setdefault(peer, trio.Semaphore(self.limits.max_reads_per_peer))
        ok = False
        try:
            ok = await self._session(stream, peer, reads)
        except* (P2PError, trio.TooSlowError) as group:  # the fetcher went away, stalled or broke framing
            log.debug("blob session ended peer=%s error=%r", peer, group.exceptions[0])
        finally:
            self._sessions.leave(peer)
            if self._sessions.of(peer) == 0:
                del self._reads_peer[peer]
            await finish_stream(stream, ok=ok)

    async def _session(self, stream: INetStream, peer: str, reads: trio.Semaphore) -> bool:
        decoder = FrameDecoder(
            max_message_bytes=MAX_BLOB_REQUEST_BYTES, expected=frozenset({FrameKind.REQUEST})
        )
        with trio.fail_after(self.limits.idle_timeout_s):
            frame = await read_frame(stream, decoder)
        try:
            request = BlobRequest.decode(frame.payload)
            if request.op is not Op.OPEN:
                raise ProtocolViolation("a session starts with OPEN")
        except ProtocolViolation as exc:
            await write_frame(stream, FrameKind.ERROR, encode_error_payload("ProtocolViolation", str(exc)))
            return True
        source = self._sources.get(request.blob_id)
        if source is None:
            await write_frame(stream, FrameKind.ERROR, encode_error_payload("NotServed", "not served here"))
            return True
        await write_frame(stream, FrameKind.RESPONSE, source.manifest.encode())
        # Read-ahead is bounded by the read tokens, not by the channel: a chunk takes its tokens before
        # its disk read and gives them back once written (or dropped by the drain below).
        send, receive = trio.open_memory_channel[_Out](self.limits.max_reads_per_peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_chunks, stream, decoder, source, reads, send)
            try:
                async for out in receive:
                    if out.error is not None:
                        self.counters["blob_serve_errors"] += 1
                        await write_frame(stream, FrameKind.ERROR, encode_error_payload(*out.error))
                        break
                    try:
                        with trio.fail_after(self.limits.write_timeout_s):
                            await write_frame(stream, FrameKind.RESPONSE, out.data)
                    finally:
                        self._release(reads)
                    self.counters["blob_chunks_served"] += 1
                    self.counters["blob_bytes_served"] += len(out.data)
            finally:  # no await from here on: the reader cannot slip another chunk in between
                nursery.cancel_scope.cancel()  # the reader may wait on the next request: the session is over
                self._drain(receive, reads)
                receive.close()  # a send after this fails, and the reader keeps its tokens to release them
        return True

    def _drain(self, receive: trio.MemoryReceiveChannel[_Out], reads: trio.Semaphore) -> None:
        """Give back the tokens of chunks read but never written."""
        while True:
            try:
                out = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if out.error is None:
                self._release(reads)

    async def _read_chunks(
        self,
        stream: INetStream,
        decoder: FrameDecoder,
        source: BlobSource,
        reads: trio.Semaphore,
        send: trio.MemorySendChannel[_Out],
    ) -> None:
        """Reader task: READ requests off the stream, chunks off the disk, handed to the writer in order."""
        async with send:
            with contextlib.suppress(trio.BrokenResourceError):  # the writer ended the session first
                await self._read_loop(stream, decoder, source, reads, send)

    async def _read_loop(
        self,
        stream: INetStream,
        decoder: FrameDecoder,
        source: BlobSource,
        reads: trio.Semaphore,
        send: trio.MemorySendChannel[_Out],
    ) -> None:
        while True:
            try:
                with trio.fail_after(self.limits.idle_timeout_s):
                    frame = await read_frame(stream, decoder)
                request = BlobRequest.decode(frame.payload)
            except PeerUnreachable:  # the fetcher half-closed: it has everything it asked for
                return
            except ProtocolViolation as exc:
                await send.send(_Out(error=("ProtocolViolation", str(exc))))
                return
            if request.op is not Op.READ or not 0 <= request.index < source.manifest.chunk_count:
                await send.send(_Out(error=("ProtocolViolation", f"bad request {request}")))
                return
            await reads.acquire()
            try:
                await self._reads_total.acquire()
            except BaseException:
                reads.release()
                raise
            handed_off = False
            try:
                data = await trio.to_thread.run_sync(source.read_chunk, request.index)
                await send.send(_Out(index=request.index, data=data))
                handed_off = True  # the writer releases the tokens once the chunk is written
            except OSError as exc:
                log.warning("blob read failed index=%s error=%s", request.index, exc)
                await send.send(_Out(error=(type(exc).__name__, str(exc))))
                return
            finally:
                if not handed_off:
                    self._release(reads)

    def _release(self, reads: trio.Semaphore) -> None:
        reads.release()
        self._reads_total.release()


async def _refuse(stream: INetStream, refusal: str) -> None:
    ok = False
    with trio.move_on_after(1.0):
        try:
            await write_frame(stream, FrameKind.ERROR, encode_error_payload(refusal, "session refused"))
            ok = True
        except P2PError:
            pass
    await finish_stream(stream, ok=ok)
