"""Everything that configures py-libp2p 0.8.1: safe host construction, gossipsub knobs, monkeypatches, logs.

Never use py-libp2p's defaults (see /work/shared/notes/py-libp2p-0.8.1.md §0, §5):

* security: a default host accepts ``/plaintext/2.0.0`` and secio, and a plaintext dialer holding only a
  victim's *public* key can impersonate it. We pass ``sec_opt`` with Noise ONLY.
* muxer: Yamux only (Mplex is 5x slower and deprecated); transport: TCP only (QUIC is 4-5 MB/s and was seen
  silently truncating stream tails).
* ``max_connections_per_peer=1``: the default (3) adds a flat 250 ms happy-eyeballs wait to every connect.
* gossipsub: spam protection (10 msg/s/topic, applied to our own publishes too) off; heartbeat at the
  spec's 1 s instead of 120 s; the hard-coded 32-slot outbound and subscription queues enlarged; v1.1
  without v1.2's IDONTWANT, and the sender's peer record in the hello only (below).

Everything in this module runs (or is constructed) in the Host's trio thread, except the import-time patches.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import libp2p.pubsub.pubsub as _lp_pubsub
import multiaddr
from libp2p import new_host
from libp2p.abc import IHost, IRawConnection
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import ConnectionType
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize, RpcQueue
from libp2p.rcmgr import new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from p2p._errors import P2PError
from p2p._gossip import score_params
from p2p._identity import Identity

__all__ = [
    "GOSSIP_ENVELOPE_HEADROOM_BYTES",
    "build_gossipsub",
    "build_host",
    "check_tcp_ports_free",
    "quiet_libp2p_logging",
]

# ---------------------------------------------------------------------------------------------- constants

GOSSIP_QUEUE_SLOTS = 4096  # was 32 (hard-coded) in both queues: 1000 unpaced messages then arrive 1000/1000
# libp2p counts the 1 MiB gossip limit *including* the signed envelope and drops larger RPCs silently;
# we refuse payloads that could come near it (keys, signature, seqno, topic are ~200 B; be generous).
GOSSIP_ENVELOPE_HEADROOM_BYTES = 64 * 1024
# Not v1.2: its IDONTWANT is sent by py-libp2p 0.8.1 to every mesh peer for every message received, however
# small (go-libp2p: only for messages of 1 KiB or more, where it saves a duplicate). All our gossip is under
# 1 KiB, so v1.2 only added control traffic: with this and the record below, gossipsub's bytes in a 4-daemon
# convergence run fell from 452 to 166 KB per 40 contributions (bench/convergence, 2026-12-01).
GOSSIP_PROTOCOLS = (PROTOCOL_ID_V11, PROTOCOL_ID)
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 6, 4, 12  # the gossipsub spec's D, D_lo, D_hi
GOSSIP_HEARTBEAT_S = 1  # spec default; libp2p ships 120 s
DIAL_TIMEOUT_S = 10.0  # per connection attempt (ConnectionConfig.dial_timeout default)

# Loggers that report routine peer behaviour (a peer closing a DHT stream, a relay probe) at WARNING/ERROR.
NOISY_LOGGERS = (
    "libp2p.kad_dht",
    "libp2p.relay",
    "libp2p.pubsub",
    "libp2p.security.secio",
    "libp2p.host.basic_host",
    "libp2p.network",
    "libp2p.stream_muxer",
    "libp2p.discovery",
    "libp2p.transport",  # "Failed to open TCP stream" at ERROR for every refused dial
    "libp2p.protocol_muxer",  # "handshake: read failed" at ERROR when a peer closes during negotiation
)

# ---------------------------------------------------------------------------------------------- monkeypatches

# py-libp2p 0.8.1 hard-codes 32-slot queues that drop without error when full: the per-peer outbound RPC
# queue (`RpcQueue(max_size=OutBoundQueueSize)`, the default is bound at definition time, so patching the
# module constant has no effect: we patch the function defaults) and the per-subscription channel
# (`SUBSCRIPTION_CHANNEL_SIZE`, read at call time from the pubsub module). Measured: 16/1000 delivered with
# the defaults when unpaced, 1000/1000 with these enlarged. Revisit when upgrading libp2p.
RpcQueue.__init__.__defaults__ = (GOSSIP_QUEUE_SLOTS, DefaultMaxMessageSize)
_lp_pubsub.SUBSCRIPTION_CHANNEL_SIZE = GOSSIP_QUEUE_SLOTS  # type: ignore[attr-defined]

# py-libp2p 0.8.1 bug: one-way gossip loss between two connected peers. When a pubsub stream to a peer dies
# while the peer stays connected (a stream reset, or the stream lived on a second connection that closed,
# e.g. the relayed one DCUtR replaced), `Pubsub._handle_dead_peer` forgets the peer's topic subscriptions,
# then reopens *our* stream with *our* hello. The peer's subscriptions are re-learned only from the peer's
# hello, which it sends only if it saw a stream of its own die: its read side ends silently
# (`continuously_read_stream` swallows StreamError/EOF). So we stop sending it anything, for good, while
# requests between us keep working (seen once in CI: node 0 stopped receiving node 1's heartbeats). A
# subscription belongs to the peer, not to the stream: while the peer is connected we keep it (libp2p still
# forgets it on disconnect, which also runs `_handle_dead_peer`). Test: tests/p2p/test_gossip.py
# (test_stock_pubsub_loses_a_connected_peer_after_a_stream_reset shows the bug).
_stock_handle_dead_peer = Pubsub._handle_dead_peer


def _handle_dead_peer_keeping_subscriptions(self: Pubsub, peer_id: ID) -> None:
    if not self._peer_is_connected(peer_id):
        _stock_handle_dead_peer(self, peer_id)
        return
    kept = [topic for topic, peers in self.peer_topics.items() if peer_id in peers]
    count = self._peer_subscription_count.get(peer_id)
    _stock_handle_dead_peer(self, peer_id)
    for topic in kept:
        self.peer_topics.setdefault(topic, set()).add(peer_id)
    if count is not None:
        self._peer_subscription_count[peer_id] = count


Pubsub._handle_dead_peer = _handle_dead_peer_keeping_subscriptions  # type: ignore[method-assign]

# py-libp2p 0.8.1 puts the sender's signed peer record (a ~200-byte envelope, which the receiver verifies:
# one ed25519 check) into every gossipsub RPC: each publish, each forward, each control message. A peer
# learns that record from identify once per connection and from our hello once per pubsub stream (written
# directly, not through `write_msg`); every other copy but those of subscription changes is dropped here,
# before the RPC is serialized.
# A receiver accepts an RPC without one (`maybe_consume_signed_record` checks only a record present).
# Test: tests/p2p/test_gossip.py (test_gossip_rpcs_carry_the_sender_record_only_in_the_hello).
_stock_write_msg = Pubsub.write_msg


async def _write_msg_without_repeated_record(self: Pubsub, stream: Any, rpc_msg: Any) -> bool:
    if not rpc_msg.subscriptions and rpc_msg.HasField("senderRecord"):
        rpc_msg.ClearField("senderRecord")
    return await _stock_write_msg(self, stream, rpc_msg)


Pubsub.write_msg = _write_msg_without_repeated_record  # type: ignore[method-assign]

# py-libp2p 0.8.1's yamux sends a WINDOW_UPDATE after every read of a stream that is not at its full window
# (its "partial slack" and "release on read" branches), however few bytes the read took. Each is a
# 12-byte frame in an 18-byte Noise envelope and a TCP segment of its own: in a 4-daemon training run,
# 5,131 of 9,135 frames were window updates (154 KB beside 566 KB of model payloads; bench/convergence,
# 2026-12-01), mostly one per small request or gossip read. We hand the library its reads only once they
# add up to WINDOW_RELEASE_MIN_BYTES, so a short request/response stream sends none and a gossip stream
# one per 32 KiB. Not half the window, as go-yamux does: py-libp2p's sender polls an empty send window
# every 10 ms and its window auto-tuning grows only with frequent updates, so bulk streams fell from 444
# to 42 MB/s (bench/bench_p2p.py); a bulk read (64 KiB and more) is released at once, as before.
# Test: tests/p2p/test_libp2p.py.
WINDOW_RELEASE_MIN_BYTES = 32 * 1024  # an eighth of yamux's initial 256 KiB window
_stock_window_update = YamuxStream._auto_tune_and_send_window_update


async def _window_update_batched(self: YamuxStream, *, bytes_read: int = 0) -> None:
    unreleased = getattr(self, "_meshtrain_unreleased", 0) + bytes_read
    if 0 < unreleased < WINDOW_RELEASE_MIN_BYTES:
        self._meshtrain_unreleased = unreleased  # type: ignore[attr-defined]
        return
    self._meshtrain_unreleased = 0  # type: ignore[attr-defined]
    await _stock_window_update(self, bytes_read=unreleased)


YamuxStream._auto_tune_and_send_window_update = _window_update_batched  # type: ignore[method-assign]

# py-libp2p 0.8.1 bug: with a swarm key every connection's raw layer is a `PskConn`, a RawConnection subclass
# that never calls RawConnection.__init__ and delegates only read/write/close/get_remote_address. So
# get_transport_addresses() and get_connection_type() raise on every connection of a private network: AutoNAT
# servers then "fail closed" and refuse every request as if it were relayed (reachability never becomes
# known), and relayed connections cannot be told from direct ones. We delegate both to the wrapped
# connection. Test: tests/p2p/test_nat.py (test_stock_psk_conn_hides_its_transport).


def _psk_transport_addresses(self: PskConn) -> list[multiaddr.Multiaddr]:
    return self._conn.get_transport_addresses()


def _psk_connection_type(self: PskConn) -> ConnectionType:
    return self._conn.get_connection_type()


_stock_psk_transport_addresses = PskConn.get_transport_addresses
PskConn.get_transport_addresses = _psk_transport_addresses  # type: ignore[method-assign]
PskConn.get_connection_type = _psk_connection_type  # type: ignore[method-assign]

# py-libp2p 0.8.1 bug: hole punching never works in a private network. `Swarm.dial_addr_as_responder` (the
# DCUtR dial of the side that upgrades as responder) wraps the raw connection in the swarm key, then hands it
# to `upgrade_inbound_raw_conn`, which wraps it again: that side sends two nonces, the other side decrypts
# garbage, the Noise handshake stalls and every punch times out (seen in tests/netns/test_nat_netns.py with a
# swarm key: TCP simultaneous open succeeded, then 5 s of silence, then FIN). Nothing was read or written
# through the first wrapper, so we unwrap it and let the upgrade wrap once. Test: tests/p2p/test_nat.py
# (test_stock_responder_dial_wraps_the_swarm_key_twice).
_stock_upgrade_inbound_raw_conn = Swarm.upgrade_inbound_raw_conn


async def _upgrade_inbound_wrapping_once(
    self: Swarm, raw_conn: IRawConnection, maddr: multiaddr.Multiaddr
) -> Any:
    if self.psk is not None and isinstance(raw_conn, PskConn):
        raw_conn = raw_conn._conn
    return await _stock_upgrade_inbound_raw_conn(self, raw_conn, maddr)


Swarm.upgrade_inbound_raw_conn = _upgrade_inbound_wrapping_once  # type: ignore[method-assign]


def quiet_libp2p_logging(level: int = logging.ERROR) -> None:
    """Route libp2p's logs through the application's logging config, at ``level`` and up.

    libp2p's own `setup_logging()` (run at import) detaches its logger (propagate=False, no handler), so its
    warnings reach stderr through logging's last-resort handler. Leave it alone when LIBP2P_DEBUG is set:
    then the user asked for libp2p's own debug logging.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    root = logging.getLogger("libp2p")
    root.setLevel(level)
    root.propagate = True
    # Some modules pin their own level at import (auto_connector: INFO); make them inherit instead.
    for name, child in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


