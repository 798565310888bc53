"""The request server, trio side: serves inbound request streams within `RequestLimits` (p2p/_reqresp.py
has the bounds and why): one request per stream, or one after another on a kept stream."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from p2p._errors import MessageTooLarge, P2PError, ProtocolNotSupported
from p2p._framing import MAX_FRAME_BYTES, FrameDecoder, FrameKind, encode_error_payload
from p2p._reqresp import (
    READ_SLICE_BYTES,
    ByteCounters,
    HandlerSpec,
    InFlight,
    RequestHandler,
    RequestLimits,
    finish_stream,
    read_frame,
    write_frame,
)

if TYPE_CHECKING:
    from p2p._security import PeerGate

__all__ = ["RequestServer"]

log = logging.getLogger(__name__)

REFUSAL_WRITE_TIMEOUT_S = 1.0  # a refusal is one small frame; a peer that does not take it is not waited for


class RequestServer:
    """Serves inbound request streams within `RequestLimits` (see the module docstring)."""

    def __init__(
        self,
        limits: RequestLimits,
        *,
        handlers: Mapping[str, HandlerSpec],
        gate: PeerGate,
        stats: ByteCounters,
        run_handler: Callable[[RequestHandler, str, bytes], Awaitable[bytes]],
        disconnect: Callable[[str], Awaitable[None]],
    ) -> None:
        self.limits = limits
        self._handlers = handlers  # owned by the asyncio Host; read here (dict reads are atomic)
        self._gate = gate
        self._stats = stats
        self._run_handler = run_handler
        self._disconnect = disconnect
        self.in_flight = InFlight(per_peer=limits.max_in_flight_per_peer, total=limits.max_in_flight)
        self.kept = InFlight(per_peer=limits.max_kept_streams_per_peer, total=limits.max_kept_streams)
        """Kept streams open now (between requests or in one)."""
        self.counters = {"requests_refused_busy": 0, "requests_timed_out": 0}

    async def serve(self, stream: INetStream, protocol: str) -> None:
        """The libp2p stream handler of every request protocol: one request, or one after another on a
        kept stream (see the module docstring)."""
        peer_id = stream.muxed_conn.peer_id.to_base58()
        spec = self._handlers.get(protocol)
        kept = spec is not None and spec.keep_streams and self.kept.try_enter(peer_id)
        ok = refused = False
        try:
            first = b""
            while True:
                refusal = self._gate.admit_request(peer_id)
                if refusal is None and not self.in_flight.try_enter(peer_id):
                    refusal = "Busy"
                    self.counters["requests_refused_busy"] += 1
                if refusal is not None:
                    refused = True
                    await self._refuse(stream, peer_id, protocol, refusal)  # which ends the stream
                    return
                ok = reusable = False
                try:
                    with trio.move_on_after(self.limits.handler_timeout_s) as scope:
                        ok, reusable = await self._serve_one(stream, protocol, peer_id, first)
                    if scope.cancelled_caught:
                        self.counters["requests_timed_out"] += 1
                except P2PError as exc:  # the peer went away or broke framing: nothing to answer
                    log.debug("request stream failed peer=%s protocol=%s error=%r", peer_id, protocol, exc)
                finally:
                    self.in_flight.leave(peer_id)
                if not (ok and reusable and kept):
                    break
                first = await self._next_request(stream)
                if not first:  # the client closed it, or it idled out
                    break
        finally:
            if kept:
                self.kept.leave(peer_id)
            if not refused:
                await finish_stream(stream, ok=ok)

    async def _next_request(self, stream: INetStream) -> bytes:
        """The first bytes of a kept stream's next request; empty once it closed or idled out. What an idle
        timeout cancels mid-read is lost with the stream: the client sees it end unanswered and sends again
        on a new one."""
        with trio.move_on_after(self.limits.kept_idle_s):
            try:
                return await stream.read(READ_SLICE_BYTES)
            except (BaseLibp2pError, OSError):
                return b""
        return b""

    async def _refuse(self, stream: INetStream, peer_id: str, protocol: str, refusal: str) -> None:
        """Answer ``refusal`` without reading the payload: a flood costs us one header each."""
        log.debug("request refused peer=%s protocol=%s reason=%s", peer_id, protocol, refusal)
        ok = False
        with trio.move_on_after(REFUSAL_WRITE_TIMEOUT_S):
            try:
                payload = encode_error_payload(refusal, f"{protocol} refused: {refusal}")
                await write_frame(stream, FrameKind.ERROR, payload, self._stats)
                ok = True
            except P2PError:
                pass
        await finish_stream(stream, ok=ok)
        if self._gate.is_banned(peer_id) or not self._gate.is_member(peer_id):
            await self._disconnect(peer_id)

    async def _serve_one(
        self, stream: INetStream, protocol: str, peer_id: str, first: bytes = b""
    ) -> tuple[bool, bool]:
        """Read one request (``first``: its bytes already read) and answer it. Returns (answered: the
        exchange ended cleanly, reusable: the stream may carry another request; not after a request that
        was refused unread or bytes beyond it that came unasked)."""
        spec = self._handlers.get(protocol)
        max_bytes = self.limits.max_request_bytes
        if spec is not None and spec.max_request_bytes is not None:
            max_bytes = spec.max_request_bytes
        decoder = FrameDecoder(max_message_bytes=max_bytes, expected=frozenset({FrameKind.REQUEST}))
        decoder.feed(first)
        try:
            with trio.fail_after(self.limits.request_read_timeout_s):
                frame = await read_frame(stream, decoder, self._stats)
        except MessageTooLarge as exc:
            await write_frame(
                stream, FrameKind.ERROR, encode_error_payload("MessageTooLarge", str(exc)), self._stats
            )
            return True, False  # its payload is still on the way
        except trio.TooSlowError:
            self.counters["requests_timed_out"] += 1
            log.debug("request not received in time peer=%s protocol=%s", peer_id, protocol)
            return False, False
        self._stats.requests_received += 1
        try:
            if spec is None:
                raise ProtocolNotSupported(f"no handler for {protocol}")
            response = await self._run_handler(spec.handler, peer_id, frame.payload)
            if not isinstance(response, bytes | bytearray | memoryview):
                raise TypeError(f"request handler returned {type(response).__name__}, not bytes")
            if memoryview(response).nbytes > MAX_FRAME_BYTES:
                raise MessageTooLarge(f"response of {memoryview(response).nbytes} bytes > one frame")
        except Exception as exc:  # the handler's failure is reported to the requester, and logged once here
            log.warning("request handler failed peer=%s protocol=%s", peer_id, protocol, exc_info=True)
            payload = encode_error_payload(type(exc).__name__, str(exc))
            await write_frame(stream, FrameKind.ERROR, payload, self._stats)
            return True, not decoder.in_frame
        await write_frame(stream, FrameKind.RESPONSE, response, self._stats)
        return True, not decoder.in_frame  # a client sends its next request once answered
