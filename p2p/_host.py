"""`p2p.Host`: the asyncio facade over one libp2p node running in its own trio thread.

Threads and loops (the rules the daemon relies on):

* Create, start, use and close a Host from ONE asyncio event loop (the one running `start()`).
* Request handlers (`set_request_handler`) run as asyncio tasks on that loop. A handler that blocks the loop
  stalls the whole daemon, libp2p included for its bridged calls: do CPU work in executors/processes.
* Gossip messages arrive in per-subscriber `asyncio.Queue`s, filled on that loop. A full queue drops the
  message and counts it in ``stats()["gossip_dropped_queue_full"]``: gossip is best effort by design, and
  libp2p's own `publish()` never applies backpressure either.
* `aclose()` stops the trio thread (the libp2p host, its connections and tasks) and waits for it; in-flight
  `request()`s fail with HostClosed. Call it before the event loop closes (``async with`` does).

Several Hosts may live in one process (tests do this): each has its own trio thread and libp2p stack.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from p2p._blobs import BlobProgress, FetchStats, fetch_blob
from p2p._blobserve import BlobLimits, BlobSource
from p2p._bridge import TrioBridge
from p2p._errors import P2PError
from p2p._gossip import GossipValidator
from p2p._identity import Identity
from p2p._libp2p import DIAL_TIMEOUT_S
from p2p._nat import NatConfig
from p2p._node import GOSSIP_MAX_BYTES_LIMIT, NodeConfig, TrioNode
from p2p._reqresp import HandlerSpec, RequestHandler, RequestLimits
from p2p._security import SWARM_KEY_BYTES, PeerLimits
from p2p._transfer import Manifest

__all__ = ["DEFAULT_LISTEN_ADDRS", "GossipMessage", "Host", "HostConfig"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN_ADDRS = ("/ip4/127.0.0.1/tcp/0",)  # loopback, ephemeral port: safe default, opt in to 0.0.0.0
DEFAULT_GOSSIP_MAX_BYTES = 512 * 1024  # "well below 1 MiB": libp2p's limit includes the envelope
DEFAULT_GOSSIP_QUEUE_SIZE = 10_000  # per subscriber; at ~100 msg/s that is 100 s of backlog


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    """Tunables of a Host. The defaults suit a node on the internet (NAT traversal on, discovery dials only
    global addresses); a LAN or loopback cluster sets ``dial_private_addrs``."""

    requests: RequestLimits = field(default_factory=RequestLimits)
    """Request/response bounds: sizes, requests in flight per peer and in total, timeouts."""
    blobs: BlobLimits = field(default_factory=BlobLimits)
    """Blob serving and fetching bounds: sessions, chunk reads, stall deadline, pipelining depth."""
    gossip_max_bytes: int = DEFAULT_GOSSIP_MAX_BYTES
    """Largest gossip payload `publish()` accepts; at most 1 MiB minus envelope headroom."""
    gossip_queue_size: int = DEFAULT_GOSSIP_QUEUE_SIZE
    """Capacity of each `subscribe()` queue; overflow is dropped and counted."""
    dial_timeout_s: float = DIAL_TIMEOUT_S
    """`connect()` gives up after this long."""
    start_timeout_s: float = 30.0
    """`start()` gives up (and cleans up) if the libp2p host is not listening after this long."""
    close_timeout_s: float = 10.0
    """`aclose()` stops waiting for the trio thread after this long (it is a daemon thread)."""
    discovery_interval_s: float = 10.0
    """Period of the discovery loop while the run's view changes: re-dial bootstrap if needed, re-announce
    the run, find and dial peers."""
    discovery_max_interval_s: float = 300.0
    """Longest wait between discovery rounds once the view is settled (the wait doubles from
    ``discovery_interval_s``; p2p/_discovery.py ``DiscoveryPace``). Equal to it: a fixed period."""
    dial_private_addrs: bool = False
    """Let discovery dial private, loopback and link-local addresses that peers announce (p2p/_providers.py).
    Off for nodes on the internet (a peer could point the run at hosts inside your network); on for LAN
    clusters and loopback tests. Bootstrap addresses and `connect()` are never filtered."""
    nat: NatConfig = field(default_factory=NatConfig)
    """NAT traversal: AutoNAT, relay service and use, hole punching (p2p/_nat.py)."""
    mdns: bool = False
    """Announce this node by multicast DNS and dial the peers it hears (LAN only; every interface)."""
    swarm_key: bytes | None = field(default=None, repr=False)
    """32-byte private-network key (p2p/_security.py): only peers holding it can connect at all."""
    allow_peers: frozenset[str] | None = None
    """If set, only these peer ids may connect, send requests or author gossip (None: anyone)."""
    peer_limits: PeerLimits = field(default_factory=PeerLimits)
    """Connection bounds and per-peer request/gossip rates, penalties and bans."""

    def __post_init__(self) -> None:
        if not 0 < self.gossip_max_bytes <= GOSSIP_MAX_BYTES_LIMIT:
            raise ValueError(f"gossip_max_bytes must be in 1..{GOSSIP_MAX_BYTES_LIMIT}")
        if self.gossip_queue_size <= 0:
            raise ValueError("gossip_queue_size must be positive")
        if not 0 < self.discovery_interval_s <= self.discovery_max_interval_s:
            raise ValueError("discovery_interval_s must be positive and at most discovery_max_interval_s")
        if self.swarm_key is not None and len(self.swarm_key) != SWARM_KEY_BYTES:
            raise ValueError(f"swarm_key must be {SWARM_KEY_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """One gossip message: ``from_peer`` is the signed author (not the forwarding peer)."""

    from_peer: str
    data: bytes = field(repr=False)


class Host:
    """A libp2p node (Noise + Yamux + TCP, gossipsub) behind an asyncio API. See the module docstring."""

    def __init__(
        self,
        identity: Identity,
        *,
        listen_addrs: list[str] | tuple[str, ...] = DEFAULT_LISTEN_ADDRS,
        bootstrap: list[str] | tuple[str, ...] = (),
        run_id: str | None = None,
        config: HostConfig | None = None,
    ) -> None:
        """
        Args:
            identity: the node's key (see `load_or_create_identity`).
            listen_addrs: TCP multiaddrs to listen on (port 0 = ephemeral).
            bootstrap: full multiaddrs (ending /p2p/<id>) dialled at start and whenever none is connected.
            run_id: if set, run a Kademlia DHT (server mode), announce this node under the run's key and keep
                dialling the run's other providers; a node that knows one bootstrap peer finds the rest.
            config: tunables (`HostConfig`).
        """
        self.identity = identity
        self.config = config or HostConfig()
        self._handlers: dict[str, HandlerSpec] = {}
        self._subscribers: dict[str, list[asyncio.Queue[GossipMessage]]] = {}
        self._gossip_dropped = 0
        self._fetch_stats = FetchStats()
        self._fetches: list[BlobProgress] = []
        node_config = NodeConfig(
            listen_addrs=tuple(listen_addrs),
            gossip_max_bytes=self.config.gossip_max_bytes,
            requests=self.config.requests,
            blobs=self.config.blobs,
            dial_timeout_s=self.config.dial_timeout_s,
            bootstrap=tuple(bootstrap),
            run_id=run_id,
            discovery_interval_s=self.config.discovery_interval_s,
            discovery_max_interval_s=self.config.discovery_max_interval_s,
            dial_private_addrs=self.config.dial_private_addrs,
            nat=self.config.nat,
            swarm_key=self.config.swarm_key,
            allow_peers=self.config.allow_peers,
            peer_limits=self.config.peer_limits,
            mdns=self.config.mdns,
        )
        self._node = TrioNode(
            identity, node_config, handlers=self._handlers, gossip_sink=self._deliver_gossip
        )
        self._bridge: TrioBridge[TrioNode] = TrioBridge(self._node.open, name=f"p2p-{identity.peer_id[-8:]}")
        self._node.bridge = self._bridge
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def start(self) -> None:
        """Start the trio thread, listen, join gossipsub. Raises P2PError (e.g. address in use)."""
        if self._started:
            raise RuntimeError("Host.start() called twice")
        self._started = True
        try:
            await self._bridge.start(timeout_s=self.config.start_timeout_s)
        except TimeoutError as exc:
            raise P2PError(f"libp2p host did not start within {self.config.start_timeout_s} s") from exc
        except P2PError:
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise P2PError(f"libp2p host failed to start: {_describe(exc)}") from exc
        # Handlers/topics added while the thread was starting may have missed its registration pass.
        for protocol in self._handlers:
            self._bridge.call_soon_in_trio(self._node.register_protocol, protocol)
        for topic in self._subscribers:
            self._ensure_subscribed(topic)
        log.info("p2p host started peer=%s addrs=%s", self.peer_id, self.listen_addrs())

    async def aclose(self) -> None:
        """Stop libp2p and the trio thread; idempotent. In-flight calls fail with HostClosed."""
        await self._bridge.aclose(timeout_s=self.config.close_timeout_s)

    async def __aenter__(self) -> Host:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def listen_addrs(self) -> list[str]:
        """Full multiaddrs, each ending in /p2p/<peer id> (empty before start)."""
        return list(self._node.listen_addrs)

    # ------------------------------------------------------------------ connections

    async def connect(self, maddr: str) -> str:
        """Dial ``maddr`` (must end in /p2p/<id>); returns the peer id. Raises PeerUnreachable, ValueError."""
        return await self._bridge.run(self._node.connect, maddr)

    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection right now (a snapshot)."""
        return self._node.connected_peers()

    def run_peers(self) -> list[str]:
        """Connected peers that announced our ``run_id`` in the DHT (empty without ``run_id``).

        Use this, not `connected_peers()`, to pick run members: DHT routing also connects us to peers of
        other runs that share a bootstrap node.
        """
        announced = self._node.discovery_stats.run_peers
        return [p for p in self.connected_peers() if p in announced]

    # ------------------------------------------------------------------ request/response

    def set_request_handler(
        self,
        protocol: str,
        handler: RequestHandler,
        *,
        max_request_bytes: int | None = None,
        keep_streams: bool = False,
    ) -> None:
        """Serve ``protocol``: ``await handler(peer_id, request) -> response`` on this asyncio loop.

        An exception in the handler is sent back as RemoteError(type name, message); it never kills the Host.
        ``max_request_bytes`` bounds this protocol's requests (default ``config.requests.max_request_bytes``);
        a bigger one is refused on its header with MessageTooLarge. Requests in flight are bounded per peer
        and in total (``config.requests``): the excess is refused at once, the requester sees `p2p.Busy`.
        ``keep_streams``: a stream may carry one request after another (``request(keep_stream=True)``),
        within ``config.requests``' bounds of kept streams. Replacing a handler is allowed; may be called
        before or after start().
        """
        if not protocol.startswith("/"):
            raise ValueError(f"protocol ids start with '/': {protocol!r}")
        if max_request_bytes is not None and not 0 < max_request_bytes < 2**32:
            raise ValueError("max_request_bytes must be in 1..2**32-1 (u32 frame length)")
        new = protocol not in self._handlers
        self._handlers[protocol] = HandlerSpec(handler, max_request_bytes, keep_streams)
        if new and self._bridge.is_open:
            self._bridge.call_soon_in_trio(self._node.register_protocol, protocol)

    async def request(
        self,
        peer_id: str,
        protocol: str,
        data: bytes,
        *,
        timeout_s: float,
        max_response_bytes: int | None = None,
        keep_stream: bool = False,
    ) -> bytes:
        """Send one request and wait for its response.

        ``max_response_bytes`` bounds the response (default ``config.requests.max_response_bytes``, 64 MiB);
        bulk data belongs in blobs (`serve_file` / `fetch_blob`). ``keep_stream``: on the stream kept to
        this peer for this protocol (p2p/_kept.py), for frequent idempotent requests of a protocol served
        with ``keep_streams``: a request on a stream that broke is sent again on a new one, so the peer
        may see it twice.

        Raises:
            RequestTimeout: no response within ``timeout_s`` (dial + transfer + remote handler).
            Busy: the peer refused at once (too many requests in flight there); retry later.
            RemoteError: the remote handler raised.
            PeerUnreachable / ProtocolNotSupported: no connection/stream could be made.
            MessageTooLarge: ``data`` exceeds ``config.requests.max_request_bytes``, or the response exceeds
                ``max_response_bytes``.
            HostClosed: the Host is not running.
        """
        payload = data if type(data) is bytes else bytes(data)  # no 64 MB copy on the loop for plain bytes
        return await self._bridge.run(
            self._node.request, peer_id, protocol, payload, timeout_s, max_response_bytes, keep_stream
        )

    # ------------------------------------------------------------------ blobs (p2p/_blobs.py, _blobserve.py)

    async def serve_file(
        self,
        blob_id: bytes,
        path: str | Path,
        *,
        manifest: Manifest | None = None,
        pace: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Serve the file at ``path`` as blob ``blob_id`` over `/meshtrain/blob/2`; returns its manifest.

        The file is hashed once, here, in a worker thread (skipped when ``manifest`` is one computed earlier
        for this same file, e.g. stored beside it), then chunks are read from disk on demand (os.pread in a
        worker thread): the file is never held in memory. The file must not change while served: write
        each new version to a new file and serve it under a new id (a changed file is refused, not served).
        Serving again under the same id replaces the previous source. ``pace``: see `BlobSource.from_file`
        (called with each chunk's length in a worker thread before it is read; may block to cap the rate).
        """
        source = await asyncio.to_thread(BlobSource.from_file, path, manifest=manifest, pace=pace)
        self._node.blobs.add(blob_id, source)
        return source.manifest

    def serve_blob(self, blob_id: bytes, source: BlobSource) -> Manifest:
        """Serve an in-memory blob (``BlobSource.from_bytes(data)``) as ``blob_id``; returns its manifest."""
        self._node.blobs.add(blob_id, source)
        return source.manifest

    def unserve_blob(self, blob_id: bytes) -> None:
        """Stop offering ``blob_id`` (sessions already open finish the chunks they asked for)."""
        self._node.blobs.remove(blob_id)

    def served_blobs(self) -> dict[bytes, Manifest]:
        return self._node.blobs.served()

    async def fetch_blob(
        self,
        blob_id: bytes,
        *,
        peers: list[str] | tuple[str, ...],
        root: bytes | None = None,
        digest: bytes | None = None,
        size: int | None = None,
        max_bytes: int | None = None,
        dest: str | Path | None = None,
        progress: BlobProgress | None = None,
        timeout_s: float | None = None,
    ) -> memoryview | Path:
        """Fetch a blob from ``peers`` at once, verified chunk by chunk (BLAKE3) and as a whole.

        Args:
            blob_id: the id the serving peers registered the blob under.
            peers: connected peers that may hold it; chunks are pulled from all of them at once, and a peer
                that fails (unreachable, refuses, stalls past ``config.blobs.chunk_timeout_s``, sends a bad
                chunk or manifest) is dropped with a reason while the others go on.
            root: `Manifest.root` if known in advance (e.g. from a signed announcement): a manifest that is
                not exactly this one is refused, so every chunk digest is trusted from the first byte.
            digest: `Manifest.digest` (BLAKE3-256 of the whole blob) if known; checked on the manifest and
                again on the reassembled bytes. Without root or digest the first manifest is trusted.
            size: expected size in bytes, if known. max_bytes: refuse manifests announcing more.
            dest: write to this path (through ``<dest>.part``, fsynced, renamed) and return it; memory stays
                at peers x ``config.blobs.fetch_depth`` x chunk size whatever the blob's size, and a blob
                that does not fit on the disk is refused. After a failure, a cancellation or a restart,
                calling again with the same ``dest`` re-verifies the part file and fetches only the missing
                chunks. None: return the blob in memory, assembled as it arrives (no final copy; at most
                ``config.blobs.max_memory_bytes``), as a writable memoryview of its own anonymous mapping:
                bytes-like (``len``, slicing, ``==`` with bytes, hashing, writing to a file; ``bytes(blob)``
                copies it), freed with its last reference.
            progress: a `BlobProgress` to update as the fetch goes (also listed by `blob_fetches()`).
            timeout_s: deadline of the whole fetch (None: none; stalled peers are dropped anyway).

        Raises:
            BlobNotFound: no peer produced an acceptable manifest (``.peer_errors`` says why per peer).
            TransferFailed: every peer was dropped, or the deadline passed (``.peer_errors``,
                ``.chunks_done``/``.chunks_total``).
            IntegrityError: the verified chunks do not add up to the manifest's whole-blob digest.
            OSError: the destination could not be written.
        """
        progress = progress if progress is not None else BlobProgress()
        self._fetches.append(progress)
        try:
            return await self._bridge.run(
                functools.partial(
                    fetch_blob,
                    self._node,
                    blob_id,
                    peers=list(peers),
                    root=root,
                    digest=digest,
                    size=size,
                    max_bytes=max_bytes,
                    dest=Path(dest) if dest is not None else None,
                    timeout_s=timeout_s,
                    limits=self.config.blobs,
                    progress=progress,
                    stats=self._fetch_stats,
                )
            )
        finally:
            self._fetches.remove(progress)

    def blob_fetches(self) -> list[dict[str, Any]]:
        """`BlobProgress.as_dict()` of every fetch in progress: bytes done/total, rate, sources, dropped."""
        return [p.as_dict() for p in list(self._fetches)]

    # ------------------------------------------------------------------ gossip

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on ``topic`` (best effort, no backpressure); MessageTooLarge over the bound."""
        await self._bridge.run(self._node.publish, topic, data if type(data) is bytes else bytes(data))

    def subscribe(self, topic: str) -> asyncio.Queue[GossipMessage]:
        """A new queue receiving every later message on ``topic`` from other peers (not our own publishes)."""
        queue: asyncio.Queue[GossipMessage] = asyncio.Queue(maxsize=self.config.gossip_queue_size)
        self._subscribers.setdefault(topic, []).append(queue)
        if self._bridge.is_open:
            self._ensure_subscribed(topic)
        return queue

    def unsubscribe(self, topic: str, queue: asyncio.Queue[GossipMessage]) -> None:
        """Stop delivering to ``queue`` (the libp2p subscription stays; it is cheap)."""
        queues = self._subscribers.get(topic, [])
        if queue in queues:
            queues.remove(queue)

    def set_topic_validator(self, topic: str, fn: GossipValidator | None) -> None:
        """Validate every message on ``topic`` with ``fn(from_peer, data) -> bool`` before it is delivered
        to our subscribers or forwarded to other peers (None removes it).

        ``from_peer`` is the signed author (strict signing is on, so the signature is already checked).
        Runs synchronously in the p2p (trio) thread, for remote messages and our own publishes alike: keep it
        fast, non-blocking and read-only (see p2p/_gossip.py). False or an exception rejects the message,
        counts it in ``stats()["gossip_rejected_invalid"]`` and lowers the forwarding peer's gossip score.
        """
        self._node.validators.set(topic, fn)
        self._bridge.call_soon_in_trio(self._node.validators.install, topic)

    def set_gossip_admission(self, predicate: Callable[[str], bool] | None) -> None:
        """Admit gossip authored by a peer only if ``predicate(peer_id)`` (None admits every author).

        For open runs, where any key may join the mesh: the daemon answers "is this peer a member of my
        run?" (e.g. it synced with our genesis). Asked for every message from another author, before its
        signature is checked and before it is delivered or forwarded, synchronously in the p2p (trio)
        thread: it must be a cheap, non-blocking, read-only lookup. False (or an exception) drops the
        message without charging the peer that forwarded it, counted in
        ``stats()["gate"]["dropped_gossip_not_admitted"]``. The allowlist (``HostConfig.allow_peers``) is
        checked first.
        """
        self._node.gate.gossip_admission = predicate

    def gossip_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to ``topic`` (useful to wait for the mesh before publishing)."""
        return self._node.topic_peers(topic)

    def _ensure_subscribed(self, topic: str) -> None:
        self._bridge.call_soon_in_trio(self._node.ensure_subscribed, topic)

    def _deliver_gossip(self, topic: str, from_peer: str, data: bytes) -> None:  # asyncio loop
        message = GossipMessage(from_peer=from_peer, data=data)
        for queue in self._subscribers.get(topic, ()):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._gossip_dropped += 1

    # ------------------------------------------------------------------ peer scoring

    def penalize(self, peer_id: str) -> None:
        """Score ``peer_id`` down for misbehaviour (e.g. it sent an invalid record); enough penalties
        within the window ban and disconnect it (HostConfig.peer_limits)."""
        if self._bridge.is_open:
            self._bridge.call_soon_in_trio(self._node.penalize, peer_id)

    def banned_peers(self) -> list[str]:
        return self._node.gate.banned_peers()

    # ------------------------------------------------------------------ stats

    # ------------------------------------------------------------------ NAT traversal

    def reachability(self) -> str:
        """AutoNAT's verdict: "public", "private" or "unknown" (no verdict yet, or autonat off)."""
        return self._node.reachability()

    def peer_connections(self) -> dict[str, str]:
        """Connected peer id -> "direct" or "relayed" (through a Circuit Relay v2 relay), a snapshot."""
        return self._node.peer_connections()

    def nat_status(self) -> dict[str, Any]:
        """What the daemon's status/doctor report about NAT traversal (a snapshot).

        Keys: reachability, connections (peer -> "direct"/"relayed"), relay_addrs (ours, full), relays (peers
        holding our reservation), autonat_verdicts (server -> reachable?), relay_service (mode, active,
        reservations and circuits served now, limits, counters), config (the `NatConfig`), counters.
        """
        nat = self._node.nat
        described = nat.describe() if nat is not None else {}
        return {
            "reachability": self.reachability(),
            "connections": self.peer_connections(),
            **described,
            "relay_addrs": [f"{a}/p2p/{self.peer_id}" for a in described.get("relay_addrs", [])],
        }

    def stats(self) -> dict[str, Any]:
        """Counters since start: payload bytes of requests/responses/gossip, request and gossip counts.

        Keys: bytes_sent, bytes_received, requests_sent, requests_received, requests_failed,
        requests_refused_busy, requests_timed_out, kept_streams_opened (ours, p2p/_kept.py),
        kept_streams_open (peers' kept streams here now), blob_* (fetching and serving), gossip_published,
        gossip_received, gossip_dropped_queue_full, connected_peers, discovery_rounds,
        discovery_round_errors, discovery_dials_ok, discovery_dials_failed, discovery_refused_addrs,
        discovery_refused_providers, discovery_failed; "gate" (p2p/_security.py counters).
        """
        out: dict[str, Any] = dict(self._node.stats.as_dict())
        out["gossip_dropped_queue_full"] = self._gossip_dropped
        out.update(self._fetch_stats.as_dict())
        out.update(self._node.blobs.counters)
        out.update(self._node.requests.counters)
        out["kept_streams_open"] = self._node.requests.kept.count
        out.update(self._node.validators.as_dict())
        out.update(self._node.discovery_stats.as_dict())
        out["discovery_failed"] = self._node.discovery_failed
        out["connected_peers"] = len(self.connected_peers())
        out["reachability"] = self.reachability()
        out["gate"] = self._node.gate.stats()
        return out


def _describe(exc: BaseException) -> str:
    """One line for an exception, looking inside trio's ExceptionGroups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
