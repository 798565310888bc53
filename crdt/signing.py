"""Ed25519 signing: the author identity of contributions.

The 32-byte seed is the same secret as the node's libp2p Ed25519 identity, so a contribution's ``author``
(the raw 32-byte public key) maps 1:1 to a libp2p peer id. Ed25519 was chosen over ECDSA because
signatures are deterministic (no RNG inside crdt) and verification is fast (~50 us), and because libp2p
already uses it. ``cryptography`` (OpenSSL) is the only backend; its exceptions never leave this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crdt.errors import ValidationError

__all__ = ["PUBLIC_KEY_BYTES", "SEED_BYTES", "SIGNATURE_BYTES", "Signer", "verify_signature"]

#: RFC 8032 sizes.
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True, eq=False)
class Signer:
    """Holds an Ed25519 private key. Build it with :meth:`from_seed` (the constructor is private)."""

    _key: Ed25519PrivateKey = field(repr=False)
    public_key: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """Derive the key pair from a 32-byte seed. Raises ValidationError on a wrong-size seed."""
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ValidationError(f"Ed25519 seed must be {SEED_BYTES} bytes")
        key = Ed25519PrivateKey.from_private_bytes(seed)
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key, pub)

    def sign(self, msg: bytes) -> bytes:
        """Deterministic 64-byte Ed25519 signature of ``msg``."""
        return self._key.sign(msg)


def verify_signature(public_key: bytes, msg: bytes, sig: bytes) -> bool:
    """True iff ``sig`` is a valid Ed25519 signature of ``msg`` by ``public_key``; never raises."""
    if not (isinstance(public_key, bytes) and isinstance(sig, bytes) and isinstance(msg, bytes)):
        return False
    if len(public_key) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True
