"""Snapshots: the exact, compact and streamable encoding of a replica's accumulator, and its state hash.

Theory of operation
-------------------
A snapshot is what a replica holds minus its records: the version vector, the int64 accumulator and the
state hash that binds them. It is written as a *stream of parts* so that neither side ever holds more
than one block of temporaries (the daemon writes the parts to a file as they come, serves the file in
chunks, and feeds received chunks, of any size, to a :class:`SnapshotReader`)::

    stream = b"MESHSNP" + u8 FORMAT_VERSION, then parts framed as WAL records (crdt.log):
             u32le length | u32le crc32 | body
    header = [FORMAT_VERSION, "snapshot", genesis_id(bin32), vv(bin), state_hash(bin32), self_verified,
              (bases(bin))]
    block  = [FORMAT_VERSION, "snapshot-block", start(uint), [plane0, ..., plane7](bin each)]

Blocks cover the model in order, fragment by fragment, each fragment cut into runs of at most
``BLOCK_ENTRIES`` entries (blocks never straddle fragments), so the sequence of ``start`` values is a
function of the genesis and the reader checks it. Inside a block the entries are zigzag-mapped
(``(x << 1) ^ (x >> 63)``: small magnitudes of either sign get small codes) and split into 8 byte planes,
plane j holding byte j of every code. A plane is ``b""`` when all its bytes are 0 (and must be: one
encoding per value) and otherwise one zstd frame that declares its content size, which must be the
block's entry count, with nothing after it. The on-disk snapshot is this same stream; each part's crc32
catches a torn or rotten file before the state hash does.

The state hash is ``blake2b-256(tag, genesis id, vector digest, blake2b-256 of each fragment's
little-endian accumulator[, "bases", bases digest])``; ``bases`` (a run with an influence window only,
omitted when empty: crdt/state.py) is, per author, the ``base_count`` of its last applied record, which
decides how its next record is clipped, so it is bound by the hash like the rest. The reader hashes each
fragment as its blocks arrive and the snapshot is refused unless the result is the header's hash, so the
accumulator a replica adopts is the one a checkpoint (crdt.checkpoint) signed. zstd's output bytes may
differ between library versions; nothing signs or hashes them, only the decoded content.

Why this encoding (bench/bench_crdt.py, 2026-12-01): a real accumulator (stdlib-lm, 2 peers x 40
rounds of sparse-q8 through ModelState) has an order-0 entropy of its zigzag byte planes of 3.50 bytes per
entry: the high planes are zero, the low ones near-random, one in between. This encoding takes 3.48
B/param (3.53 on 100M entries bootstrapped from it), against 4.97 (zstd) and 4.49 (zlib) on the raw
int64 layout; zlib on the same planes gets 3.49 but encoded 8x slower (65 vs 534 MB/s on 10M entries),
lzma 3.58 and slower still; zstd level 3 compressed no better than level 1, 2.3x slower. Rejected:
deltas between neighbouring entries (accumulators of different parameters are independent: no gain); bit
packing with a per-block width (no library, ~1 bit/entry worse than the entropy coder on the top plane).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import zstandard

from crdt import _wire
from crdt._packed import FrozenPacked, PackedInt64
from crdt.errors import GenesisMismatchError, ValidationError
from crdt.log import RECORD_HEADER, frame_record, record_checksum
from crdt.records import FORMAT_VERSION, HASH_BYTES, Genesis
from crdt.vv import VersionVector, vv_max_bytes

__all__ = [
    "BLOCK_ENTRIES",
    "SNAPSHOT_MAGIC",
    "Snapshot",
    "SnapshotHeader",
    "SnapshotReader",
    "combine_state_hash",
    "encode_snapshot",
    "fragment_digest",
]

#: Entries per block: 8 MiB of int64, so ~40 MiB of temporaries per block on either side, whatever the
#: model size; planes of 1 MiB still compress as well as whole fragments do.
BLOCK_ENTRIES = 2**20
#: File / stream magic, followed by the format version byte.
SNAPSHOT_MAGIC = b"MESHSNP"
#: zstd level: 1 compresses accumulator planes as well as 3 and is 2.3x faster (see above).
_ZSTD_LEVEL = 1
#: Largest zstd window a peer's plane may ask the decoder for: a plane is at most BLOCK_ENTRIES bytes.
_MAX_WINDOW_BYTES = 2 * 2**20
#: Slack on top of a block's worst case (8 planes of zstd's bound) for the msgpack framing.
_BLOCK_FRAMING_BYTES = 256
#: Domain separation for the state hash.
_STATE_HASH_TAG = b"meshtrain-state-v1"


# ---------------------------------------------------------------------------------------------------------
# State hash
# ---------------------------------------------------------------------------------------------------------


def fragment_digest(acc: np.ndarray) -> bytes:
    """blake2b-256 of one fragment's accumulator as little-endian int64 (no copy on little-endian hosts)."""
    return hashlib.blake2b(memoryview(acc.astype("<i8", copy=False)).cast("B"),
                           digest_size=HASH_BYTES).digest()


