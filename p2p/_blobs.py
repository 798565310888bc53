"""Fetching a blob from several peers at once (trio side): sessions, verification, progress, blame.

Theory of operation
-------------------
`fetch_blob` runs in the Host's trio thread (one bridge crossing per fetch, not per chunk). It opens one
`/meshtrain/blob/2` session per candidate peer (wire format in `p2p/_transfer.py`, serving side in
`p2p/_blobserve.py`):

1. OPEN: every peer is asked for the manifest at once. A manifest is acceptable if it matches what the
   caller pinned (``root``: the manifest's own hash, which authenticates every chunk digest; ``digest``:
   the whole blob's hash; ``size``), and is within bounds (``max_bytes``; the free disk space with
   ``dest``; `BlobLimits.max_memory_bytes` without). The first acceptable manifest defines the fetch;
   a peer whose manifest differs is dropped. Each peer starts pulling as soon as its own answer agrees.
2. READ: each session keeps up to ``fetch_depth`` chunks requested-but-not-stored (so the stream never idles
   between chunks and memory stays bounded by peers x depth x chunk size). `FetchPlan` decides which chunk
   each peer asks for next (lowest index first; duplicates only in the endgame). Every chunk is hashed and
   checked against the manifest before it is kept, in one worker-thread call with its copy or write
   (`BlobSink.verify_and_store`: into ``<dest>.part``, or into the result's memory); the sink hashes the whole
   blob along the way when its digest was pinned.
3. A peer is dropped, with its reason in `BlobProgress.dropped` and `TransferFailed.peer_errors`, when it is
   unreachable, refuses (NotServed, Busy), stalls (no chunk within ``chunk_timeout_s`` of asking) or lies
   (a chunk that fails its digest, a manifest that is malformed or not the pinned one). Its chunks go back
   to the pool and the others finish.
4. When every chunk is in, the whole-blob digest is checked; with ``dest`` the part file is fsynced and
   renamed into place. After a failure, cancellation or crash the part file stays: the next `fetch_blob`
   to the same ``dest`` re-verifies it and fetches only the missing chunks.

Trust: pin ``root`` when you can (a signed announcement can carry it). With only ``digest`` pinned, a
manifest whose chunk digests lie is caught at the end (IntegrityError, the part file is discarded); with
nothing pinned the first manifest is trusted and the checks only prove the peers agree with it.

Failure: `TransferFailed` (every peer dropped, or the deadline passed) with each peer's reason;
`BlobNotFound` (a TransferFailed) when no peer produced an acceptable manifest at all.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetStream

from p2p._blobserve import BLOB_PROTOCOL, BlobLimits
from p2p._blobsink import BlobSink
from p2p._errors import (
    BlobNotFound,
    IntegrityError,
    P2PError,
    ProtocolViolation,
    RemoteError,
    TransferFailed,
)
from p2p._framing import Frame, FrameDecoder, FrameKind, Pieces
from p2p._node import parse_peer_id
from p2p._reqresp import finish_stream, open_stream, read_frame, remote_error, write_frame
from p2p._transfer import MAX_MANIFEST_BYTES, BlobRequest, FetchPlan, Manifest, Op, Verdict

if TYPE_CHECKING:
    from p2p._node import TrioNode

__all__ = ["BlobProgress", "FetchStats", "fetch_blob"]

log = logging.getLogger(__name__)


class FetchStats:
    """Counters of one Host's fetches (written in the trio thread; int reads are atomic)."""

    __slots__ = (
        "blob_bytes_fetched",
        "blob_chunks_fetched",
        "blob_corrupt_chunks",
        "blob_fetches_failed",
        "blob_fetches_ok",
        "blob_peers_dropped",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class BlobProgress:
    """Live state of one fetch, for a status page. Written in the trio thread; read it with `as_dict`.

    Pass one to `Host.fetch_blob(progress=...)` to watch a fetch, or read `Host.blob_fetches()`.
    """

    def __init__(self) -> None:
        self.blob_id = b""
        self.state = "starting"  # -> fetching -> verifying -> done | failed
        self.bytes_total = 0
        self.bytes_done = 0  # verified and stored, resumed bytes included
        self.bytes_resumed = 0  # found already verified in the part file
        self.chunks_total = 0
        self.chunks_done = 0
        self.sources: set[str] = set()  # peers pulling chunks right now
        self.dropped: dict[str, str] = {}  # peer -> why it was dropped
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

    @property
    def rate_bytes_per_s(self) -> float:
        """Bytes fetched over the network (not resumed ones) per second since the start."""
        elapsed = (self.finished_at or time.monotonic()) - self.started_at
        return (self.bytes_done - self.bytes_resumed) / elapsed if elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "blob_id": self.blob_id.decode("utf-8", "replace"),
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_resumed": self.bytes_resumed,
            "chunks_done": self.chunks_done,
            "chunks_total": self.chunks_total,
            "rate_bytes_per_s": round(self.rate_bytes_per_s),
            "sources": sorted(list(self.sources)),
            "dropped": dict(self.dropped),
        }