quiet_libp2p_logging()

# ---------------------------------------------------------------------------------------------- builders


def build_host(
    identity: Identity,
    listen_addrs: list[multiaddr.Multiaddr],
    *,
    swarm_key: bytes | None = None,
    max_connections: int = 256,
    max_inbound_connections: int = 128,
    mdns: bool = False,
) -> IHost:
    """A libp2p host with Noise-only security, Yamux, TCP, one connection per peer.

    ``swarm_key`` (32 bytes) makes it a private network (libp2p pnet, see p2p/_security.py): peers without
    the same key cannot complete a handshake. The connection bounds go to ConnectionConfig and to the
    resource manager (py-libp2p creates one by default; we give it explicit connection limits).
    """
    key_pair = identity.key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},  # NOT the default: that accepts plaintext and secio
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen_addrs,
        enable_quic=False,
        enable_tcp=True,
        enable_mDNS=mdns,  # LAN discovery; p2p/_mdns.py dials what it finds
        enable_upnp=False,
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            dial_timeout=DIAL_TIMEOUT_S,
            # The auto-connector otherwise dials up to 50 peerstore entries (incl. every DHT-learned peer)
            # every 10 s; who we connect to is the daemon's/discovery's decision, not libp2p's.
            min_connections=0,
            low_watermark=0,
            max_connections=max_connections,
            high_watermark=max_connections,
        ),
        resource_manager=new_resource_manager(
            connection_limits=ConnectionLimits(
                max_established_inbound=max_inbound_connections,
                max_established_total=max_connections,
                # one each way while a simultaneous dial resolves, plus a relayed one that DCUtR is upgrading
                # (at 2 the hole-punched connection was refused: "Established per peer limit exceeded")
                max_established_per_peer=3,
            )
        ),
        psk=swarm_key.hex() if swarm_key is not None else None,
    )


