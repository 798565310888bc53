"""Kept request streams, client side (trio): one request after another on one stream per peer and protocol.

Theory of operation
-------------------
A request of a ``keep_streams`` protocol (the server's side is p2p/_reqserve.py) goes on the stream
this node keeps to that peer for that protocol, opened at the first request and left open after each answer;
requests to one peer on one protocol wait for each other (one exchange at a time per stream). A new
stream costs a SYN, a FIN each way and the multistream negotiation: about 390 bytes in 9 Noise frames,
2 % of a 4-daemon training run's bytes when each pushed record opened its own (bench/convergence,
2026-12-02).

A kept stream ends when the server closes it (idle for its ``kept_idle_s``, over its bound of kept streams,
an older server that answers once) or when an exchange on it fails. A request that finds its kept stream
ended before any answer came is sent once more on a new stream, so the server may have received it twice
when the stream broke after its handler ran: kept streams are for idempotent requests (a pushed record
is a duplicate the second time). A failure on a new stream is the caller's, as for a plain request.

At most ``MAX_KEPT`` streams are kept; the least recently used one is closed to make room.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from p2p._errors import Busy, PeerUnreachable, RemoteError
from p2p._reqresp import ByteCounters, exchange, finish_stream, open_stream

__all__ = ["MAX_KEPT", "KeptStreams"]

#: Streams kept open at once by one node (one per member and kept protocol in the daemon).
MAX_KEPT = 64


class KeptCounters(ByteCounters, Protocol):
    kept_streams_opened: int
    """Streams opened for kept requests: one per peer and protocol, and one after each that ended."""


@dataclass
class _Kept:
    lock: trio.Lock = field(default_factory=trio.Lock)
    stream: INetStream | None = None


class KeptStreams:
    """The kept streams of one Host (trio thread only)."""

    def __init__(self, host: IHost, stats: KeptCounters) -> None:
        self._host = host
        self._stats = stats
        self._kept: OrderedDict[tuple[ID, str], _Kept] = OrderedDict()

    async def exchange(self, pid: ID, protocol: str, data: bytes, max_response_bytes: int) -> bytes:
        """One request on the kept stream to ``pid`` for ``protocol`` (see the module docstring). Raises
        as `p2p._reqresp.exchange`; the caller bounds the time (a cancelled exchange ends its stream)."""
        key = (pid, protocol)
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = _Kept()
            await self._evict()
        self._kept.move_to_end(key)
        async with kept.lock:
            while True:
                fresh = kept.stream is None
                if fresh:
                    kept.stream = await open_stream(self._host, pid, protocol)
                    self._stats.kept_streams_opened += 1
                stream, reusable = kept.stream, False
                try:
                    answer = await exchange(stream, data, max_response_bytes, self._stats)
                    reusable = True
                    return answer
                except RemoteError as exc:
                    reusable = not isinstance(exc, Busy)  # a refusal ends the stream; a handler's error not
                    raise
                except PeerUnreachable:
                    if fresh:
                        raise
                    # ended before an answer (closed idle, or answered once only): once more on a new one
                finally:
                    if not reusable or self._kept.get(key) is not kept:  # broken, or evicted meanwhile
                        kept.stream = None
                        await finish_stream(stream, ok=reusable)

    async def _evict(self) -> None:
        while len(self._kept) > MAX_KEPT:
            _, oldest = self._kept.popitem(last=False)
            if oldest.stream is not None and not oldest.lock.locked():
                stream, oldest.stream = oldest.stream, None
                await finish_stream(stream, ok=True)

    async def close(self) -> None:
        """Close every kept stream (the Host is stopping)."""
        kept, self._kept = list(self._kept.values()), OrderedDict()
        for entry in kept:
            if entry.stream is not None:
                stream, entry.stream = entry.stream, None
                await finish_stream(stream, ok=True)