class _Fetch:
    """One `fetch_blob` call (see the module docstring)."""

    def __init__(
        self,
        node: TrioNode,
        blob_id: bytes,
        *,
        pins: tuple[bytes | None, bytes | None, int | None],
        max_bytes: int | None,
        dest: Path | None,
        limits: BlobLimits,
        progress: BlobProgress,
        stats: FetchStats,
    ) -> None:
        self.node = node
        self.blob_id = blob_id
        self.root, self.digest, self.size = pins
        self.max_bytes = max_bytes
        self.dest = dest
        self.limits = limits
        self.progress = progress
        self.stats = stats
        self.plan: FetchPlan | None = None
        self.sink: BlobSink | None = None
        self.failed: dict[str, str] = {}  # peers dropped before or while joining the plan
        self._adopt_lock = trio.Lock()
        self._changed = trio.Event()

    # -- the decision: complete, or every peer gone

    async def run(self, peers: Sequence[str]) -> memoryview | Path:
        unique = list(dict.fromkeys(peers))
        async with trio.open_nursery() as nursery:
            for peer in unique:
                nursery.start_soon(self._peer, peer)
            while not self._settled(len(unique)):
                await self._wait_change()
            nursery.cancel_scope.cancel()
        if self.plan is None or self.sink is None:
            raise BlobNotFound(f"no peer offered blob {self.blob_id[:64]!r}", peer_errors=self.peer_errors())
        if not self.plan.complete:
            raise self._failure(f"every peer failed while fetching blob {self.blob_id[:64]!r}")
        self.progress.state = "verifying"
        try:
            return await self.sink.finish()
        except IntegrityError as exc:  # the adopted manifest lied about its chunks: nothing in it is kept
            self.sink.discard()
            sources = ", ".join(sorted(self.plan.peers))
            raise IntegrityError(f"{exc} (manifest from {sources}); the part file was discarded") from exc

    def _settled(self, n_peers: int) -> bool:
        plan = self.plan
        if plan is not None and plan.complete:  # every chunk accepted, so stored (stored first, see below)
            return True
        joined = len(plan.peers) if plan is not None else 0
        active = len(plan.active_peers()) if plan is not None else 0
        return n_peers - len(self.failed) - joined == 0 and active == 0

    def _failure(self, message: str) -> TransferFailed:
        plan = self.plan
        return TransferFailed(
            message,
            peer_errors=self.peer_errors(),
            chunks_done=len(plan.done) if plan else 0,
            chunks_total=plan.manifest.chunk_count if plan else 0,
        )

    def peer_errors(self) -> dict[str, str]:
        return {**self.failed, **(self.plan.peer_errors() if self.plan else {})}

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _drop(self, peer: str, reason: str, *, in_plan: bool) -> None:
        if in_plan and self.plan is not None:
            self.plan.on_failure(peer, None, reason)
            reason = self.plan.peers[peer].error or reason
        else:
            self.failed[peer] = reason
        if peer not in self.progress.dropped:
            self.stats.blob_peers_dropped += in_plan
            self.progress.dropped[peer] = reason
            log.info("blob peer dropped peer=%s blob=%r reason=%s", peer, self.blob_id[:64], reason)
        self.progress.sources.discard(peer)
        self._notify()

    # -- one peer: open, manifest, then pull chunks

    async def _peer(self, peer: str) -> None:
        stream: INetStream | None = None
        ok = False
        try:
            with trio.fail_after(self.limits.chunk_timeout_s):
                stream = await open_stream(self.node.host, parse_peer_id(peer), BLOB_PROTOCOL)
                decoder = FrameDecoder(max_message_bytes=MAX_MANIFEST_BYTES, expected=_ANSWERS)
                await write_frame(stream, FrameKind.REQUEST, BlobRequest(Op.OPEN, self.blob_id).encode())
                manifest = self._acceptable(Manifest.decode((await _answer(stream, decoder)).payload))
            plan = await self._join(peer, manifest)
        except (P2PError, ValueError, trio.TooSlowError) as exc:
            self._drop(peer, _reason(exc, self.limits.chunk_timeout_s), in_plan=False)
        else:
            decoder.max_message_bytes = manifest.chunk_size  # the same decoder: it may hold input already
            await self._pull(stream, decoder, peer, plan)
            ok = plan.peers[peer].error is None
        finally:
            if stream is not None:
                await finish_stream(stream, ok=ok)

    def _acceptable(self, manifest: Manifest) -> Manifest:
        if self.root is not None and manifest.root != self.root:
            raise ProtocolViolation(f"manifest root {manifest.root.hex()[:16]}.. is not the one pinned")
        if self.digest is not None and manifest.digest != self.digest:
            raise ProtocolViolation(f"manifest digest {manifest.digest.hex()[:16]}.. is not the one pinned")
        if self.size is not None and manifest.size != self.size:
            raise ProtocolViolation(f"manifest size {manifest.size} != expected {self.size}")
        limit = self.limits.max_memory_bytes if self.dest is None else self.max_bytes
        if limit is not None and manifest.size > limit:
            raise ProtocolViolation(f"blob of {manifest.size} bytes > the {limit}-byte limit of this fetch")
        return manifest

    async def _join(self, peer: str, manifest: Manifest) -> FetchPlan:
        async with self._adopt_lock:  # the first acceptable manifest that fits defines the fetch
            if self.plan is None:
                await self._adopt(manifest)
        plan = self.plan
        assert plan is not None  # internal: _adopt set it or raised
        if manifest != plan.manifest:
            raise ProtocolViolation("its manifest disagrees with the one this fetch adopted")
        plan.add_peer(peer)
        self.progress.sources.add(peer)
        return plan

    async def _adopt(self, manifest: Manifest) -> None:
        if self.dest is not None:  # a peer announcing more than the disk holds is dropped, not obeyed
            await trio.to_thread.run_sync(_check_disk_space, self.dest, manifest.size)
        # Prefault a memory result only for a blob the caller pinned: an unpinned manifest's size is the
        # sender's word, and its pages must be committed only as verified chunks land (SECURITY.md).
        pinned = any(pin is not None for pin in (self.root, self.digest, self.size))
        self.sink = BlobSink(manifest, self.dest, verify_whole=self.digest is not None, prefault=pinned)
        have = await self.sink.open()
        self.plan = FetchPlan(manifest, have=have, max_in_flight_per_peer=self.limits.fetch_depth)
        progress = self.progress
        progress.bytes_total, progress.chunks_total = manifest.size, manifest.chunk_count
        progress.bytes_resumed = progress.bytes_done = self.sink.bytes_resumed
        progress.chunks_done = len(have)
        progress.state = "fetching"
        self._notify()

    async def _pull(self, stream: INetStream, decoder: FrameDecoder, peer: str, plan: FetchPlan) -> None:
        """One session's requester and receiver; returns once the plan is complete or the peer dropped.

        Verification and storage run in their own nursery, outside the session's: ending the session (the
        plan completed, or the peer was dropped) never cancels a chunk that is being stored.
        """
        asked: deque[int] = deque()
        async with trio.open_nursery() as storing, trio.open_nursery() as session:
            scope = session.cancel_scope
            session.start_soon(self._guard, peer, scope, self._request_chunks, stream, peer, plan, asked)
            session.start_soon(
                self._guard, peer, scope, self._receive_chunks, stream, decoder, peer, plan, asked, storing
            )

    async def _guard(self, peer: str, scope: trio.CancelScope, fn: Any, *args: Any) -> None:
        """Run one side of a session; a failure drops the peer and ends the session (not the fetch)."""
        try:
            await fn(*args)
        except (P2PError, ValueError, trio.TooSlowError) as exc:
            self._drop(peer, _reason(exc, self.limits.chunk_timeout_s), in_plan=True)
        scope.cancel()

    async def _request_chunks(
        self, stream: INetStream, peer: str, plan: FetchPlan, asked: deque[int]
    ) -> None:
        while plan.peers[peer].error is None and not plan.complete:
            index = plan.next_chunk(peer)
            if index is None:
                await self._wait_change()
                continue
            asked.append(index)
            self._notify()
            await write_frame(stream, FrameKind.REQUEST, BlobRequest(Op.READ, index=index).encode())

    async def _receive_chunks(
        self,
        stream: INetStream,
        decoder: FrameDecoder,
        peer: str,
        plan: FetchPlan,
        asked: deque[int],
        storing: trio.Nursery,
    ) -> None:
        while plan.peers[peer].error is None and not plan.complete:
            if not asked:
                await self._wait_change()
                continue
            with trio.fail_after(self.limits.chunk_timeout_s):  # a stall: no chunk this long after asking
                frame = await _answer(stream, decoder)
            storing.start_soon(self._verify_and_store, peer, plan, asked.popleft(), frame.pieces)

    async def _verify_and_store(self, peer: str, plan: FetchPlan, index: int, pieces: Pieces) -> None:
        """The sink keeps the chunk if it matches the manifest *before* the plan hears of it: once the plan
        counts a chunk as done, it is in the result or the part file (the worker-thread call cannot be
        cancelled half way), so a complete plan means a complete sink, and the cancellation that ends the
        fetch cannot race a store."""
        assert self.sink is not None  # internal: set with the plan
        size = sum(len(p) for p in pieces)
        digest = await self.sink.verify_and_store(index, pieces)
        verdict = plan.on_data(peer, index, size=size, digest=digest)
        if verdict is Verdict.ACCEPTED:
            self.stats.blob_chunks_fetched += 1
            self.stats.blob_bytes_fetched += size
            self.progress.chunks_done += 1
            self.progress.bytes_done += size
        elif verdict is Verdict.CORRUPT:
            self.stats.blob_corrupt_chunks += 1
            self._drop(peer, plan.peers[peer].error or "corrupt chunk", in_plan=True)
        self._notify()


