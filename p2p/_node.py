"""The trio side of a Host: the libp2p stack, request/response streams and gossip readers.

Everything in this module runs in the Host's trio thread (see `p2p/_bridge.py`). Methods are called through
`TrioBridge.run` from the asyncio facade (`p2p/_host.py`) and already raise `p2p` errors: libp2p and trio
exceptions are converted here, at the boundary, chained with ``from``.

Request/response: one libp2p stream per request, one REQUEST frame in, one RESPONSE or ERROR frame out
(`p2p/_framing.py`). The remote handler is an asyncio coroutine, awaited from trio via
`TrioBridge.call_asyncio`. Payload writes go out in 1 MiB slices (the notes measured 64 KiB writes at 97 MB/s
and 1 MiB at 152 MB/s) and reads ask for at most 1 MiB so the decoder never holds more than the frame itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import ProtocolNotSupportedError
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p._discovery import DiscoveryStats, run_discovery
from p2p._errors import (
    HostClosed,
    MessageTooLarge,
    P2PError,
    PeerUnreachable,
    ProtocolNotSupported,
    ProtocolViolation,
    RemoteError,
    RequestTimeout,
)
from p2p._framing import (
    Frame,
    FrameDecoder,
    FrameKind,
    decode_error_payload,
    encode_error_payload,
    encode_header,
)
from p2p._gossip import GossipValidators
from p2p._identity import Identity
from p2p._libp2p import GOSSIP_ENVELOPE_HEADROOM_BYTES, build_gossipsub, build_host, check_tcp_ports_free
from p2p._mdns import run_mdns_dialer
from p2p._nat import NatConfig, NatService, is_relayed_addr
from p2p._security import GateNotifee, PeerGate, PeerLimits

if TYPE_CHECKING:
    from p2p._bridge import TrioBridge

__all__ = ["NodeConfig", "NodeStats", "TrioNode"]

log = logging.getLogger(__name__)

IO_CHUNK_BYTES = 1024 * 1024  # write/read slice: see module docstring
GOSSIP_MAX_BYTES_LIMIT = 1024 * 1024 - GOSSIP_ENVELOPE_HEADROOM_BYTES  # libp2p drops >= 1 MiB incl. envelope

RequestHandler = Callable[[str, bytes], Awaitable[bytes]]
GossipSink = Callable[[str, str, bytes], None]  # (topic, from_peer, data), called on the asyncio loop


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Trio-side knobs (the public `p2p.HostConfig` maps onto this)."""

    listen_addrs: tuple[str, ...]
    max_message_bytes: int
    gossip_max_bytes: int
    handler_timeout_s: float
    dial_timeout_s: float
    bootstrap: tuple[str, ...] = ()
    run_id: str | None = None
    discovery_interval_s: float = 10.0
    dial_private_addrs: bool = False
    nat: NatConfig = field(default_factory=NatConfig)
    swarm_key: bytes | None = field(default=None, repr=False)
    allow_peers: frozenset[str] | None = None
    peer_limits: PeerLimits = field(default_factory=PeerLimits)
    mdns: bool = False


