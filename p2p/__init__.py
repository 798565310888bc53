"""p2p: meshtrain's networking layer, an asyncio facade over py-libp2p 0.8.1 running in a trio thread.

Layout: `_host.py` (the asyncio `Host`), `_bridge.py` (the only code crossing asyncio <-> trio),
`_node.py` (trio side: libp2p host, request/response streams, gossip readers), `_framing.py` (sans-IO
request/response framing), `_libp2p.py` (safe libp2p construction and monkeypatches), `_identity.py`
(Ed25519 seed files), `_errors.py` (the exception tree), `_nat.py` with `_autonat.py` and `_relay.py`
(NAT traversal), `_discovery.py` (run-scoped DHT discovery), `_gossip.py` and `_security.py` (who may
talk, and how much). Only the names below are public.
"""

from p2p._errors import (
    BlobNotFound,
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
from p2p._nat import NatConfig
from p2p._security import (
    PeerLimits,
    SwarmKeyError,
    generate_swarm_key,
    load_swarm_key,
    parse_swarm_key,
    write_swarm_key,
)
from p2p._transfer import BlobSource, Manifest

__all__ = [
    "BlobNotFound",
    "BlobSource",
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
    "RequestTimeout",
    "SwarmKeyError",
    "TransferFailed",
    "generate_swarm_key",
    "load_or_create_identity",
    "load_swarm_key",
    "parse_swarm_key",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "write_swarm_key",
]
