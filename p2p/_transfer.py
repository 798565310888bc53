"""Sans-IO bulk transfer: manifests, the wire format of `/meshtrain/blob/1`, the chunk plan and verification.

Theory of operation
-------------------
A *blob* (a contributions batch, a snapshot) is served under an opaque ``blob_id`` (bytes chosen by the
serving application, e.g. ``b"snapshot/" + state_hash``). It is cut into fixed-size chunks (default 4 MiB;
the last one is shorter). Its `Manifest` carries the size, the chunk size, blake2b-256 of the whole blob and
blake2b-256 of every chunk, so a fetcher can

* verify each chunk the moment it arrives, from whichever peer sent it, and blame that peer alone;
* pull different chunks from different peers at once (every chunk is independently checkable);
* resume: a partial file is re-scanned against the chunk digests, and only the chunks that do not match are
  fetched again (no side file needed: the partial file plus the manifest IS the resume state);
* finally verify the whole blob against ``Manifest.digest`` (the caller may pin that digest in advance,
  e.g. from a signed announcement; then a lying manifest is rejected before any chunk is fetched).

`FetchPlan` is the fetcher's state machine and does no I/O: it hands out chunk indices to peers, takes back
results (data or failure), verifies, and tracks per-peer failures. The asyncio driver lives in
`p2p/_blobs.py`. Everything here is deterministic and tested without sockets (tests/p2p/test_transfer.py).

Wire format (each exchange is one request/response over `Host.request`, see `p2p/_framing.py`)::

    request  = version u8 (=1) | op u8 | id_len u16 | blob_id | offset u64 | length u32
               op 1 MANIFEST (offset/length ignored, send 0)  op 2 READ (bytes [offset, offset+length))
    response = MANIFEST: `Manifest.encode()`; READ: exactly ``length`` raw bytes
    errors   = the server raises BlobNotFound / ValueError: the client sees RemoteError(error_type, msg)

Rejected alternatives: one long stream per peer carrying the whole blob (no per-chunk retry, a dead peer
costs everything it had in flight, and the other peers cannot share the work); a Merkle tree (a flat list of
chunk digests is 8 KiB per 256 MiB at 1 MiB chunks: a tree buys nothing at these sizes); libp2p bitswap
(untested in py-libp2p 0.8.1, CID/multihash machinery for no gain).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from p2p._errors import IntegrityError, ProtocolViolation

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DIGEST_BYTES",
    "MAX_BLOB_ID_BYTES",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "BlobRequest",
    "BlobSource",
    "FetchPlan",
    "Manifest",
    "Op",
    "blob_digest",
    "chunk_digest",
    "scan_verified_chunks",
]

DIGEST_BYTES = 32  # blake2b-256: the same hash family crdt uses for content addresses
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024  # big enough to amortise a stream open (~3.6 ms), small enough to retry
MIN_CHUNK_BYTES = 64 * 1024  # bounds the manifest: 4 GiB / 64 KiB * 32 B = 2 MiB of chunk digests at worst
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # bounds the fetcher's memory per in-flight request
MAX_BLOB_ID_BYTES = 1024  # ids are names/hashes, not data
MAX_BLOB_BYTES = 2**40  # u64 on the wire; the fetcher applies its own, much smaller, bound

_REQUEST = struct.Struct(">BBH")  # version, op, id_len
_RANGE = struct.Struct(">QI")  # offset, length
_MANIFEST = struct.Struct(">BQI32sI")  # version, size, chunk_size, digest, n_chunks
WIRE_VERSION = 1


def chunk_digest(data: bytes | memoryview) -> bytes:
    """blake2b-256 of one chunk."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def blob_digest(data: bytes | bytearray | memoryview) -> bytes:
    """blake2b-256 of a whole blob (hashlib releases the GIL for large buffers: call it in a thread)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True, slots=True)
class Manifest:
    """Size, chunking and digests of one blob. Immutable; `decode` validates everything it can."""

    size: int
    chunk_size: int
    digest: bytes  # blake2b-256 of the whole blob
    chunk_digests: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not MIN_CHUNK_BYTES <= self.chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size {self.chunk_size} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        if not 0 <= self.size <= MAX_BLOB_BYTES:
            raise ValueError(f"blob size {self.size} out of range")
        if len(self.digest) != DIGEST_BYTES or any(len(d) != DIGEST_BYTES for d in self.chunk_digests):
            raise ValueError("digests must be 32 bytes")
        if len(self.chunk_digests) != self.chunk_count:
            raise ValueError(f"{len(self.chunk_digests)} chunk digests for {self.chunk_count} chunks")

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} of {self.chunk_count}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    @classmethod
    def build(
        cls, data: bytes | bytearray | memoryview, *, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> Manifest:
        """Manifest of an in-memory blob (hashes every byte twice: call it in a thread for big blobs)."""
        view = memoryview(data)
        chunks = tuple(chunk_digest(view[o : o + chunk_size]) for o in range(0, len(view), chunk_size))
        return cls(size=len(view), chunk_size=chunk_size, digest=blob_digest(view), chunk_digests=chunks)

    @classmethod
    def build_from_reader(
        cls, read: Callable[[int, int], bytes], size: int, *, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> Manifest:
        """Manifest of a blob read through ``read(offset, length)`` one chunk at a time (bounded memory)."""
        whole = hashlib.blake2b(digest_size=DIGEST_BYTES)
        chunks = []
        for offset in range(0, size, chunk_size):
            data = read(offset, min(chunk_size, size - offset))
            whole.update(data)
            chunks.append(chunk_digest(data))
        return cls(size=size, chunk_size=chunk_size, digest=whole.digest(), chunk_digests=tuple(chunks))

    def encode(self) -> bytes:
        head = _MANIFEST.pack(WIRE_VERSION, self.size, self.chunk_size, self.digest, len(self.chunk_digests))
        return head + b"".join(self.chunk_digests)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Inverse of `encode`. Raises ProtocolViolation on anything malformed."""
        if len(data) < _MANIFEST.size:
            raise ProtocolViolation("manifest too short")
        version, size, chunk_size, digest, n = _MANIFEST.unpack_from(data)
        if version != WIRE_VERSION:
            raise ProtocolViolation(f"manifest version {version} not supported")
        body = memoryview(data)[_MANIFEST.size :]
        if len(body) != n * DIGEST_BYTES:
            raise ProtocolViolation(f"manifest announces {n} chunk digests, carries {len(body)} bytes")
        chunks = tuple(bytes(body[i : i + DIGEST_BYTES]) for i in range(0, len(body), DIGEST_BYTES))
        try:
            return cls(size=size, chunk_size=chunk_size, digest=digest, chunk_digests=chunks)
        except ValueError as exc:
            raise ProtocolViolation(f"bad manifest: {exc}") from exc


