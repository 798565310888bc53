"""crdt: the pure (sans-IO) replicated model state of meshtrain.

Layout: ``errors`` (the exception tree), ``payload`` (sparse/quantized update codecs). Everything public is
re-exported here; import from ``crdt`` rather than from the submodules.
"""

from crdt.errors import (
    ConflictError,
    CrdtError,
    GapTooLargeError,
    GenesisMismatchError,
    SignatureError,
    ValidationError,
)
from crdt.payload import CHUNK_SIZE, CODECS, MAX_LENGTH, decode_payload, encode_payload, payload_error_bound

__all__ = [
    "CHUNK_SIZE",
    "CODECS",
    "MAX_LENGTH",
    "ConflictError",
    "CrdtError",
    "GapTooLargeError",
    "GenesisMismatchError",
    "SignatureError",
    "ValidationError",
    "decode_payload",
    "encode_payload",
    "payload_error_bound",
]