def build_gossipsub(host: IHost) -> tuple[Pubsub, GossipSub]:
    """GossipSub router + Pubsub with spam protection off and the spec's heartbeat."""
    router = GossipSub(
        protocols=list(GOSSIP_PROTOCOLS),
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        heartbeat_interval=GOSSIP_HEARTBEAT_S,
        spam_protection_enabled=False,
        # Eclipse protection wants >= 3 distinct IPs in the mesh; every test and LAN cluster shares one IP.
        eclipse_protection_enabled=False,
        score_params=score_params(),  # v1.1 scoring; libp2p's defaults are all-zero weights (off)
    )
    # strict_signing is libp2p's default, but it is what authenticates gossip authors: pin it.
    return Pubsub(host, router, strict_signing=True), router


def check_tcp_ports_free(listen_addrs: list[multiaddr.Multiaddr]) -> None:
    """Fail fast if a fixed TCP listen port is already taken.

    libp2p 0.8.1 listens with SO_REUSEPORT (for TCP hole punching), so a second daemon on the same port does
    NOT get EADDRINUSE: the kernel silently splits inbound connections between the two processes (Noise
    then fails half the dials on a peer-id mismatch). A plain bind without SO_REUSEPORT does conflict, so we
    probe each fixed port that way first. Port 0 (ephemeral) needs no check.
    """
    for addr in listen_addrs:
        protocols = {p.name for p in addr.protocols()}
        if "tcp" not in protocols:
            continue
        port = int(addr.value_for_protocol("tcp"))
        if port == 0:
            continue
        if "ip6" in protocols:
            family, host = socket.AF_INET6, addr.value_for_protocol("ip6")
        elif "ip4" in protocols:
            family, host = socket.AF_INET, addr.value_for_protocol("ip4")
        else:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR: connections of a previous process on this port linger in TIME_WAIT after it
            # exits (or is killed); they must not keep a restarted daemon from listening. Only a live
            # listener still conflicts.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise P2PError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
