"""Request/response over libp2p streams, trio side: one stream per request, bounded at both ends.

Theory of operation
-------------------
A request opens one yamux stream, sends one REQUEST frame and reads one RESPONSE or ERROR frame
(`p2p/_framing.py`); both sides then close. The serving side runs the asyncio handler through
`TrioBridge.call_asyncio`. Everything here runs in the Host's trio thread and raises `p2p` errors.

A protocol registered with ``keep_streams`` serves one request after another on a stream (the server is
p2p/_reqserve.py, the client's side p2p/_kept.py), within the same per-request bounds: a stream costs a
SYN, a FIN each way and the multistream negotiation, about 390 bytes in 9 Noise frames, which was 2 % of a
4-daemon training run's bytes at one pushed record per stream (bench/convergence, 2026-12-02). At most
``max_kept_streams_per_peer`` and ``max_kept_streams`` in all stay open after their first answer; one more
is served once and closed, as before. A kept stream with no request for ``kept_idle_s`` is closed.

What one remote peer with throwaway keys can make a server hold, and the bound on each:

* **requests in flight**: at most ``max_in_flight_per_peer`` per peer and ``max_in_flight`` in total. One
  more is refused at once with an ERROR frame ``Busy`` (the client sees `p2p.Busy`), before its payload is
  read: a flood is not queued, and costs us one header. Refused, not queued, because a queue is memory the
  flooder chooses; refused, not penalized, because the total bound is also hit by honest peers under load.
* **request bytes**: the frame header is checked against the protocol's ``max_request_bytes`` before any
  payload is buffered (MessageTooLarge goes back as an ERROR frame).
* **time**: the whole request frame must arrive within ``request_read_timeout_s`` (a slowloris holds a slot
  for that long at most), and the whole exchange ends after ``handler_timeout_s``.

Memory held for inbound requests is therefore at most ``max_in_flight x (max_request_bytes + one read)``
(see below) plus what our own handlers allocate. A client bounds what it accepts with ``max_response_bytes``
(per call).

Rate limits and membership (`p2p/_security.py`'s PeerGate) are checked first, so a non-member or a banned
peer never occupies an in-flight slot.

A frame goes out in two writes (its header with the first 1 MiB, then the rest as one memoryview that
yamux frames without a copy on our side) and reads ask for 4 MiB whatever the frame still needs, so the
decoder holds at most the frame plus one read beyond it; what a peer sends past its request is bytes yamux
would hold for it anyway (its stream's receive window), read out once and parsed one frame at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import ProtocolNotSupportedError

from p2p._errors import (
    Busy,
    MessageTooLarge,
    P2PError,
    PeerUnreachable,
    ProtocolNotSupported,
    ProtocolViolation,
    RemoteError,
    RequestTimeout,
)
from p2p._framing import (
    MAX_FRAME_BYTES,
    Frame,
    FrameDecoder,
    FrameKind,
    decode_error_payload,
    encode_header,
)

__all__ = [
    "HandlerSpec",
    "InFlight",
    "RequestLimits",
    "exchange",
    "finish_stream",
    "open_stream",
    "read_frame",
    "remote_error",
    "request",
    "write_frame",
]

log = logging.getLogger(__name__)

WRITE_SLICE_BYTES = 1024 * 1024  # header + this much go out as one yamux frame (p2p/_speedups.py)
READ_SLICE_BYTES = 4 * 1024 * 1024  # read size: fewer calls through libp2p's layers per MiB

RequestHandler = Callable[[str, bytes], Awaitable[bytes]]


class ByteCounters(Protocol):
    bytes_sent: int
    bytes_received: int
    requests_sent: int
    requests_received: int
    requests_failed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLimits:
    """Bounds of request/response traffic (`HostConfig.requests`). Defaults suit the daemon's protocols."""

    max_request_bytes: int = 4 * 1024 * 1024
    """Largest request accepted, unless its protocol sets its own (`Host.set_request_handler`). The
    daemon's largest request is a sync digest, capped at 4 MiB by daemon/wire.py (a version vector of
    ~100k authors); bulk data travels as blobs."""
    max_response_bytes: int = 64 * 1024 * 1024
    """Largest response a `Host.request` accepts unless the call sets its own. A sync response carries at
    most 64 contributions of one sparse payload each: a few tens of MiB at the very most."""
    max_in_flight_per_peer: int = 8
    """Inbound requests served at once for one peer. The daemon sends a peer at most ~3 at a time (a sync
    pull, a goodbye, a genesis/snapshot request); 8 leaves room without letting one peer take the host."""
    max_in_flight: int = 32
    """Inbound requests served at once in total: with 4 MiB requests, at most 128 MiB of request buffers."""
    request_read_timeout_s: float = 10.0
    """The request frame must have arrived this long after the stream opened (4 MiB at 400 KB/s)."""
    handler_timeout_s: float = 60.0
    """A whole inbound exchange (read, handler, write) is abandoned after this long: twice the daemon's
    30 s request timeout, after which the requester has given up anyway."""
    max_kept_streams_per_peer: int = 2
    """Streams of ``keep_streams`` protocols one peer may keep open between requests (the daemon keeps one
    per member for pushes)."""
    max_kept_streams: int = 64
    """Kept streams in all: past either bound a stream is served once and closed, so a peer with many
    throwaway keys costs others a new stream per request, not service."""
    kept_idle_s: float = 120.0
    """A kept stream with no request for this long is closed (a pushing member sends one per round)."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_response_bytes"):
            if not 0 < getattr(self, name) <= MAX_FRAME_BYTES:
                raise ValueError(f"{name} must be in 1..{MAX_FRAME_BYTES} (u32 frame length)")
        if min(self.max_in_flight_per_peer, self.max_in_flight) < 1:
            raise ValueError("max_in_flight_per_peer and max_in_flight must be >= 1")
        if min(self.max_kept_streams_per_peer, self.max_kept_streams) < 0:
            raise ValueError("max_kept_streams_per_peer and max_kept_streams must be >= 0")
        if min(self.request_read_timeout_s, self.handler_timeout_s, self.kept_idle_s) <= 0:
            raise ValueError("timeouts must be positive")


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered request handler, its protocol's request bound (None: the Host's default), and whether
    its streams may carry one request after another."""

    handler: RequestHandler
    max_request_bytes: int | None = None
    keep_streams: bool = False