# ---------------------------------------------------------------------------------------------- requests


class Op(enum.IntEnum):
    MANIFEST = 1
    READ = 2


@dataclass(frozen=True, slots=True)
class BlobRequest:
    op: Op
    blob_id: bytes
    offset: int = 0
    length: int = 0

    def encode(self) -> bytes:
        if len(self.blob_id) > MAX_BLOB_ID_BYTES:
            raise ValueError(f"blob id of {len(self.blob_id)} bytes > {MAX_BLOB_ID_BYTES}")
        head = _REQUEST.pack(WIRE_VERSION, self.op, len(self.blob_id))
        return head + self.blob_id + _RANGE.pack(self.offset, self.length)

    @classmethod
    def decode(cls, data: bytes) -> BlobRequest:
        """Raises ProtocolViolation on anything malformed (the server answers it as a RemoteError)."""
        if len(data) < _REQUEST.size:
            raise ProtocolViolation("blob request too short")
        version, op, id_len = _REQUEST.unpack_from(data)
        if version != WIRE_VERSION:
            raise ProtocolViolation(f"blob request version {version} not supported")
        if len(data) != _REQUEST.size + id_len + _RANGE.size or id_len > MAX_BLOB_ID_BYTES:
            raise ProtocolViolation("blob request length mismatch")
        try:
            kind = Op(op)
        except ValueError:
            raise ProtocolViolation(f"unknown blob op {op}") from None
        blob_id = data[_REQUEST.size : _REQUEST.size + id_len]
        offset, length = _RANGE.unpack_from(data, _REQUEST.size + id_len)
        return cls(kind, blob_id, offset, length)