def combine_state_hash(genesis_id: str, vector: VersionVector, fragment_hashes: Sequence[bytes],
                       bases: VersionVector | None = None) -> str:
    """The state hash (hex) from the vector, the per-fragment digests and the authors' last bases (a run
    with an influence window; None or empty: not part of the hash)."""
    h = hashlib.blake2b(_STATE_HASH_TAG, digest_size=HASH_BYTES)
    h.update(bytes.fromhex(genesis_id))
    h.update(vector.digest())
    for d in fragment_hashes:
        h.update(d)
    if bases:
        h.update(b"bases")
        h.update(bases.digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """The first part of a snapshot: what it claims to be. Checked against checkpoints before the body
    is fetched (:func:`crdt.check_attestation`) and against the body once it is decoded."""

    genesis_id: str
    version_vector: VersionVector
    state_hash: str
    self_verified: bool
    """The writer verified every contribution in it (it never adopted a peer's snapshot). Only a replica's
    own snapshot is believed on this; a state adopted from a peer is never self-verified."""
    bases: VersionVector = field(default_factory=VersionVector)
    """Per author, the ``base_count`` of its last applied record (a run with an influence window; zeros and
    runs without a window: empty, omitted on the wire). Covered by the state hash."""

    def encode(self) -> bytes:
        optional = [self.bases.encode()] if self.bases else []
        return _wire.pack([FORMAT_VERSION, "snapshot", bytes.fromhex(self.genesis_id),
                           self.version_vector.encode(), bytes.fromhex(self.state_hash), self.self_verified,
                           *optional])

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_authors: int) -> SnapshotHeader:
        tag = "snapshot"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=(6, 7),
                                 max_bytes=_header_max_bytes(max_authors))
        gid, vv_raw, sh, verified = obj[2:6]
        _wire.expect(_wire.is_bytes(gid, HASH_BYTES), tag, "genesis id must be 32 bytes")
        _wire.expect(_wire.is_bytes(vv_raw), tag, "version vector must be bin")
        _wire.expect(_wire.is_bytes(sh, HASH_BYTES), tag, "state hash must be 32 bytes")
        _wire.expect(type(verified) is bool, tag, "self_verified must be a bool")
        vector = VersionVector.decode(vv_raw, max_authors=max_authors)
        bases = VersionVector()
        if len(obj) == 7:
            _wire.expect(_wire.is_bytes(obj[6]), tag, "bases must be bin")
            bases = VersionVector.decode(obj[6], max_authors=max_authors)
            _wire.expect(all(a in vector for a in bases), tag, "bases name an author the vector lacks")
        header = cls(gid.hex(), vector, sh.hex(), verified, bases)
        _wire.expect(header.encode() == bytes(data), tag, "non-canonical encoding")
        return header


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """A decoded snapshot (from :meth:`SnapshotReader.finish`): the header and the accumulator it owns.

    It hands its accumulator to exactly one ModelState (``from_snapshot`` / ``from_own_snapshot`` take it
    without a copy); using it twice raises ValidationError.
    """

    header: SnapshotHeader
    _parts: list[tuple[PackedInt64, tuple[bytes, ...]]] = field(repr=False)

    def take(self) -> tuple[PackedInt64, tuple[bytes, ...]]:
        """The accumulator and its per-fragment digests, once (internal to ModelState)."""
        _wire.expect(bool(self._parts), "snapshot", "already used to build a state")
        return self._parts.pop()


# ---------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------