class NodeStats:
    """Counters written only by the trio thread; the asyncio side reads them (int reads are atomic)."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "gossip_published",
        "gossip_received",
        "requests_failed",
        "requests_received",
        "requests_sent",
    )

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests_sent = 0
        self.requests_received = 0
        self.requests_failed = 0
        self.gossip_published = 0
        self.gossip_received = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def parse_peer_id(peer_id: str) -> ID:
    """Base58 peer id -> libp2p ID. Raises ValueError on garbage (a caller bug, not a network error)."""
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:  # base58 raises ValueError, multihash may raise others
        raise ValueError(f"not a peer id: {peer_id!r}") from exc


class TrioNode:
    """Owns the libp2p host, pubsub and their tasks. Create in asyncio, `open()` in the trio thread."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        *,
        handlers: dict[str, RequestHandler],
        gossip_sink: GossipSink,
    ) -> None:
        self.identity = identity
        self.config = config
        self.stats = NodeStats()
        self.discovery_stats = DiscoveryStats()
        self.gate = PeerGate(allow_peers=config.allow_peers, limits=config.peer_limits)
        self.validators = GossipValidators(self.gate)  # author admission + per-topic checks (p2p/_gossip.py)
        self.bridge: TrioBridge[TrioNode] | None = None  # set by the Host before start
        self._handlers = handlers  # owned by the asyncio Host; read here (dict reads are atomic)
        self._gossip_sink = gossip_sink
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._nursery: trio.Nursery | None = None
        self._topics: set[str] = set()
        self.listen_addrs: list[str] = []
        self.discovery_failed = False
        self.nat: NatService | None = None  # set while running when config.nat.enabled (p2p/_nat.py)

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def open(self) -> AsyncIterator[TrioNode]:
        """Run the libp2p host and gossipsub until the context exits (the bridge's stop event)."""
        addrs = [multiaddr.Multiaddr(a) for a in self.config.listen_addrs]
        check_tcp_ports_free(addrs)
        limits = self.config.peer_limits
        host = build_host(
            self.identity,
            addrs,
            swarm_key=self.config.swarm_key,
            max_connections=limits.max_connections,
            max_inbound_connections=limits.max_inbound_connections,
            mdns=self.config.mdns,
        )
        pubsub, router = build_gossipsub(host)
        try:
            async with (
                host.run(addrs),
                background_trio_service(pubsub),
                background_trio_service(router),
                trio.open_nursery() as nursery,
            ):
                await pubsub.wait_until_ready()
                self._host, self._pubsub, self._nursery = host, pubsub, nursery
                self.validators.attach(pubsub)
                host.get_network().register_notifee(GateNotifee(self.gate, nursery))
                self.listen_addrs = [str(a) for a in host.get_addrs()]
                for protocol in list(self._handlers):
                    self.register_protocol(protocol)
                if self.config.nat.enabled:  # before discovery: it falls back to relayed dials
                    self.nat = NatService(host, self.config.nat)
                    await nursery.start(self.nat.run)
                if self.config.bootstrap or self.config.run_id is not None:
                    nursery.start_soon(self._supervise_discovery)
                if self.config.mdns:
                    nursery.start_soon(run_mdns_dialer, host, self.dial_peer_info)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
                    self._host = self._pubsub = self._nursery = None
        finally:
            # libp2p 0.8.1 bug: Pubsub's seen-message cache starts a sweeper thread that nothing stops, so
            # every Pubsub leaks a thread. stop() sets its event and joins (immediate).
            pubsub.seen_messages.stop()

    @property
    def host(self) -> IHost:
        """The running libp2p host (trio thread only). Raises HostClosed when not running."""
        return self._require_host()

    async def _supervise_discovery(self) -> None:
        """Owner of the discovery task: a crash is logged once and discovery is marked failed."""
        try:
            await run_discovery(
                self,
                run_id=self.config.run_id,
                bootstrap=self.config.bootstrap,
                interval_s=self.config.discovery_interval_s,
                stats=self.discovery_stats,
                allow_private=self.config.dial_private_addrs,
            )
        except Exception:
            self.discovery_failed = True
            log.exception("discovery task crashed run=%s", self.config.run_id)

    def _require_host(self) -> IHost:
        if self._host is None:
            raise HostClosed("libp2p host is not running")
        return self._host

    # ------------------------------------------------------------------ connections

    async def connect(self, maddr: str) -> str:
        host = self._require_host()
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:
            raise ValueError(f"not a dialable multiaddr with /p2p/<peer id>: {maddr!r}") from exc
        if info.peer_id == host.get_id():
            raise ValueError("refusing to dial ourselves")
        if not self.gate.admit_connection(info.peer_id.to_base58()):
            raise PeerUnreachable(f"{info.peer_id} is not an allowed member (or is banned)")
        if is_relayed_addr(maddr):  # libp2p's swarm never dials /p2p-circuit (p2p/_nat.py, bug 1)
            if self.nat is None or not await self.nat.dial_relayed(info.peer_id, info.addrs):
                raise PeerUnreachable(f"relayed dial {maddr} failed (use_relays off, or no circuit)")
            return info.peer_id.to_base58()
        self.forget_dial_failure(info.peer_id)
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                await host.connect(info)
        except trio.TooSlowError as exc:
            raise PeerUnreachable(f"dial {maddr} timed out after {self.config.dial_timeout_s} s") from exc
        except (BaseLibp2pError, OSError) as exc:
            raise PeerUnreachable(f"dial {maddr} failed: {exc}") from exc
        return info.peer_id.to_base58()

    def forget_dial_failure(self, peer_id: ID) -> None:
        """Make the next dial to ``peer_id`` real.

        libp2p 0.8.1's swarm keeps a 60 s negative cache: after one failed dial, every dial to that peer fails
        instantly with "recently failed all addresses", even once the peer is back (a restarted bootstrap
        node would be unreachable for a minute). Our dials are explicit or paced by discovery, so we clear it.
        """
        network = self._require_host().get_network()
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None:
            unblock(peer_id)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (best effort; used for non-members and banned peers)."""
        host = self._host
        if host is None:
            return
        with trio.move_on_after(2.0):
            try:
                await host.disconnect(parse_peer_id(peer_id))
            except Exception as exc:  # already gone, or libp2p cleanup failing: nothing more to do
                log.debug("disconnect failed peer=%s error=%r", peer_id, exc)

    def penalize(self, peer_id: str) -> None:
        """Score a peer down; enough penalties ban and disconnect it (see p2p/_security.py)."""
        if self.gate.penalize(peer_id) and self._nursery is not None:
            self._nursery.start_soon(self.disconnect, peer_id)

    async def dial_peer_info(self, info: PeerInfo) -> None:
        """Dial a discovered peer at exactly ``info.addrs``, direct or /p2p-circuit. Raises on failure.

        A peer that advertises /p2p-circuit addrs holds a relay slot because AutoNAT told it it is private:
        its direct addrs are most likely unreachable (a dropped SYN costs the whole dial timeout). The same
        holds when we are private ourselves. Then the relay goes first (our own relays too, where the peer
        most likely holds a slot as well) and DCUtR upgrades the link to direct where the NATs allow.
        Only the given addresses are dialled, not libp2p's peerstore (it collects whatever peers announce;
        discovery chose these, p2p/_providers.py).
        """
        nat = self.nat
        circuits = [a for a in info.addrs if is_relayed_addr(a)]
        if (
            nat is not None
            and nat.config.use_relays
            and (circuits or nat.status == "private")
            and await nat.dial_relayed(info.peer_id, circuits)
        ):
            return
        try:
            await self._dial_addrs(info.peer_id, [a for a in info.addrs if not is_relayed_addr(a)])
            return
        except PeerUnreachable:
            if nat is None or not nat.config.use_relays:
                raise
        if not await nat.dial_relayed(info.peer_id, info.addrs):
            raise PeerUnreachable(f"{info.peer_id}: direct and relayed dials failed")

    async def _dial_addrs(self, peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        """Dial ``peer_id`` at these addresses, one at a time; PeerUnreachable if none answers."""
        network = self._require_host().get_network()
        if network.connections.get(peer_id):
            return
        errors: list[str] = []
        for addr in addrs:
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    conn = await network.dial_addr(addr, peer_id)
                    started = getattr(conn, "event_started", None)
                    if started is not None:
                        await started.wait()  # muxer up and stream handlers ready, as host.connect waits
                return
            except (trio.TooSlowError, BaseLibp2pError, OSError) as exc:
                errors.append(f"{addr}: {exc!r}")
        raise PeerUnreachable(f"{peer_id}: no direct address answered ({'; '.join(errors) or 'none known'})")

    def reachability(self) -> str:
        """AutoNAT verdict: "public", "private" or "unknown" (always "unknown" with autonat off)."""
        return self.nat.status if self.nat is not None else "unknown"

    def peer_connections(self) -> dict[str, str]:
        host = self._host
        if host is None:
            return {}
        if self.nat is not None:
            return self.nat.peer_connections()
        return {p.to_base58(): "direct" for p in host.get_connected_peers()}

    def connected_peers(self) -> list[str]:
        host = self._host
        if host is None:
            return []
        return [p.to_base58() for p in host.get_connected_peers()]

    # ------------------------------------------------------------------ request/response: client

    async def request(self, peer_id: str, protocol: str, data: bytes, timeout_s: float) -> bytes:
        if len(data) > self.config.max_message_bytes:
            raise MessageTooLarge(f"request of {len(data)} bytes > max_message_bytes")
        pid = parse_peer_id(peer_id)
        self.stats.requests_sent += 1
        try:
            with trio.move_on_after(timeout_s) as scope:
                return await self._request(pid, protocol, data)
        except P2PError as exc:
            self.stats.requests_failed += 1
            if scope.cancel_called and not isinstance(exc, RemoteError):
                raise RequestTimeout(
                    f"request {protocol} to {peer_id} timed out after {timeout_s} s"
                ) from exc
            raise
        self.stats.requests_failed += 1
        raise RequestTimeout(f"request {protocol} to {peer_id} timed out after {timeout_s} s")

    async def _request(self, pid: ID, protocol: str, data: bytes) -> bytes:
        stream = await self._open_stream(pid, protocol)
        ok = False
        try:
            await self._write_frame(stream, FrameKind.REQUEST, data)
            decoder = FrameDecoder(
                max_message_bytes=self.config.max_message_bytes,
                expected=frozenset({FrameKind.RESPONSE, FrameKind.ERROR}),
            )
            frame = await self._read_frame(stream, decoder)
            ok = True
        finally:
            await _finish_stream(stream, ok=ok)
        if frame.kind is FrameKind.ERROR:
            raise RemoteError(*decode_error_payload(frame.payload))
        return frame.payload

    async def _open_stream(self, pid: ID, protocol: str) -> INetStream:
        host = self._require_host()
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

    # ------------------------------------------------------------------ request/response: server

    def register_protocol(self, protocol: str) -> None:
        """Install our stream handler for ``protocol`` (the asyncio handler is looked up per request)."""
        host = self._host
        if host is None:
            return  # registered at open()

        async def on_stream(stream: INetStream) -> None:
            await self._serve(stream, protocol)

        host.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve(self, stream: INetStream, protocol: str) -> None:
        peer_id = stream.muxed_conn.peer_id.to_base58()
        ok = False
        refusal = self.gate.admit_request(peer_id)
        if refusal is not None:  # refused before reading the payload: a flood costs us one header
            log.debug("request refused peer=%s protocol=%s reason=%s", peer_id, protocol, refusal)
            with trio.move_on_after(1.0):
                try:
                    await self._write_frame(stream, FrameKind.ERROR, encode_error_payload(refusal, protocol))
                    ok = True
                except P2PError:
                    pass
            await _finish_stream(stream, ok=ok)
            if self.gate.is_banned(peer_id) or not self.gate.is_member(peer_id):
                await self.disconnect(peer_id)
            return
        try:
            with trio.move_on_after(self.config.handler_timeout_s):
                ok = await self._serve_one(stream, protocol, peer_id)
        except P2PError as exc:  # the peer went away or broke framing: nothing to answer
            log.debug("request stream failed peer=%s protocol=%s error=%r", peer_id, protocol, exc)
        finally:
            await _finish_stream(stream, ok=ok)

    async def _serve_one(self, stream: INetStream, protocol: str, peer_id: str) -> bool:
        decoder = FrameDecoder(
            max_message_bytes=self.config.max_message_bytes, expected=frozenset({FrameKind.REQUEST})
        )
        try:
            frame = await self._read_frame(stream, decoder)
        except MessageTooLarge as exc:
            payload = encode_error_payload("MessageTooLarge", str(exc))
            await self._write_frame(stream, FrameKind.ERROR, payload)
            return True
        self.stats.requests_received += 1
        handler = self._handlers.get(protocol)
        assert self.bridge is not None
        try:
            if handler is None:
                raise ProtocolNotSupported(f"no handler for {protocol}")
            response = await self.bridge.call_asyncio(handler, peer_id, frame.payload)
            if not isinstance(response, bytes | bytearray | memoryview):
                raise TypeError(f"request handler returned {type(response).__name__}, not bytes")
            response = bytes(response)
            if len(response) > self.config.max_message_bytes:
                raise MessageTooLarge(f"response of {len(response)} bytes > max_message_bytes")
        except Exception as exc:  # the handler's failure is reported to the requester, and logged once here
            log.warning("request handler failed peer=%s protocol=%s", peer_id, protocol, exc_info=True)
            payload = encode_error_payload(type(exc).__name__, str(exc))
            await self._write_frame(stream, FrameKind.ERROR, payload)
            return True
        await self._write_frame(stream, FrameKind.RESPONSE, response)
        return True

    # ------------------------------------------------------------------ framing I/O

    async def _write_frame(self, stream: INetStream, kind: FrameKind, payload: bytes) -> None:
        header = encode_header(kind, len(payload), max_message_bytes=self.config.max_message_bytes)
        try:
            if len(payload) <= IO_CHUNK_BYTES:
                await stream.write(header + payload)
            else:
                await stream.write(header)
                for off in range(0, len(payload), IO_CHUNK_BYTES):
                    await stream.write(payload[off : off + IO_CHUNK_BYTES])
        except (BaseLibp2pError, OSError) as exc:
            raise PeerUnreachable(f"stream write failed: {exc}") from exc
        self.stats.bytes_sent += len(payload)

    async def _read_frame(self, stream: INetStream, decoder: FrameDecoder) -> Frame:
        while (frame := decoder.next_frame()) is None:
            try:
                chunk = await stream.read(min(decoder.bytes_wanted, IO_CHUNK_BYTES))
            except StreamEOF as exc:
                if decoder.in_frame:
                    raise ProtocolViolation("stream ended in the middle of a frame") from exc
                raise PeerUnreachable("stream closed before a frame arrived") from exc
            except (BaseLibp2pError, OSError) as exc:
                raise PeerUnreachable(f"stream read failed: {exc}") from exc
            if not chunk:
                raise PeerUnreachable("stream closed before a complete frame arrived")
            decoder.feed(chunk)
        self.stats.bytes_received += len(frame.payload)
        return frame

    # ------------------------------------------------------------------ gossip

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > self.config.gossip_max_bytes:
            raise MessageTooLarge(
                f"gossip message of {len(data)} bytes > gossip_max_bytes={self.config.gossip_max_bytes}"
            )
        pubsub = self._pubsub
        if pubsub is None:
            raise HostClosed("libp2p host is not running")
        try:
            await pubsub.publish(topic, data)
        except BaseLibp2pError as exc:
            raise PeerUnreachable(f"publish to {topic} failed: {exc}") from exc
        self.stats.gossip_published += 1
        self.stats.bytes_sent += len(data)

    def ensure_subscribed(self, topic: str) -> None:
        """Start a reader for ``topic`` unless one runs (sync: scheduled from the bridge or at open)."""
        if topic in self._topics or self._nursery is None:
            return
        self._topics.add(topic)
        self._nursery.start_soon(self._read_topic, topic)

    def topic_peers(self, topic: str) -> list[str]:
        pubsub = self._pubsub
        if pubsub is None:
            return []
        return [p.to_base58() for p in pubsub.peer_topics.get(topic, ())]

    async def _read_topic(self, topic: str) -> None:
        """Forward every gossip message on ``topic`` to the asyncio side (drop accounting happens there)."""
        assert self._pubsub is not None and self.bridge is not None
        subscription = await self._pubsub.subscribe(topic)
        me = self.identity.peer_id
        async for msg in subscription:
            try:
                from_peer = ID(msg.from_id).to_base58()
            except Exception:  # unparseable author: pubsub validated the signature, so this is not expected
                log.debug("gossip message with bad author dropped topic=%s", topic)
                continue
            if from_peer == me:  # libp2p delivers our own publishes to our own subscription
                continue
            self.stats.gossip_received += 1
            self.stats.bytes_received += len(msg.data)
            self.bridge.call_soon_in_asyncio(self._gossip_sink, topic, from_peer, msg.data)


# ---------------------------------------------------------------------------------------------- helpers


async def _finish_stream(stream: INetStream, *, ok: bool) -> None:
    """Close (half-close on yamux) after a clean exchange, reset otherwise; never raises or blocks long."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            if ok:
                await stream.close()
            else:
                await stream.reset()
        except Exception as exc:  # the stream is dead either way; nothing left to do with it
            log.debug("stream cleanup failed error=%r", exc)


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
