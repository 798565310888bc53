"""crdt: the pure (sans-IO) replicated model state of meshtrain.

Layout (one concept per module; import the public names from ``crdt`` itself):

- ``errors``      the exception tree (CrdtError > ValidationError > ...)
- ``payload``     sparse / quantized update codecs (encode_payload, decode_payload; index codings in
                  ``_indices``, the exact DCT in ``_dct``)
- ``signing``     Ed25519 Signer / verify_signature
- ``records``     Limits, Genesis, Contribution, make_contribution, weighted_norm (the exact norm)
- ``vv``          VersionVector, Digest (decoders capped by max_authors)
- ``snapshot``    the compact streamed snapshot format: SnapshotHeader, SnapshotReader, Snapshot
- ``checkpoint``  signed Checkpoint records, CheckpointPolicy, check_attestation (the trust model)
- ``state``       ModelState (int64 fixed-point accumulator), ApplyOutcome, Decoded; its influence window in
                  ``_window``
- ``frozen``      FrozenState: a state frozen copy-on-write, hashed and encoded in another thread
- ``admission``   proof of work an open run may ask of each author (find_admission_nonce)
- ``log``         WAL framing and scan_log (bytes only; the files live in daemon/store.py)
- ``antientropy`` plan_sync, retention_floor
"""

from crdt.admission import admission_bits, find_admission_nonce
from crdt.antientropy import SyncPlan, plan_sync, retention_floor
from crdt.checkpoint import Checkpoint, CheckpointPolicy, check_attestation, make_checkpoint
from crdt.errors import (
    AttestationError,
    CapacityError,
    ConflictError,
    CrdtError,
    GapTooLargeError,
    GenesisMismatchError,
    HistoryPrunedError,
    SignatureError,
    ValidationError,
)
from crdt.frozen import FrozenState
from crdt.log import LOG_HEADER, MAX_RECORD_BYTES, LogScan, frame_record, scan_log, seal_blob, unseal_blob
from crdt.payload import (
    CHUNK_SIZE,
    CHUNKED_CODECS,
    CODECS,
    DCT_BLOCK,
    DEFAULT_CHUNK_BITS,
    DENSE_CODECS,
    MAX_LENGTH,
    RICE_CODECS,
    TRANSFORM_CODECS,
    dct_coefficients,
    decode_payload,
    encode_payload,
    payload_error_bound,
)
from crdt.records import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    MAX_AUTHORS,
    Contribution,
    Genesis,
    Limits,
    make_contribution,
    weighted_norm,
)
from crdt.signing import Signer, verify_signature
from crdt.snapshot import SNAPSHOT_MAGIC, Snapshot, SnapshotHeader, SnapshotReader
from crdt.state import QUANTUM, SCALE_BITS, ApplyOutcome, Decoded, ModelState
from crdt.vv import Digest, VersionVector

__all__ = [
    "CHUNKED_CODECS",
    "CHUNK_SIZE",
    "CODECS",
    "DCT_BLOCK",
    "DEFAULT_CHUNK_BITS",
    "DEFAULT_LIMITS",
    "DENSE_CODECS",
    "FORMAT_VERSION",
    "LOG_HEADER",
    "MAX_AUTHORS",
    "MAX_LENGTH",
    "MAX_RECORD_BYTES",
    "QUANTUM",
    "RICE_CODECS",
    "SCALE_BITS",
    "SNAPSHOT_MAGIC",
    "TRANSFORM_CODECS",
    "ApplyOutcome",
    "AttestationError",
    "CapacityError",
    "Checkpoint",
    "CheckpointPolicy",
    "ConflictError",
    "Contribution",
    "CrdtError",
    "Decoded",
    "Digest",
    "FrozenState",
    "GapTooLargeError",
    "Genesis",
    "GenesisMismatchError",
    "HistoryPrunedError",
    "Limits",
    "LogScan",
    "ModelState",
    "SignatureError",
    "Signer",
    "Snapshot",
    "SnapshotHeader",
    "SnapshotReader",
    "SyncPlan",
    "ValidationError",
    "VersionVector",
    "admission_bits",
    "check_attestation",
    "dct_coefficients",
    "decode_payload",
    "encode_payload",
    "find_admission_nonce",
    "frame_record",
    "make_checkpoint",
    "make_contribution",
    "payload_error_bound",
    "plan_sync",
    "retention_floor",
    "scan_log",
    "seal_blob",
    "unseal_blob",
    "verify_signature",
    "weighted_norm",
]