def encode_snapshot(
    genesis: Genesis, header: SnapshotHeader, acc: np.ndarray | PackedInt64 | FrozenPacked
) -> Iterator[bytes]:
    """The snapshot stream of ``acc`` (int64, packed or a frozen view of packed, genesis.length) under
    ``header``, one framed part per item: the magic and header first, then one part per block. Holds one
    block's temporaries at a time."""
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    yield SNAPSHOT_MAGIC + bytes([FORMAT_VERSION]) + frame_record(header.encode())
    for start, stop in _blocks(genesis):
        a = acc[start:stop] if isinstance(acc, np.ndarray) else acc.read(start, stop)
        codes = ((a << 1) ^ (a >> 63)).view(np.uint64)  # zigzag
        planes = np.ascontiguousarray(codes.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8).T)
        packed = [compressor.compress(p.data) if p.any() else b"" for p in planes]
        yield frame_record(_wire.pack([FORMAT_VERSION, "snapshot-block", start, packed]))


def _blocks(genesis: Genesis) -> Iterator[tuple[int, int]]:
    for start, stop in genesis.fragments:
        for s in range(start, stop, BLOCK_ENTRIES):
            yield s, min(s + BLOCK_ENTRIES, stop)


def _header_max_bytes(max_authors: int) -> int:
    return 2 * vv_max_bytes(max_authors) + 128  # the vector and the bases