_ANSWERS = frozenset({FrameKind.RESPONSE, FrameKind.ERROR})


async def _answer(stream: INetStream, decoder: FrameDecoder) -> Frame:
    """The next RESPONSE frame; an ERROR frame raises its RemoteError."""
    frame = await read_frame(stream, decoder)
    if frame.kind is FrameKind.ERROR:
        raise remote_error(frame.payload)
    return frame


def _check_disk_space(dest: Path, size: int) -> None:
    """Refuse a blob that cannot fit: the part file's existing bytes count as already there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_blocks * 512 if part.exists() else 0
    free = shutil.disk_usage(dest.parent).free
    if size - have > free:
        raise ProtocolViolation(f"blob of {size} bytes does not fit on disk ({free} bytes free)")


def _reason(exc: BaseException, chunk_timeout_s: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"stalled: no answer within {chunk_timeout_s} s"
    if isinstance(exc, RemoteError) and exc.error_type == "NotServed":
        return "not served there"
    return f"{type(exc).__name__}: {exc}"


async def fetch_blob(
    node: TrioNode,
    blob_id: bytes,
    *,
    peers: Sequence[str],
    root: bytes | None,
    digest: bytes | None,
    size: int | None,
    max_bytes: int | None,
    dest: Path | None,
    timeout_s: float | None,
    limits: BlobLimits,
    progress: BlobProgress,
    stats: FetchStats,
) -> memoryview | Path:
    """See `Host.fetch_blob` (the public entry point, which documents the arguments). Trio thread."""
    progress.blob_id = blob_id
    fetch = _Fetch(
        node,
        blob_id,
        pins=(root, digest, size),
        max_bytes=max_bytes,
        dest=dest,
        limits=limits,
        progress=progress,
        stats=stats,
    )
    try:
        if not peers:
            raise BlobNotFound(f"no peers given for blob {blob_id[:64]!r}", peer_errors={})
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s) as scope:
            try:
                result = await fetch.run(peers)
            except BaseExceptionGroup as group:  # a local failure (an OSError of the part file): unwrap
                raise _first(group) from None
        if scope.cancelled_caught:
            raise fetch._failure(f"fetch of blob {blob_id[:64]!r} timed out after {timeout_s} s")
    except BaseException:
        stats.blob_fetches_failed += 1
        progress.state = "failed"
        raise
    finally:
        progress.finished_at = time.monotonic()
        progress.sources.clear()
        if fetch.sink is not None:
            fetch.sink.close()
    stats.blob_fetches_ok += 1
    progress.state = "done"
    return result


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that ended the fetch: the first leaf of a (nested) group that is not a cancellation."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