class InFlight:
    """Counts work in flight per peer and in total; `try_enter` refuses over either bound (trio thread)."""

    def __init__(self, *, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self._by_peer: dict[str, int] = {}
        self.count = 0

    def try_enter(self, peer: str) -> bool:
        held = self._by_peer.get(peer, 0)
        if held >= self.per_peer or self.count >= self.total:
            return False
        self._by_peer[peer] = held + 1
        self.count += 1
        return True

    def leave(self, peer: str) -> None:
        held = self._by_peer.pop(peer)  # entries live only while a peer has work in flight: bounded
        if held > 1:
            self._by_peer[peer] = held - 1
        self.count -= 1

    def of(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)


# ---------------------------------------------------------------------------------------------- stream I/O


async def open_stream(host: IHost, pid: ID, protocol: str) -> INetStream:
    """A new stream to ``pid`` speaking ``protocol``. Raises PeerUnreachable / ProtocolNotSupported."""
    try:
        return await host.new_stream(pid, [TProtocol(protocol)])
    except BaseLibp2pError as exc:
        # 0.8.1 folds the peer's "na" answers into a plain MultiselectClientError's message
        # ("protocols not supported: ..."), wrapped in StreamFailure; no typed cause survives.
        if _caused_by(exc, ProtocolNotSupportedError) or "not supported" in _chain_text(exc):
            raise ProtocolNotSupported(f"{pid} does not speak {protocol}") from exc
        raise PeerUnreachable(f"cannot open {protocol} stream to {pid}: {exc}") from exc
    except OSError as exc:
        raise PeerUnreachable(f"cannot open {protocol} stream to {pid}: {exc}") from exc


async def write_frame(
    stream: INetStream,
    kind: FrameKind,
    payload: bytes | bytearray | memoryview,
    stats: ByteCounters | None = None,
) -> None:
    """One frame in (at most) two stream writes: the header with the first slice of the payload (5 bytes
    alone would cost a yamux frame, a Noise message and a syscall of their own), then the rest as one
    memoryview, which yamux cuts into frames itself without a copy on our side."""
    view = memoryview(payload).cast("B")
    header = encode_header(kind, len(view), max_message_bytes=MAX_FRAME_BYTES)
    first = WRITE_SLICE_BYTES - len(header)
    try:
        await stream.write(header + view[:first])
        if len(view) > first:
            await stream.write(view[first:])
    except (BaseLibp2pError, OSError) as exc:
        raise PeerUnreachable(f"stream write failed: {exc}") from exc
    if stats is not None:
        stats.bytes_sent += len(view)


async def read_frame(stream: INetStream, decoder: FrameDecoder, stats: ByteCounters | None = None) -> Frame:
    """The next whole frame. Raises PeerUnreachable (EOF before a frame) or ProtocolViolation."""
    while (frame := decoder.next_frame()) is None:
        try:
            # Not capped at the frame's end: what runs past it waits in the decoder for the next frame, and
            # every read costs a yamux window update (a frame, a Noise message, a syscall on both sides):
            # 878 -> 759 reads and 510 -> 425 window updates per 64 MiB fetch_blob (2026-12-01).
            chunk = await stream.read(READ_SLICE_BYTES)
        except StreamEOF as exc:
            if decoder.in_frame:
                raise ProtocolViolation("stream ended in the middle of a frame") from exc
            raise PeerUnreachable("stream closed before a frame arrived") from exc
        except (BaseLibp2pError, OSError) as exc:
            raise PeerUnreachable(f"stream read failed: {exc}") from exc
        if not chunk:
            raise PeerUnreachable("stream closed before a complete frame arrived")
        decoder.feed(chunk)
    if stats is not None:
        stats.bytes_received += frame.size
    return frame


async def finish_stream(stream: INetStream, *, ok: bool) -> None:
    """Close (half-close on yamux) after a clean exchange, reset otherwise; never raises or blocks long."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            if ok:
                await stream.close()
            else:
                await stream.reset()
        except Exception as exc:  # the stream is dead either way; nothing left to do with it
            log.debug("stream cleanup failed error=%r", exc)


def remote_error(payload: bytes) -> RemoteError:
    """The exception an ERROR frame stands for (`Busy` is its own type: callers retry it later)."""
    error_type, message = decode_error_payload(payload)
    if error_type == "Busy":
        return Busy(error_type, message)
    return RemoteError(error_type, message)


# ---------------------------------------------------------------------------------------------- client


#: How a request reaches the peer: `_exchange` (a new stream) or `KeptStreams.exchange` (p2p/_kept.py).
Exchange = Callable[[ID, str, bytes, int], Awaitable[bytes]]


async def request(
    host: IHost,
    pid: ID,
    protocol: str,
    data: bytes,
    *,
    timeout_s: float,
    max_response_bytes: int,
    stats: ByteCounters,
    via: Exchange | None = None,
) -> bytes:
    """One request/response exchange (see `Host.request` for the errors), on a new stream unless ``via``.

    The request size is the server's to bound (per protocol); a refusal comes back as an early ERROR frame.
    """
    if len(data) > MAX_FRAME_BYTES:
        raise MessageTooLarge(f"request of {len(data)} bytes does not fit in one frame")
    stats.requests_sent += 1
    try:
        with trio.move_on_after(timeout_s) as scope:
            if via is not None:
                return await via(pid, protocol, data, max_response_bytes)
            return await _exchange(host, pid, protocol, data, max_response_bytes, stats)
    except P2PError as exc:
        stats.requests_failed += 1
        if scope.cancel_called and not isinstance(exc, RemoteError):
            raise RequestTimeout(f"request {protocol} to {pid} timed out after {timeout_s} s") from exc
        raise
    stats.requests_failed += 1
    raise RequestTimeout(f"request {protocol} to {pid} timed out after {timeout_s} s")


async def _exchange(
    host: IHost, pid: ID, protocol: str, data: bytes, max_response_bytes: int, stats: ByteCounters
) -> bytes:
    stream = await open_stream(host, pid, protocol)
    answered = False
    try:
        response = await exchange(stream, data, max_response_bytes, stats)
        answered = True
        return response
    except RemoteError:
        answered = True  # an ERROR frame ends the exchange as cleanly as a response
        raise
    finally:
        await finish_stream(stream, ok=answered)


async def exchange(stream: INetStream, data: bytes, max_response_bytes: int, stats: ByteCounters) -> bytes:
    """Send one REQUEST frame on ``stream`` and read its answer; the stream stays open. Raises RemoteError
    for an ERROR frame, PeerUnreachable when the stream ends first, ProtocolViolation for a bad frame."""
    decoder = FrameDecoder(
        max_message_bytes=max_response_bytes, expected=frozenset({FrameKind.RESPONSE, FrameKind.ERROR})
    )

    async def send() -> None:
        with contextlib.suppress(P2PError):  # a broken stream shows up in the read below as well
            await write_frame(stream, FrameKind.REQUEST, data, stats)

    # Read while writing: a server may answer before it has read the request (Busy, MessageTooLarge on the
    # header) and stop reading; then its answer ends our write instead of the write waiting on the window.
    answer: Frame | P2PError | None = None
    async with trio.open_nursery() as nursery:  # errors kept out of it: it would raise them as a group
        nursery.start_soon(send)
        try:
            answer = await read_frame(stream, decoder, stats)
        except P2PError as exc:
            answer = exc
        nursery.cancel_scope.cancel()  # the writer, if the answer came early
    assert answer is not None  # internal: the nursery ended without an exception, so the read finished
    if isinstance(answer, P2PError):
        raise answer
    if answer.kind is FrameKind.ERROR:
        raise remote_error(answer.payload)
    if decoder.in_frame:
        raise ProtocolViolation("bytes beyond the answer")
    return answer.payload


# ---------------------------------------------------------------------------------------------- helpers


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _chain_text(exc: BaseException) -> str:
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 10:
        parts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    return " | ".join(parts)