def _block_max_bytes(count: int) -> int:
    return 8 * (count + count // 128 + 1024) + _BLOCK_FRAMING_BYTES  # above zstd's compress bound


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


class SnapshotReader:
    """Sans-IO decoder of a snapshot stream for ``genesis``: :meth:`feed` it bytes in any chunks, read
    :attr:`header` as soon as it is there (to check checkpoints before fetching the rest), then
    :meth:`finish`. Memory: the accumulator (packed: 4 bytes per parameter where values fit int32,
    allocated with the first block) plus one part in flight. Every method raises ValidationError on bad
    input; the reader is then dead.

    ``max_authors`` bounds the header's vector: ``Limits.max_authors`` for a peer's snapshot,
    ``crdt.MAX_AUTHORS`` for the replica's own. The accumulator is allocated when the first block arrives,
    so a caller that fetches the header part alone and checks it (:func:`crdt.check_attestation`) before
    asking for the rest never spends memory or bandwidth on an unattested body.
    """

    def __init__(self, genesis: Genesis, *, max_authors: int) -> None:
        self._genesis = genesis
        self._max_authors = max_authors
        self._buf = bytearray()
        self._magic_seen = False
        self._header: SnapshotHeader | None = None
        self._acc: PackedInt64 | None = None
        self._blocks = list(_blocks(genesis))
        self._next = 0  # index of the next expected block
        self._frag_ends = {stop: i for i, (_, stop) in enumerate(genesis.fragments)}
        self._frag_hasher = hashlib.blake2b(digest_size=HASH_BYTES)
        self._frag_hashes: list[bytes] = []
        self._failed = False
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW_BYTES)

    @property
    def header(self) -> SnapshotHeader | None:
        return self._header

    @property
    def done(self) -> bool:
        return self._header is not None and self._next == len(self._blocks)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the stream."""
        _wire.expect(not self._failed, "snapshot", "reader already failed")
        self._buf += data
        try:
            self._parse()
        except BaseException:
            self._failed = True
            raise

    def finish(self) -> Snapshot:
        """The decoded snapshot once the whole stream was fed; its content must match its state hash."""
        tag = "snapshot"
        _wire.expect(not self._failed and self.done and not self._buf, tag,
                     "stream incomplete or followed by extra bytes")
        assert self._header is not None and self._acc is not None  # done implies both
        hashes = tuple(self._frag_hashes)
        actual = combine_state_hash(self._header.genesis_id, self._header.version_vector, hashes,
                                    self._header.bases)
        _wire.expect(actual == self._header.state_hash, tag, "content does not match its state hash")
        acc, self._acc = self._acc, None
        return Snapshot(self._header, [(acc, hashes)])

    # -- parsing -------------------------------------------------------------------------------------------
    def _parse(self) -> None:
        tag = "snapshot"
        if not self._magic_seen:
            if len(self._buf) < len(SNAPSHOT_MAGIC) + 1:
                _wire.expect(SNAPSHOT_MAGIC.startswith(bytes(self._buf[: len(SNAPSHOT_MAGIC)])), tag,
                             "not a meshtrain snapshot (bad magic)")
                return
            _wire.expect(bytes(self._buf[: len(SNAPSHOT_MAGIC)]) == SNAPSHOT_MAGIC, tag,
                         "not a meshtrain snapshot (bad magic)")
            if self._buf[len(SNAPSHOT_MAGIC)] != FORMAT_VERSION:
                raise _wire.version_error(tag, self._buf[len(SNAPSHOT_MAGIC)], FORMAT_VERSION)
            del self._buf[: len(SNAPSHOT_MAGIC) + 1]
            self._magic_seen = True
        while len(self._buf) >= RECORD_HEADER.size:
            _wire.expect(not self.done, tag, "extra bytes after the last block")
            length, crc = RECORD_HEADER.unpack_from(self._buf)
            cap = (_header_max_bytes(self._max_authors) if self._header is None
                   else _block_max_bytes(self._count(self._next)))
            _wire.expect(length <= cap, tag, f"part of {length} bytes exceeds its limit of {cap}")
            end = RECORD_HEADER.size + length
            if len(self._buf) < end:
                return
            body = memoryview(self._buf)[RECORD_HEADER.size : end]
            try:
                _wire.expect(record_checksum(bytes(self._buf[:4]), body) == crc, tag, "checksum mismatch")
                if self._header is None:
                    self._accept_header(SnapshotHeader.decode(body, max_authors=self._max_authors))
                else:
                    self._accept_block(body)
            finally:
                body.release()
            del self._buf[:end]

    def _count(self, block: int) -> int:
        start, stop = self._blocks[block]
        return stop - start

    def _accept_header(self, header: SnapshotHeader) -> None:
        if header.genesis_id != self._genesis.id:
            raise GenesisMismatchError("snapshot: belongs to a different genesis")
        self._header = header

    def _accept_block(self, body: memoryview) -> None:
        tag = "snapshot-block"
        obj = _wire.unpack_array(body, tag=tag, version=FORMAT_VERSION, length=4, max_bytes=len(body))
        _, _, start, planes = obj
        begin, stop = self._blocks[self._next]
        count = stop - begin
        _wire.expect(_wire.is_int(start) and start == begin, tag, f"expected the block at {begin}")
        _wire.expect(isinstance(planes, list) and len(planes) == 8 and all(_wire.is_bytes(p) for p in planes),
                     tag, "planes must be 8 bins")
        _wire.expect(_wire.pack([FORMAT_VERSION, tag, start, planes]) == bytes(body), tag,
                     "non-canonical encoding")
        grid = np.zeros((8, count), dtype=np.uint8)
        for j, plane in enumerate(planes):
            if plane:
                grid[j] = np.frombuffer(self._decompress(plane, count), dtype=np.uint8)
                _wire.expect(bool(grid[j].any()), tag, "an all-zero plane must be empty")
        codes = np.ascontiguousarray(grid.T).view("<u8").reshape(count).astype(np.uint64, copy=False)
        if self._acc is None:  # allocated with the first block, not the header: see the class docstring
            self._acc = PackedInt64(self._genesis.length)
        out = np.right_shift(codes, np.uint64(1)).view(np.int64)
        out ^= -(codes & np.uint64(1)).view(np.int64)  # un-zigzag
        self._acc.write(begin, out)
        self._frag_hasher.update(memoryview(out.astype("<i8", copy=False)).cast("B"))
        if stop in self._frag_ends:
            self._frag_hashes.append(self._frag_hasher.digest())
            self._frag_hasher = hashlib.blake2b(digest_size=HASH_BYTES)
        self._next += 1

    def _decompress(self, plane: bytes, count: int) -> bytes:
        tag = "snapshot-block"
        try:
            declared = zstandard.frame_content_size(plane)
            _wire.expect(declared == count, tag, f"a plane must declare {count} bytes, not {declared}")
            stream = self._decompressor.decompressobj()
            out = stream.decompress(plane)
        except zstandard.ZstdError as exc:
            raise ValidationError(f"{tag}: bad zstd plane ({exc})") from exc
        _wire.expect(stream.eof and not stream.unused_data and len(out) == count, tag,
                     "a plane must be exactly one zstd frame of the block's size")
        return out