# ---------------------------------------------------------------------------------------------- sources


class BlobSource:
    """What a server hands out for one blob id: its manifest and a ``read(offset, length)`` function.

    Build one with `from_bytes` or `from_file` (both hash the blob once, up front: do it in a thread for big
    blobs, e.g. ``await asyncio.to_thread(BlobSource.from_file, path)``) and keep it while the blob is served;
    the provider callback should return the same object for every request instead of rebuilding it.
    """

    __slots__ = ("_read", "manifest", "reads_block")

    def __init__(self, manifest: Manifest, read: Callable[[int, int], bytes], *, reads_block: bool) -> None:
        self.manifest = manifest
        self._read = read
        self.reads_block = reads_block  # True: the server runs read() in a worker thread (disk I/O)

    @classmethod
    def from_bytes(cls, data: bytes, *, chunk_size: int = DEFAULT_CHUNK_BYTES) -> BlobSource:
        view = memoryview(data)
        return cls(
            Manifest.build(view, chunk_size=chunk_size),
            lambda off, n: bytes(view[off : off + n]),
            reads_block=False,
        )

    @classmethod
    def from_file(cls, path: str, *, chunk_size: int = DEFAULT_CHUNK_BYTES) -> BlobSource:
        """A file that must not change while served (snapshots are written once, renamed into place)."""
        import os

        def read(offset: int, length: int) -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        size = os.stat(path).st_size
        return cls(Manifest.build_from_reader(read, size, chunk_size=chunk_size), read, reads_block=True)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length); ValueError outside the blob or over MAX_CHUNK_BYTES."""
        if length > MAX_CHUNK_BYTES or offset < 0 or offset + length > self.manifest.size:
            raise ValueError(f"range {offset}+{length} outside blob of {self.manifest.size} bytes")
        data = self._read(offset, length)
        if len(data) != length:  # the file shrank under us: never serve a short read as if it were whole
            raise ValueError(f"short read at {offset}: {len(data)} of {length} bytes")
        return data


# ---------------------------------------------------------------------------------------------- fetch plan


class Verdict(enum.Enum):
    ACCEPTED = "accepted"  # verified and new: the driver stores it
    DUPLICATE = "duplicate"  # verified but another peer delivered it first: drop it
    CORRUPT = "corrupt"  # digest mismatch: the peer is dropped, the chunk goes back to the pool


@dataclass(slots=True)
class PeerState:
    in_flight: set[int] = field(default_factory=set)
    chunks_ok: int = 0
    error: str | None = None  # set once the peer is dropped for this fetch


class FetchPlan:
    """Which chunk to ask whom next, and what has been verified. Pure state; the caller does the I/O.

    Chunks are handed out lowest-index first (so a file grows mostly sequentially), each to one peer at a
    time; ``max_in_flight_per_peer`` bounds the fetcher's memory to peers x that x chunk_size. A failed or
    corrupt chunk goes back to the pool and its peer is dropped from this fetch (a peer that sends one bad
    chunk is not trusted with the rest). In the endgame (nothing unassigned left), an idle peer may re-ask a
    chunk another peer still holds, so one slow peer cannot stall the tail; the first verified copy wins.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        have: Iterable[int] = (),
        max_in_flight_per_peer: int = 2,
    ) -> None:
        if max_in_flight_per_peer < 1:
            raise ValueError("max_in_flight_per_peer must be >= 1")
        self.manifest = manifest
        self.max_in_flight_per_peer = max_in_flight_per_peer
        self.done: set[int] = set(have)
        if any(not 0 <= i < manifest.chunk_count for i in self.done):
            raise ValueError("have contains chunk indices outside the manifest")
        self._pending = [i for i in range(manifest.chunk_count) if i not in self.done]  # unassigned, sorted
        self._holders: dict[int, set[str]] = {}  # chunk -> peers it is in flight at
        self.peers: dict[str, PeerState] = {}
        self.bytes_accepted = 0

    # -- queries

    @property
    def complete(self) -> bool:
        return len(self.done) == self.manifest.chunk_count

    def active_peers(self) -> list[str]:
        return [p for p, s in self.peers.items() if s.error is None]

    def peer_errors(self) -> dict[str, str]:
        return {p: s.error for p, s in self.peers.items() if s.error is not None}

    # -- transitions

    def add_peer(self, peer: str) -> None:
        self.peers.setdefault(peer, PeerState())

    def next_chunk(self, peer: str) -> int | None:
        """A chunk for ``peer`` to fetch now, or None (peer dropped, at its in-flight cap, or nothing left).

        None does not mean "finished": chunks in flight elsewhere may come back to the pool; the driver waits
        for any state change and asks again.
        """
        state = self.peers[peer]
        if state.error is not None or len(state.in_flight) >= self.max_in_flight_per_peer:
            return None
        if self._pending:
            index = self._pending.pop(0)
        else:  # endgame: duplicate the lowest chunk held by exactly one other peer
            candidates = [i for i, h in sorted(self._holders.items()) if peer not in h and len(h) == 1]
            if not candidates:
                return None
            index = candidates[0]
        state.in_flight.add(index)
        self._holders.setdefault(index, set()).add(peer)
        return index

    def on_data(
        self, peer: str, index: int, data: bytes | memoryview, *, digest: bytes | None = None
    ) -> Verdict:
        """A READ answer for chunk ``index`` arrived from ``peer``: verify it.

        ``digest`` may be precomputed (`chunk_digest(data)`, e.g. in a worker thread so that hashing 4 MiB
        does not stall an event loop); it is only trusted to be the digest of ``data``.
        """
        offset, length = self.manifest.chunk_range(index)
        if digest is None:
            digest = chunk_digest(data)
        if len(data) != length or digest != self.manifest.chunk_digests[index]:
            self._release(peer, index)
            self._drop(peer, f"chunk {index} failed verification ({len(data)} bytes at offset {offset})")
            return Verdict.CORRUPT
        self.peers[peer].chunks_ok += 1
        verdict = Verdict.DUPLICATE if index in self.done else Verdict.ACCEPTED
        if verdict is Verdict.ACCEPTED:
            self.done.add(index)  # before the release, so the chunk is not put back in the pool
            self.bytes_accepted += length
        self._release(peer, index)
        return verdict

    def on_failure(self, peer: str, index: int | None, reason: str) -> None:
        """The request for ``index`` (or the peer as a whole, index None) failed: drop the peer."""
        if index is not None:
            self._release(peer, index)
        self._drop(peer, reason)

    def give_back(self, peer: str, index: int) -> None:
        """``index`` was refused for a transient reason (rate limit): re-pool it, keep the peer."""
        self._release(peer, index)

    def _release(self, peer: str, index: int) -> None:
        self.peers[peer].in_flight.discard(index)
        holders = self._holders.get(index)
        if holders is not None:
            holders.discard(peer)
            if not holders:
                del self._holders[index]
                if index not in self.done:
                    self._requeue(index)

    def _drop(self, peer: str, reason: str) -> None:
        state = self.peers[peer]
        if state.error is None:
            state.error = reason
        for index in list(state.in_flight):
            self._release(peer, index)

    def _requeue(self, index: int) -> None:
        if index not in self._pending:
            self._pending.append(index)
            self._pending.sort()


def scan_verified_chunks(manifest: Manifest, read: Callable[[int, int], bytes], available: int) -> set[int]:
    """Indices of chunks whose bytes in a partial copy (``available`` bytes long) already match the manifest.

    This is how a fetch resumes: the bytes already on disk are re-checked, never trusted.
    """
    verified: set[int] = set()
    for index in range(manifest.chunk_count):
        offset, length = manifest.chunk_range(index)
        if offset + length > available:
            break
        if chunk_digest(read(offset, length)) == manifest.chunk_digests[index]:
            verified.add(index)
    return verified


def check_blob(manifest: Manifest, digest: bytes) -> None:
    """Raise IntegrityError unless the reassembled blob's ``digest`` is the manifest's."""
    if digest != manifest.digest:
        raise IntegrityError(
            f"reassembled blob digest {digest.hex()[:16]}.. != manifest {manifest.digest.hex()[:16]}.."
        )
