"""p2p: meshtrain's networking layer, an asyncio facade over py-libp2p 0.8.1 running in a trio thread.

Layout: `_host.py` (the asyncio `Host`), `_bridge.py` (the only code crossing asyncio <-> trio),
`_node.py` (trio side: libp2p host, gossip readers), `_reqresp.py` (bounded request/response streams;
the server in `_reqserve.py`, kept streams in `_kept.py`),
`_framing.py` (sans-IO request/response framing), `_transfer.py` (sans-IO blob manifests and chunk plan),
`_blobs.py` / `_blobsink.py` / `_blobserve.py` (fetching and serving blobs), `_libp2p.py` (safe libp2p
construction and monkeypatches), `_speedups.py` (py-libp2p throughput workarounds), `_identity.py`
(Ed25519 seed files), `_errors.py` (the exception tree), `_nat.py` with `_autonat.py` and `_relay.py`
(NAT traversal), `_discovery.py` with `_providers.py` (run-scoped DHT discovery, bounded), `_mdns.py`,
`_gossip.py` and `_security.py` (who may talk, and how much). Only the names below are public.
"""

from p2p._blobs import BlobProgress
from p2p._blobserve import BlobLimits, BlobSource
from p2p._errors import (
    BlobNotFound,
    Busy,
    DiscoveryError,
    HostClosed,
    IntegrityError,
    MessageTooLarge,
    P2PError,
    PeerUnreachable,
    ProtocolNotSupported,
    ProtocolViolation,
    RemoteError,
    RequestTimeout,
    TransferFailed,
)
from p2p._host import GossipMessage, Host, HostConfig
from p2p._identity import Identity, load_or_create_identity, peer_id_from_public_key, public_key_from_peer_id
from p2p._libp2p import check_tcp_ports_free
from p2p._nat import NatConfig
from p2p._reqresp import RequestLimits
from p2p._security import (
    PeerLimits,
    SwarmKeyError,
    generate_swarm_key,
    load_swarm_key,
    parse_swarm_key,
    write_swarm_key,
)
from p2p._transfer import Manifest

__all__ = [
    "BlobLimits",
    "BlobNotFound",
    "BlobProgress",
    "BlobSource",
    "Busy",
    "DiscoveryError",
    "GossipMessage",
    "Host",
    "HostClosed",
    "HostConfig",
    "Identity",
    "IntegrityError",
    "Manifest",
    "MessageTooLarge",
    "NatConfig",
    "P2PError",
    "PeerLimits",
    "PeerUnreachable",
    "ProtocolNotSupported",
    "ProtocolViolation",
    "RemoteError",
    "RequestLimits",
    "RequestTimeout",
    "SwarmKeyError",
    "TransferFailed",
    "check_tcp_ports_free",
    "generate_swarm_key",
    "load_or_create_identity",
    "load_swarm_key",
    "parse_swarm_key",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "write_swarm_key",
]
