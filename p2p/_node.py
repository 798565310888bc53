"""The trio side of a Host: the libp2p stack, request/response streams and gossip readers.

Everything in this module runs in the Host's trio thread (see `p2p/_bridge.py`). Methods are called through
`TrioBridge.run` from the asyncio facade (`p2p/_host.py`) and already raise `p2p` errors: libp2p and trio
exceptions are converted here, at the boundary, chained with ``from``.

Request/response (one stream per request, bounded in size, time and requests in flight) lives in
`p2p/_reqresp.py`; blob serving (`/meshtrain/blob/2` sessions) in `p2p/_blobserve.py`; this module wires
both to the libp2p host. `p2p._speedups` (imported here) works around py-libp2p's throughput hot spots.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p import _speedups  # noqa: F401  (installs the py-libp2p throughput workarounds)
from p2p._blobserve import BLOB_PROTOCOL, BlobLimits, BlobServer
from p2p._discovery import DiscoveryPace, DiscoveryStats, run_discovery
from p2p._errors import HostClosed, MessageTooLarge, PeerUnreachable
from p2p._gossip import GossipValidators
from p2p._identity import Identity
from p2p._kept import KeptStreams
from p2p._libp2p import GOSSIP_ENVELOPE_HEADROOM_BYTES, build_gossipsub, build_host, check_tcp_ports_free
from p2p._mdns import run_mdns_dialer
from p2p._nat import NatConfig, NatService, is_relayed_addr
from p2p._reqresp import HandlerSpec, RequestHandler, RequestLimits, request
from p2p._reqserve import RequestServer
from p2p._security import GateNotifee, PeerGate, PeerLimits

if TYPE_CHECKING:
    from p2p._bridge import TrioBridge

__all__ = ["NodeConfig", "NodeStats", "TrioNode"]

log = logging.getLogger(__name__)

GOSSIP_MAX_BYTES_LIMIT = 1024 * 1024 - GOSSIP_ENVELOPE_HEADROOM_BYTES  # libp2p drops >= 1 MiB incl. envelope

GossipSink = Callable[[str, str, bytes], None]  # (topic, from_peer, data), called on the asyncio loop


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Trio-side knobs (the public `p2p.HostConfig` maps onto this)."""

    listen_addrs: tuple[str, ...]
    gossip_max_bytes: int
    dial_timeout_s: float
    requests: RequestLimits = field(default_factory=RequestLimits)
    blobs: BlobLimits = field(default_factory=BlobLimits)
    bootstrap: tuple[str, ...] = ()
    run_id: str | None = None
    discovery_interval_s: float = 10.0
    discovery_max_interval_s: float = 300.0
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
        "kept_streams_opened",
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
        self.kept_streams_opened = 0

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
        handlers: dict[str, HandlerSpec],
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
        self.requests = RequestServer(
            config.requests,
            handlers=handlers,
            gate=self.gate,
            stats=self.stats,
            run_handler=self._run_handler,
            disconnect=self.disconnect,
        )
        self.blobs = BlobServer(config.blobs, gate=self.gate)
        self._gossip_sink = gossip_sink
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._nursery: trio.Nursery | None = None
        self._kept: KeptStreams | None = None  # while running: the kept request streams (p2p/_kept.py)
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
                self._kept = KeptStreams(host, self.stats)
                self.validators.attach(pubsub)
                host.get_network().register_notifee(GateNotifee(self.gate, nursery))
                self.listen_addrs = [str(a) for a in host.get_addrs()]
                for protocol in list(self._handlers):
                    self.register_protocol(protocol)
                host.set_stream_handler(TProtocol(BLOB_PROTOCOL), self.blobs.serve)
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
                    await self._kept.close()
                    nursery.cancel_scope.cancel()
                    self._host = self._pubsub = self._nursery = self._kept = None
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
                pace=DiscoveryPace(self.config.discovery_interval_s, self.config.discovery_max_interval_s),
                stats=self.discovery_stats,
                allow_private=self.config.dial_private_addrs,
            )
        except Exception:
            self.discovery_failed = True
            log.exception("discovery task crashed run=%s", self.config.run_id)

    async def _run_handler(self, handler: RequestHandler, peer_id: str, data: bytes) -> bytes:
        assert self.bridge is not None  # set by the Host before start
        return await self.bridge.call_asyncio(handler, peer_id, data)

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

    # ------------------------------------------------------------------ request/response (p2p/_reqresp.py)

    async def request(
        self,
        peer_id: str,
        protocol: str,
        data: bytes,
        timeout_s: float,
        max_response_bytes: int | None,
        keep_stream: bool = False,
    ) -> bytes:
        return await request(
            self._require_host(),
            parse_peer_id(peer_id),
            protocol,
            data,
            timeout_s=timeout_s,
            max_response_bytes=max_response_bytes or self.config.requests.max_response_bytes,
            stats=self.stats,
            via=self._kept.exchange if keep_stream and self._kept is not None else None,
        )

    def register_protocol(self, protocol: str) -> None:
        """Install our stream handler for ``protocol`` (the asyncio handler is looked up per request)."""
        host = self._host
        if host is None:
            return  # registered at open()

        async def on_stream(stream: INetStream) -> None:
            await self.requests.serve(stream, protocol)

        host.set_stream_handler(TProtocol(protocol), on_stream)

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
