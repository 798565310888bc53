"""The store's file formats and durable writes: atomic replacement, the sealed genesis and snapshot
readers (also used on files fetched from peers), and the decoders of the small side files (members'
vectors, checkpoints, equivocation proofs). daemon/node/store.py owns the directory and when each file is
written; this module owns how a file is written and read back, strictly (a corrupt file is a named
error, never a crash).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import msgpack

import crdt

__all__ = [
    "GENESIS_KIND",
    "StoreError",
    "atomic_write",
    "decode_checkpoints",
    "decode_equivocation",
    "decode_peer_vectors",
    "fsync_dir",
    "publish_staged",
    "read_genesis",
    "read_snapshot",
    "stage_write",
]

GENESIS_KIND = b"GENESIS"  # the sealed genesis file's tag (crdt.seal_blob)
READ_CHUNK = 1 << 20  # the snapshot file is fed to crdt.SnapshotReader in pieces of this size


class StoreError(Exception):
    """The store cannot be opened or used (locked by another process, unreadable or foreign files)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Replace ``path`` with ``data`` (bytes, or parts written as they come): a reader sees the old or
    the new file, never a mix. A failed write (a full disk) leaves the old file and no temp file."""
    publish_staged(stage_write(path, data), path)


def stage_write(path: Path, data: bytes | Iterable[bytes]) -> Path:
    """The first half of :func:`atomic_write`: ``data`` written and synced beside ``path``, not yet in
    its place (a worker thread may do this half). Returns the staged file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for part in [data] if isinstance(data, bytes) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish_staged(staged: Path, path: Path) -> None:
    """The second half of :func:`atomic_write`: the staged file replaces ``path``, durably."""
    os.replace(staged, path)
    fsync_dir(path.parent)


def read_genesis(path: Path) -> crdt.Genesis:
    """The sealed genesis file at ``path`` (the store's, or one fetched from a peer), read through a
    memory map: two copies of the parameters at the peak (crdt.unseal_blob's, then the decoder's, which
    the genesis keeps) instead of three with read_bytes (12 bytes per parameter, on every start).

    Raises:
        StoreError: the file fails its checksum or does not decode.
    """
    try:
        with (open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
              memoryview(mapped) as view):
            payload = crdt.unseal_blob(GENESIS_KIND, view)  # checks the crc, and copies
        return crdt.Genesis.decode(payload)  # the parameters are a view of msgpack's copy
    except (crdt.ValidationError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise StoreError(f"{path}: {exc}") from exc


def read_snapshot(path: Path, genesis: crdt.Genesis, *, max_authors: int) -> crdt.Snapshot:
    """The snapshot stream in the file at ``path`` (the store's, or one fetched from a peer), fed to
    crdt.SnapshotReader in pieces: memory is the accumulator plus one piece. Call it in a worker thread
    when the model is big (it decompresses the whole accumulator).

    Raises:
        crdt.ValidationError: not a snapshot of ``genesis``, or its content does not match its hash.
        OSError: the file cannot be read.
    """
    reader = crdt.SnapshotReader(genesis, max_authors=max_authors)
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            reader.feed(chunk)
    return reader.finish()


def _unpack(data: bytes, what: str) -> object:
    """msgpack -> object, any msgpack failure as a ValidationError naming ``what``."""
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise crdt.ValidationError(f"{what}: not msgpack ({exc.__class__.__name__})") from exc


def decode_peer_vectors(data: bytes) -> dict[str, tuple[crdt.VersionVector, float]]:
    obj = _unpack(data, "peer vectors")
    if not isinstance(obj, dict) or not all(
        isinstance(k, str)
        and isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], bytes)
        and isinstance(v[1], float)
        for k, v in obj.items()
    ):
        raise crdt.ValidationError("peer vectors: expected a map of peer id to [version vector, heard at]")
    return {peer: (crdt.VersionVector.decode(raw), heard) for peer, (raw, heard) in obj.items()}


def decode_checkpoints(data: bytes) -> list[crdt.Checkpoint]:
    items = _unpack(data, "checkpoints")
    if not isinstance(items, list) or not all(isinstance(x, bytes) for x in items):
        raise crdt.ValidationError("checkpoints: expected a list of encoded checkpoints")
    return [crdt.Checkpoint.decode(x, max_authors=crdt.MAX_AUTHORS) for x in items]


def decode_equivocation(data: bytes) -> tuple[crdt.Contribution, crdt.Contribution]:
    pair = _unpack(data, "equivocation proof")
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, bytes) for x in pair)):
        raise crdt.ValidationError("equivocation proof: expected two encoded contributions")
    first, second = (crdt.Contribution.decode(x) for x in pair)
    if (first.author, first.seq) != (second.author, second.seq) or first.id == second.id:
        raise crdt.ValidationError("equivocation proof: not two different records of one slot")
    first.verify()
    second.verify()
    return first, second
