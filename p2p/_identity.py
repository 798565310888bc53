"""Node identity: a 32-byte Ed25519 seed on disk, shared with crdt's `Signer`.

The same seed is both the libp2p identity (peer id = identity multihash of the protobuf-encoded public key)
and the CRDT author key, so a contribution's author can be mapped to the peer that sent it. We store the raw
seed (not libp2p's protobuf or a PEM) because crdt takes raw seeds and the file is trivially auditable.

The file is created with O_EXCL and mode 0600 through a temp file + rename, so a crash never leaves a
half-written key and a concurrent second daemon cannot silently overwrite the first one's identity.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

__all__ = ["Identity", "load_or_create_identity", "peer_id_from_public_key", "public_key_from_peer_id"]

SEED_BYTES = 32  # RFC 8032 Ed25519 private key seed length
KEY_FILE_MODE = 0o600  # the seed is a secret: owner read/write only


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's Ed25519 identity.

    Attributes:
        seed: the 32-byte Ed25519 seed (secret).
        public_key: the 32 raw public-key bytes.
        peer_id: the libp2p peer id in base58 (``12D3KooW...``).
    """

    seed: bytes = field(repr=False)
    public_key: bytes
    peer_id: str

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Derive the identity from a 32-byte seed. Raises ValueError on a wrong length."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"Ed25519 seed must be {SEED_BYTES} bytes, got {len(seed)}")
        private = Ed25519PrivateKey.from_bytes(seed)
        public = private.get_public_key().to_bytes()
        return cls(seed=bytes(seed), public_key=public, peer_id=peer_id_from_public_key(public))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (not persisted)."""
        return cls.from_seed(secrets.token_bytes(SEED_BYTES))

    def key_pair(self) -> KeyPair:
        """libp2p's KeyPair for this identity (used inside the trio thread only)."""
        private = Ed25519PrivateKey.from_bytes(self.seed)
        return KeyPair(private, private.get_public_key())


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 public key inside a peer id (ours inline their key).

    Raises:
        ValueError: not a peer id, or not one of an Ed25519 key.
    """
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception as exc:  # base58, multihash and protobuf errors of several types
        raise ValueError(f"not a peer id: {peer_id!r}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"peer id {peer_id!r} does not hold an Ed25519 key")
    return key.to_bytes()


def load_or_create_identity(path: Path) -> Identity:
    """Load the seed at ``path``, or create one there (mode 0600) if the file does not exist.

    Raises:
        ValueError: the file exists but does not hold exactly 32 bytes.
        OSError: the file or its directory cannot be read/written.
    """
    path = Path(path)
    try:
        seed = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"identity file {path} holds {len(seed)} bytes, expected {SEED_BYTES}")
        return Identity.from_seed(seed)

    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.seed)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, KEY_FILE_MODE)  # in case the umask widened nothing but a pre-set ACL did
        # link() fails if someone created the file meanwhile: we then load theirs instead of clobbering it.
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_identity(path)
    finally:
        tmp.unlink(missing_ok=True)
    return identity
