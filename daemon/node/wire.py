"""Messages of the daemon's own protocols, and their strict msgpack codecs.

Three protocols carry the model between nodes of one run, and a fourth says goodbye:

``/meshtrain/genesis/2``
    request ``GenesisRequest(run)``; response ``GenesisOffer``: the genesis's id, meta and fragment layout
    (what a joiner checks before it fetches anything) and the blob (``p2p.Host.fetch_blob``) that carries
    the stored genesis file: id, manifest root and size. A joiner fetches the genesis by content (its id is
    the hash), unless its own task initialization hashes to exactly that id (daemon/node/genesis.py).
``/meshtrain/sync/1``
    anti-entropy pull. Request: ``SyncRequest``: the caller's genesis id and :class:`crdt.Digest` (version
    vector + state hash). Response:
    ``SyncResponse``: the contributions the caller lacks (at most a batch) and the responder's digest, so
    the caller knows whether to pull again; ``snapshot_required`` when some of what the caller lacks was
    compacted away here, so only a snapshot can bring it up to date.
``/meshtrain/snapshot/2``
    request ``SyncRequest`` (the digest is ignored); response ``SnapshotOffer``: the checkpoints that attest
    the responder's snapshot and the blob that carries its snapshot file (the crdt.snapshot stream).
    Offered only when a quorum of the run's checkpoint signers attests it (else the request is refused as
    ``NoAttestedSnapshot``); the requester checks the quorum on the offer before it fetches a byte
    (crdt.check_attestation), and again on the fetched stream's header.

Bulk bytes never travel in these replies: a reply is capped (``p2p.RequestLimits``), a model is not. The
genesis and snapshots move as blobs (``/meshtrain/blob/2``: chunked, BLAKE3-verified, resumable, from
several peers at once); ``daemon/node/offers.py`` serves and fetches them.
``/meshtrain/push/3``
    request ``Push``: one new contribution of the sender's own, sent by its author straight to each
    connected member on a kept stream, with the sender's digest when this member has not had one from it
    within the anti-entropy period (``[sync] interval_s``), else an empty one; response: empty. The
    receiver learns what the sender holds, as from a pull (compaction waits for members by it), and the
    sender that the receiver now holds its record; members that train push to each other every round, so
    each learns the other's digest that way. Version 1 answered with the receiver's digest (1.4 % of a
    0.28M-parameter run's bytes); version 2 carried the sender's digest in every push (about 190 bytes, 1.3
    %). The receiver takes the record through the same door as a pulled one. It saves the announcement's
    gossip and the pull's request; a record too big for one request (``MAX_PUSH_BYTES``) is announced and
    pulled instead.
``/meshtrain/goodbye/1``
    request: the sender's last ``Heartbeat`` (training "leaving"); response: empty. Sent at shutdown
    straight to every connected peer, on top of the gossip heartbeat: gossip needs a mesh path at that
    moment, and a CI run showed two connected nodes whose gossip had stopped flowing one way.
gossip topic ``meshtrain/<run>/heartbeat``
    ``Heartbeat`` every few seconds: the sender's round, training state, reachability, capabilities
    (task, device kind) and measured throughput, shown per peer in status.
gossip topic ``meshtrain/<run>/checkpoint``
    an encoded :class:`crdt.Checkpoint` a checkpoint signer published (its own snapshot's state, or its
    countersignature of a fellow signer's); every node keeps the newest few per signer.
gossip topic ``meshtrain/<run>/announce``
    ``Announcement``: a small header per new contribution (author, seq, fragment, size, id). Receivers that
    lack it pull from the announcer. Gossip may drop; the periodic anti-entropy pull repairs what it misses.

Every decoder validates types and sizes and raises :class:`WireError` with the reason; nothing here trusts
the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "GENESIS_PROTOCOL",
    "GOODBYE_PROTOCOL",
    "PUSH_PROTOCOL",
    "SNAPSHOT_PROTOCOL",
    "SYNC_PROTOCOL",
    "Announcement",
    "BlobRef",
    "ForeignRun",
    "GenesisOffer",
    "GenesisRequest",
    "Heartbeat",
    "NoAttestedSnapshot",
    "Partitioned",
    "Push",
    "Refusal",
    "SnapshotOffer",
    "SyncRequest",
    "SyncResponse",
    "WireError",
    "announce_topic",
    "checkpoint_topic",
    "heartbeat_topic",
    "valid_gossip",
]

GENESIS_PROTOCOL = "/meshtrain/genesis/2"  # 1 answered with the whole genesis
SYNC_PROTOCOL = "/meshtrain/sync/1"
SNAPSHOT_PROTOCOL = "/meshtrain/snapshot/2"  # 1 answered with the whole snapshot
GOODBYE_PROTOCOL = "/meshtrain/goodbye/1"
PUSH_PROTOCOL = "/meshtrain/push/3"  # 1 answered with the receiver's digest; 2 always sent ours
WIRE_VERSION = 1
MAX_ANNOUNCEMENT_BYTES = 1024  # a header, never a payload: gossip caps messages at 1 MiB and is CPU-bound
MAX_SYNC_CONTRIBUTIONS = 4096
MAX_SYNC_REQUEST_BYTES = 4 << 20  # a version vector of ~100k authors
MAX_OFFER_BYTES = 4 << 20  # like a sync request: 256 checkpoints carry version vectors
MAX_OFFER_FRAGMENTS = 65536  # far above any [diloco] num_fragments
MAX_OFFER_META_ITEMS = 64  # crdt.Limits.max_meta_items
MAX_BLOB_ID_BYTES = 256  # "genesis/<hex id>" or "snapshot/<hex state hash>"
MAX_PUSH_BYTES = 4 << 20  # p2p.RequestLimits' default request cap: a bigger record is announced and pulled


def announce_topic(run: str) -> str:
    return f"meshtrain/{run}/announce"


def heartbeat_topic(run: str) -> str:
    return f"meshtrain/{run}/heartbeat"


def checkpoint_topic(run: str) -> str:
    return f"meshtrain/{run}/checkpoint"


class WireError(ValueError):
    """A peer sent a message that does not decode or validate."""


class Refusal(Exception):
    """A well-formed request this node declines to serve: not hostile, so not counted or penalized."""


class ForeignRun(Refusal):
    """The peer belongs to another run (another genesis): it is connected, but shares no model."""


class NoAttestedSnapshot(Refusal):
    """This node holds no snapshot that a quorum of the run's checkpoint signers attests: ask another."""


