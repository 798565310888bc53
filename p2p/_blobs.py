"""Bulk transfer, asyncio side: serve blobs and fetch them in parallel from several peers.

Theory of operation
-------------------
The protocol (`/meshtrain/blob/1`, wire format in `p2p/_transfer.py`) rides on `Host.request`: every
exchange is one yamux stream carrying one request frame and one response frame, so a dead peer costs only
the chunks it had in flight, and chunks from different peers never share a stream.

Fetch (`fetch_blob`):

1. Ask every candidate peer for the blob's manifest at once. The first acceptable manifest (digest and size
   match what the caller pinned, if anything) defines the fetch; a peer whose manifest disagrees is dropped.
   Peers start pulling chunks as soon as their own manifest answer agrees: a slow peer does not hold back
   the others.
2. Each peer runs ``max_in_flight_per_peer`` workers (2 by default: one request on the wire while the
   other's response is verified and stored). `FetchPlan` decides which chunk each worker asks for; every
   chunk is blake2b-checked (in a worker thread: 4 MiB of hashing would otherwise stall the event loop)
   before it is kept. A peer that fails (unreachable, timeout, corrupt chunk) is dropped with a logged
   reason and its in-flight chunks go back to the pool for the others. A ``RateLimited`` refusal (the
   serving peer's per-peer request budget, p2p/_security.py) is not a failure: the worker backs off and
   retries.
3. When every chunk is in, the whole blob is hashed once more against the manifest digest. With ``dest``,
   chunks are written at their offsets into ``<dest>.part`` (memory stays bounded by peers x in-flight x
   chunk size), then fsynced and renamed to ``dest``; a later call after a failure re-verifies the part
   file and fetches only the chunks that are missing or wrong.

Failure: `TransferFailed` (every peer dropped, or the deadline passed) with each peer's reason;
`BlobNotFound` (a TransferFailed) when no peer produced a manifest at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from p2p._errors import BlobNotFound, P2PError, ProtocolViolation, RemoteError, TransferFailed
from p2p._transfer import (
    DEFAULT_CHUNK_BYTES,
    BlobRequest,
    BlobSource,
    FetchPlan,
    Manifest,
    Op,
    Verdict,
    blob_digest,
    check_blob,
    chunk_digest,
    scan_verified_chunks,
)

if TYPE_CHECKING:
    from p2p._host import Host

__all__ = ["BLOB_PROTOCOL", "BlobProvider", "BlobStats", "fetch_blob", "serve_blobs"]

log = logging.getLogger(__name__)

BLOB_PROTOCOL = "/meshtrain/blob/1"
DEFAULT_MAX_BLOB_BYTES = 8 * 1024**3  # the fetcher's bound on a manifest's size (a peer must not make us
# write 1 TiB); snapshots of the models meshtrain trains are well under 1 GiB
RATE_LIMIT_BACKOFF_S = 0.2  # a refused request waits this long before the chunk is asked again
HASH_BUFFER_BYTES = DEFAULT_CHUNK_BYTES  # read size when re-hashing a file

BlobProvider = Callable[[bytes], "BlobSource | Awaitable[BlobSource | None] | None"]


class NotServed(LookupError):
    """Raised by the serving side for an unknown blob id; the fetcher sees RemoteError('NotServed')."""


class BlobStats:
    """Counters of one Host's blob traffic (asyncio loop only)."""

    __slots__ = (
        "blob_bytes_fetched",
        "blob_bytes_served",
        "blob_chunk_failures",
        "blob_chunks_fetched",
        "blob_chunks_served",
        "blob_corrupt_chunks",
        "blob_fetches_failed",
        "blob_fetches_ok",
        "blob_peers_dropped",
        "blob_rate_limited",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


# ---------------------------------------------------------------------------------------------- serving


def serve_blobs(host: Host, provider: BlobProvider, stats: BlobStats) -> None:
    """Answer `/meshtrain/blob/1` requests from ``provider(blob_id) -> BlobSource | None`` (sync or async)."""

    async def handle(peer_id: str, data: bytes) -> bytes:
        request = BlobRequest.decode(data)
        source = provider(request.blob_id)
        if inspect.isawaitable(source):
            source = await source
        if source is None:
            raise NotServed(f"blob {request.blob_id[:64]!r} is not served here")
        if request.op is Op.MANIFEST:
            return source.manifest.encode()
        if source.reads_block:
            chunk = await asyncio.to_thread(source.read, request.offset, request.length)
        else:
            chunk = source.read(request.offset, request.length)
        stats.blob_chunks_served += 1
        stats.blob_bytes_served += len(chunk)
        return chunk

    host.set_request_handler(BLOB_PROTOCOL, handle)


# ---------------------------------------------------------------------------------------------- fetching


class _Sink:
    """Where verified chunks go: a list (return bytes) or a part file (return its final Path)."""

    def __init__(self, manifest: Manifest, dest: Path | None) -> None:
        self.manifest = manifest
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part") if dest is not None else None
        self.chunks: list[bytes | None] = [None] * manifest.chunk_count
        self.fd: int | None = None

    def open_and_scan(self) -> set[int]:
        """(Thread) open the part file, truncate it to size, return the chunks it already holds."""
        if self.part is None:
            return set()
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
        fd = self.fd
        available = os.fstat(fd).st_size
        have = scan_verified_chunks(self.manifest, lambda off, n: os.pread(fd, n, off), available)
        os.ftruncate(fd, self.manifest.size)
        return have

    async def store(self, index: int, data: bytes) -> None:
        offset, _ = self.manifest.chunk_range(index)
        if self.fd is None:
            self.chunks[index] = data
            return
        fd = self.fd
        await asyncio.to_thread(os.pwrite, fd, data, offset)

    def finish(self) -> bytes | Path:
        """(Thread) verify the whole blob; return bytes, or fsync and rename the part file into place."""
        if self.fd is None:
            data = b"".join(c for c in self.chunks if c is not None)
            check_blob(self.manifest, blob_digest(data))
            return data
        import hashlib

        whole = hashlib.blake2b(digest_size=len(self.manifest.digest))
        for offset in range(0, self.manifest.size, HASH_BUFFER_BYTES):
            whole.update(os.pread(self.fd, min(HASH_BUFFER_BYTES, self.manifest.size - offset), offset))
        check_blob(self.manifest, whole.digest())
        os.fsync(self.fd)
        self.close()
        assert self.part is not None and self.dest is not None
        os.replace(self.part, self.dest)
        return self.dest

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Fetch:
    """One `fetch_blob` call (see the module docstring)."""

    def __init__(
        self,
        host: Host,
        blob_id: bytes,
        *,
        digest: bytes | None,
        size: int | None,
        dest: Path | None,
        chunk_timeout_s: float,
        max_in_flight_per_peer: int,
        max_blob_bytes: int,
        stats: BlobStats,
    ) -> None:
        self.host = host
        self.blob_id = blob_id
        self.digest, self.size, self.dest = digest, size, dest
        self.chunk_timeout_s = chunk_timeout_s
        self.max_in_flight_per_peer = max_in_flight_per_peer
        self.max_blob_bytes = max_blob_bytes
        self.stats = stats
        self.plan: FetchPlan | None = None
        self.sink: _Sink | None = None
        self.manifest_errors: dict[str, str] = {}
        self.changed = asyncio.Condition()
        self.ready = asyncio.Event()  # set once the plan exists and the part file is scanned
        self.storing = 0  # accepted chunks whose write to the sink is still in flight

    async def run(self, peers: Sequence[str]) -> bytes | Path:
        unique = list(dict.fromkeys(peers))
        try:
            async with asyncio.TaskGroup() as tg:
                for peer in unique:
                    tg.create_task(self._peer(peer))
                tg.create_task(self._supervise(len(unique)))
        except* _Done:
            pass
        assert self.plan is not None and self.sink is not None
        return await asyncio.to_thread(self.sink.finish)

    # -- the decision: complete, or every peer gone

    async def _supervise(self, n_peers: int) -> None:
        def settled() -> bool:
            if self.plan is not None and self.plan.complete:
                # Complete means every chunk accepted; wait until the last writes have landed too, or the
                # cancellation that ends the fetch would race them and finish() would hash a gap.
                return self.storing == 0
            answered = len(self.manifest_errors) + (len(self.plan.peers) if self.plan else 0)
            return answered == n_peers and (self.plan is None or not self.plan.active_peers())

        async with self.changed:
            await self.changed.wait_for(settled)
        if self.plan is not None and self.plan.complete:
            raise _Done
        errors = {**self.manifest_errors, **(self.plan.peer_errors() if self.plan else {})}
        if self.plan is None:
            raise BlobNotFound(f"no peer offered blob {self.blob_id[:64]!r}", peer_errors=errors)
        raise TransferFailed(
            f"every peer failed while fetching blob {self.blob_id[:64]!r}",
            peer_errors=errors,
            chunks_done=len(self.plan.done),
            chunks_total=self.plan.manifest.chunk_count,
        )

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # -- one peer: manifest, then workers

    async def _peer(self, peer: str) -> None:
        try:
            manifest = await self._manifest(peer)
        except (P2PError, ValueError) as exc:
            self.manifest_errors[peer] = _reason(exc)
            log.info("blob peer skipped peer=%s blob=%r reason=%s", peer, self.blob_id[:64], _reason(exc))
            await self._notify()
            return
        if self.sink is None:  # the first acceptable manifest defines the fetch (set before any await)
            self.sink = _Sink(manifest, self.dest)
            have = await asyncio.to_thread(self.sink.open_and_scan)
            self.plan = FetchPlan(manifest, have=have, max_in_flight_per_peer=self.max_in_flight_per_peer)
            self.ready.set()
        await self.ready.wait()
        plan = self.plan
        assert plan is not None
        if manifest != plan.manifest:
            self.manifest_errors[peer] = "its manifest disagrees with the first one accepted"
            await self._notify()
            return
        plan.add_peer(peer)
        async with asyncio.TaskGroup() as tg:
            for _ in range(self.max_in_flight_per_peer):
                tg.create_task(self._worker(peer, plan))
        error = plan.peers[peer].error
        if error is not None:
            self.stats.blob_peers_dropped += 1
            log.warning("blob peer dropped peer=%s blob=%r reason=%s", peer, self.blob_id[:64], error)
        await self._notify()

    async def _manifest(self, peer: str) -> Manifest:
        request = BlobRequest(Op.MANIFEST, self.blob_id).encode()
        manifest = Manifest.decode(
            await self.host.request(peer, BLOB_PROTOCOL, request, timeout_s=self.chunk_timeout_s)
        )
        if self.digest is not None and manifest.digest != self.digest:
            raise ProtocolViolation(f"manifest digest {manifest.digest.hex()[:16]}.. is not the one pinned")
        if self.size is not None and manifest.size != self.size:
            raise ProtocolViolation(f"manifest size {manifest.size} != expected {self.size}")
        if manifest.size > self.max_blob_bytes:
            raise ProtocolViolation(f"blob of {manifest.size} bytes > max_blob_bytes={self.max_blob_bytes}")
        return manifest

    async def _worker(self, peer: str, plan: FetchPlan) -> None:
        assert self.sink is not None
        while True:
            index = plan.next_chunk(peer)
            if index is None:
                if plan.complete or plan.peers[peer].error is not None:
                    return
                async with self.changed:  # wait for a chunk to come back to the pool (or the end)
                    await self.changed.wait()
                continue
            offset, length = plan.manifest.chunk_range(index)
            request = BlobRequest(Op.READ, self.blob_id, offset, length).encode()
            try:
                data = await self.host.request(peer, BLOB_PROTOCOL, request, timeout_s=self.chunk_timeout_s)
            except RemoteError as exc:
                if exc.error_type == "RateLimited":
                    self.stats.blob_rate_limited += 1
                    plan.give_back(peer, index)
                    await self._notify()
                    await asyncio.sleep(RATE_LIMIT_BACKOFF_S)
                    continue
                self._fail(plan, peer, index, exc)
            except P2PError as exc:
                self._fail(plan, peer, index, exc)
            else:
                digest = await asyncio.to_thread(chunk_digest, data)
                verdict = plan.on_data(peer, index, data, digest=digest)
                if verdict is Verdict.ACCEPTED:
                    self.storing += 1
                    try:
                        await self.sink.store(index, data)
                    finally:
                        self.storing -= 1
                    self.stats.blob_chunks_fetched += 1
                    self.stats.blob_bytes_fetched += length
                elif verdict is Verdict.CORRUPT:
                    self.stats.blob_corrupt_chunks += 1
            await self._notify()

    def _fail(self, plan: FetchPlan, peer: str, index: int, exc: P2PError) -> None:
        self.stats.blob_chunk_failures += 1
        plan.on_failure(peer, index, f"chunk {index}: {_reason(exc)}")


class _Done(Exception):
    """Internal: ends the fetch's task group once every chunk is in."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RemoteError) and exc.error_type == "NotServed":
        return "not served there"
    return f"{type(exc).__name__}: {exc}"


async def fetch_blob(
    host: Host,
    blob_id: bytes,
    *,
    peers: Sequence[str],
    stats: BlobStats,
    digest: bytes | None = None,
    size: int | None = None,
    dest: Path | None = None,
    timeout_s: float = 600.0,
    chunk_timeout_s: float = 30.0,
    max_in_flight_per_peer: int = 2,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
) -> bytes | Path:
    """See `Host.fetch_blob` (the public entry point, which documents the arguments)."""
    if not peers:
        raise BlobNotFound(f"no peers given for blob {blob_id[:64]!r}", peer_errors={})
    fetch = _Fetch(
        host,
        blob_id,
        digest=digest,
        size=size,
        dest=Path(dest) if dest is not None else None,
        chunk_timeout_s=chunk_timeout_s,
        max_in_flight_per_peer=max_in_flight_per_peer,
        max_blob_bytes=max_blob_bytes,
        stats=stats,
    )
    try:
        async with asyncio.timeout(timeout_s):
            result = await fetch.run(peers)
    except TimeoutError as exc:
        stats.blob_fetches_failed += 1
        plan = fetch.plan
        raise TransferFailed(
            f"fetch of blob {blob_id[:64]!r} timed out after {timeout_s} s",
            peer_errors={**fetch.manifest_errors, **(plan.peer_errors() if plan else {})},
            chunks_done=len(plan.done) if plan else 0,
            chunks_total=plan.manifest.chunk_count if plan else 0,
        ) from exc
    except BaseException as exc:
        stats.blob_fetches_failed += 1
        if isinstance(exc, BaseExceptionGroup):  # TaskGroups wrap our TransferFailed (or an OSError of the
            failed = exc.subgroup(TransferFailed)  # part file): hand the caller the error itself
            raise _first(failed if failed is not None else exc) from None
        raise
    finally:
        if fetch.sink is not None:
            with contextlib.suppress(OSError):
                fetch.sink.close()
    stats.blob_fetches_ok += 1
    return result


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        return exc
    raise AssertionError("empty exception group")