class Partitioned(Refusal):
    """This node exchanges no model data with the peer (fault injection: a partition drill)."""


def _unpack(data: bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a handful of unrelated types
        raise WireError(f"not msgpack: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError(f"expected a map, got {type(obj).__name__}")
    if obj.get("v") != WIRE_VERSION:
        raise WireError(f"unsupported wire version {obj.get('v')!r}")
    return obj


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise WireError(f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


@dataclass(frozen=True, slots=True)
class GenesisRequest:
    run: str

    def encode(self) -> bytes:
        return msgpack.packb({"v": WIRE_VERSION, "run": self.run})

    @classmethod
    def decode(cls, data: bytes) -> GenesisRequest:
        return cls(run=_field(_unpack(data, max_bytes=1024), "run", str))


MAX_SNAPSHOT_CHECKPOINTS = 256  # crdt.checkpoint.MAX_SIGNERS: one per signer of the run's policy


def _checkpoints(obj: dict[str, Any]) -> tuple[bytes, ...]:
    items = _field(obj, "checkpoints", list)
    if len(items) > MAX_SNAPSHOT_CHECKPOINTS or not all(isinstance(item, bytes) for item in items):
        raise WireError(f"checkpoints must be at most {MAX_SNAPSHOT_CHECKPOINTS} byte strings")
    return tuple(items)


@dataclass(frozen=True, slots=True)
class SyncRequest:
    genesis: str
    """Id of the requester's genesis: nodes of different runs never exchange contributions."""
    digest: bytes
    """The requester's encoded crdt.Digest."""
    attested: int = 0
    """Total of the newest vector a quorum of checkpoint signers attests, as the requester knows it (0:
    none): a responder that knows a newer one sends its checkpoints along."""

    def encode(self) -> bytes:
        return msgpack.packb(
            {"v": WIRE_VERSION, "genesis": self.genesis, "digest": self.digest, "attested": self.attested}
        )

    @classmethod
    def decode(cls, data: bytes) -> SyncRequest:
        obj = _unpack(data, max_bytes=MAX_SYNC_REQUEST_BYTES)
        attested = _field(obj, "attested", int)
        if attested < 0:
            raise WireError("attested must be >= 0")
        return cls(_field(obj, "genesis", str), _field(obj, "digest", bytes), attested=attested)


@dataclass(frozen=True, slots=True)
class SyncResponse:
    digest: bytes
    """The responder's encoded crdt.Digest."""
    contributions: tuple[bytes, ...]
    """Encoded crdt.Contribution records the requester lacks, in causal (per-author seq) order."""
    snapshot_required: bool = False
    """Part of what the requester lacks was compacted here: fetch a snapshot."""
    checkpoints: tuple[bytes, ...] = ()
    """Encoded crdt.Checkpoint records of the newest attested state, when the requester knows an older one
    (gossip is best effort: a node that missed every checkpoint would otherwise never compact)."""

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": WIRE_VERSION,
                "digest": self.digest,
                "contributions": list(self.contributions),
                "snapshot_required": self.snapshot_required,
                "checkpoints": list(self.checkpoints),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> SyncResponse:
        obj = _unpack(data)
        items = _field(obj, "contributions", list)
        if len(items) > MAX_SYNC_CONTRIBUTIONS:
            raise WireError(f"{len(items)} contributions exceed the limit of {MAX_SYNC_CONTRIBUTIONS}")
        if not all(isinstance(item, bytes) for item in items):
            raise WireError("contributions must be byte strings")
        return cls(
            digest=_field(obj, "digest", bytes),
            contributions=tuple(items),
            snapshot_required=_field(obj, "snapshot_required", bool),
            checkpoints=_checkpoints(obj),
        )


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where the bytes of an offer are: fetch ``blob`` with ``p2p.Host.fetch_blob(root=..., size=...)``
    from the peer that made the offer (and any other that offers the same root)."""

    blob: bytes
    """The blob id the offering peer serves it under."""
    root: bytes
    """``p2p.Manifest.root``: pins every chunk digest from the first byte."""
    size: int
    """Bytes of the blob."""

    def to_wire(self) -> dict[str, Any]:
        return {"blob": self.blob, "root": self.root, "size": self.size}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> BlobRef:
        blob, root, size = _field(obj, "blob", bytes), _field(obj, "root", bytes), _field(obj, "size", int)
        if not 0 < len(blob) <= MAX_BLOB_ID_BYTES or len(root) != 32 or size < 1:
            raise WireError("blob id, 32-byte manifest root and positive size required")
        return cls(blob=blob, root=root, size=size)


@dataclass(frozen=True, slots=True)
class GenesisOffer:
    """The run's genesis as a joiner checks it before fetching (``daemon.node.genesis.refusal`` reads
    ``id``, ``meta`` and ``fragments``, as it would of a :class:`crdt.Genesis`), and where its bytes are.
    The fetched genesis must then have exactly this id (the id hashes meta and layout too)."""

    id: str
    meta: dict[str, str]
    fragments: tuple[tuple[int, int], ...]
    ref: BlobRef

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": WIRE_VERSION, "id": self.id, "meta": self.meta,
            "fragments": [list(f) for f in self.fragments], **self.ref.to_wire(),
        })

    @classmethod
    def decode(cls, data: bytes) -> GenesisOffer:
        obj = _unpack(data, max_bytes=MAX_OFFER_BYTES)
        meta, frags = _field(obj, "meta", dict), _field(obj, "fragments", list)
        if len(meta) > MAX_OFFER_META_ITEMS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise WireError(f"meta must be at most {MAX_OFFER_META_ITEMS} strings to strings")
        if len(frags) > MAX_OFFER_FRAGMENTS or not all(
            isinstance(f, list) and len(f) == 2 and all(type(x) is int for x in f) for f in frags
        ):
            raise WireError(f"fragments must be at most {MAX_OFFER_FRAGMENTS} [start, stop] pairs")
        genesis_id = _field(obj, "id", str)
        if len(genesis_id) != 64 or genesis_id.strip("0123456789abcdef"):
            raise WireError("id must be a genesis id (64 lowercase hex digits)")
        return cls(id=genesis_id, meta=meta, fragments=tuple((a, b) for a, b in frags),
                   ref=BlobRef.from_wire(obj))


@dataclass(frozen=True, slots=True)
class SnapshotOffer:
    checkpoints: tuple[bytes, ...]
    """Encoded crdt.Checkpoint records attesting the snapshot's state (one per signer at most)."""
    ref: BlobRef
    """The snapshot stream (crdt.SnapshotReader reads it)."""

    def encode(self) -> bytes:
        return msgpack.packb({"v": WIRE_VERSION, "checkpoints": list(self.checkpoints), **self.ref.to_wire()})

    @classmethod
    def decode(cls, data: bytes) -> SnapshotOffer:
        obj = _unpack(data, max_bytes=MAX_OFFER_BYTES)
        checkpoints = _checkpoints(obj)
        if not checkpoints:
            raise WireError("a snapshot offer carries the checkpoints that attest it")
        return cls(checkpoints=checkpoints, ref=BlobRef.from_wire(obj))


@dataclass(frozen=True, slots=True)
class Announcement:
    author: bytes
    seq: int
    fragment: int
    size: int
    id: str

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": WIRE_VERSION,
                "author": self.author,
                "seq": self.seq,
                "fragment": self.fragment,
                "size": self.size,
                "id": self.id,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        obj = _unpack(data, max_bytes=MAX_ANNOUNCEMENT_BYTES)
        author = _field(obj, "author", bytes)
        if len(author) != 32:
            raise WireError("author must be a 32-byte public key")
        ints = {name: _field(obj, name, int) for name in ("seq", "fragment", "size")}
        if ints["seq"] < 1 or ints["fragment"] < 0 or ints["size"] < 0:
            raise WireError("seq, fragment and size out of range")
        return cls(author=author, id=_field(obj, "id", str), **ints)


MAX_HEARTBEAT_BYTES = 1024
_REACHABILITY = ("public", "private", "unknown")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    round: int
    contributions: int
    training: str
    reachability: str
    task: str
    device: str
    """"cpu" or "cuda": what the peer trains on (its capability)."""
    throughput_bps: int
    """Bytes per second this peer moved (sent + received) over its last heartbeat interval."""

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": WIRE_VERSION,
                "round": self.round,
                "contributions": self.contributions,
                "training": self.training,
                "reachability": self.reachability,
                "task": self.task,
                "device": self.device,
                "throughput_bps": self.throughput_bps,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat:
        obj = _unpack(data, max_bytes=MAX_HEARTBEAT_BYTES)
        ints = {name: _field(obj, name, int) for name in ("round", "contributions", "throughput_bps")}
        if min(ints.values()) < 0:
            raise WireError("round, contributions and throughput must not be negative")
        strings = {name: _field(obj, name, str) for name in ("training", "reachability", "task", "device")}
        if strings["reachability"] not in _REACHABILITY:
            raise WireError(f"reachability must be one of {_REACHABILITY}")
        return cls(**ints, **strings)


def valid_gossip(decode: Callable[[bytes], object]) -> Callable[[str, bytes], bool]:
    """A gossip topic validator: forward and deliver only messages that decode (schema and size)."""

    def validate(from_peer: str, data: bytes) -> bool:
        try:
            decode(data)
        except WireError:
            return False
        return True

    return validate


@dataclass(frozen=True, slots=True)
class Push:
    """One new contribution, from its author to a connected member (``/meshtrain/push/3``). No genesis
    field: the signed record names its run (74 bytes a push, 0.4 % of a 0.28M-parameter run's bytes)."""

    digest: bytes
    """The sender's encoded crdt.Digest, as a pull carries (compaction waits for members by it), or empty:
    the member had one from the sender within the anti-entropy period."""
    contribution: bytes
    """An encoded crdt.Contribution (decoded and checked by the receiver's replica)."""

    def encode(self) -> bytes:
        return msgpack.packb({"v": WIRE_VERSION, "digest": self.digest, "contribution": self.contribution})

    @classmethod
    def decode(cls, data: bytes) -> Push:
        obj = _unpack(data, max_bytes=MAX_PUSH_BYTES)
        return cls(*(_field(obj, name, bytes) for name in ("digest", "contribution")))
