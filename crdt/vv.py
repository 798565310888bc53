"""VersionVector and Digest: what a replica has applied, in a form cheap to exchange.

Because every author numbers its contributions 1, 2, 3, ... and replicas apply each author's
contributions in seq order (buffering gaps), "the set of contributions applied" is exactly described by
one integer per author: the highest contiguous seq. Two replicas with equal vectors applied the same
contributions (modulo equivocation, see crdt.state), hence hold bit-identical accumulators.

Wire layout (packed: two byte strings instead of one msgpack pair per author)::

    VersionVector = [FORMAT_VERSION, "vv", authors(bin: n x 32 bytes, strictly increasing),
                     seqs(bin: n x u64le, each in [1, 2**63))]
    Digest        = [FORMAT_VERSION, "digest", VersionVector-bytes(bin), state_hash(bin32), count(uint)]

Bounds: every decoder takes ``max_authors`` (the daemon passes ``Limits.max_authors``, derived from the
authors it admits) and refuses a larger input from its byte length alone, before msgpack or numpy build
anything; the rest of the checks are vectorized, so a 4,096-author digest decodes in about a millisecond.
A replica's own snapshot is read with the build's hard cap ``MAX_AUTHORS`` (see crdt.records), which no
state can exceed, so it always reloads.

Rejected alternatives: the v2 layout (a msgpack array of [author, seq] pairs) cost 0.68 s to decode at
its 4 MiB cap (~116,500 authors) and made the cap a property of the bytes, not of what the node admits;
a Merkle tree over authors (cheaper deltas, but round trips and a tree to keep in sync, for meshes that
stay in the thousands of authors).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from crdt import _wire
from crdt.records import DEFAULT_LIMITS, FORMAT_VERSION, HASH_BYTES, content_hash
from crdt.signing import PUBLIC_KEY_BYTES

__all__ = ["Digest", "VersionVector", "vv_max_bytes"]

#: msgpack framing of an encoded vector besides the two byte strings (array, version, tag, bin headers).
_VV_FRAMING_BYTES = 32
#: Digest framing besides the vector: headers, the 32-byte state hash and a uint64 count.
_DIGEST_FRAMING_BYTES = 64
_ENTRY_BYTES = PUBLIC_KEY_BYTES + 8


def vv_max_bytes(max_authors: int) -> int:
    """Largest encoding of a vector of at most ``max_authors`` authors."""
    return _VV_FRAMING_BYTES + _ENTRY_BYTES * max_authors


@dataclass(frozen=True, slots=True)
class VersionVector(Mapping[bytes, int]):
    """Immutable mapping author -> highest contiguous seq (absent authors read as 0)."""

    entries: tuple[tuple[bytes, int], ...] = ()
    _map: dict[bytes, int] = field(init=False, repr=False, compare=False, hash=False)
    _encoded: list[bytes] = field(init=False, repr=False, compare=False, hash=False)  # lazy cache

    def __post_init__(self) -> None:
        tag = "vv"
        items = sorted((a, s) for a, s in self.entries if s != 0)
        for a, s in items:
            _wire.expect(_wire.is_bytes(a, PUBLIC_KEY_BYTES), tag, "author must be 32 bytes")
            _wire.expect(_wire.is_int(s) and 0 < s < 2**63, tag, "seq must be a positive int")
        m = dict(items)
        _wire.expect(len(m) == len(items), tag, "duplicate author")
        object.__setattr__(self, "entries", tuple(items))
        object.__setattr__(self, "_map", m)
        object.__setattr__(self, "_encoded", [])

    @classmethod
    def from_dict(cls, d: Mapping[bytes, int]) -> VersionVector:
        return cls(tuple(d.items()))

    # Mapping protocol -----------------------------------------------------------------------------------
    def __getitem__(self, author: bytes) -> int:
        return self._map[author]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def get(self, author: bytes, default: int = 0) -> int:  # type: ignore[override]
        return self._map.get(author, default)

    # Lattice --------------------------------------------------------------------------------------------
    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise max (the join)."""
        out = dict(self._map)
        for a, s in other._map.items():
            if s > out.get(a, 0):
                out[a] = s
        return VersionVector.from_dict(out)

    def dominates(self, other: VersionVector) -> bool:
        """self >= other pointwise (equal vectors dominate each other)."""
        return all(self._map.get(a, 0) >= s for a, s in other._map.items())

    @property
    def total(self) -> int:
        return sum(self._map.values())

    def digest(self) -> bytes:
        return content_hash(self.encode())

    def encode(self) -> bytes:
        if not self._encoded:
            authors = b"".join(a for a, _ in self.entries)
            seqs = np.fromiter((s for _, s in self.entries), dtype="<u8", count=len(self.entries)).tobytes()
            self._encoded.append(_wire.pack([FORMAT_VERSION, "vv", authors, seqs]))
        return self._encoded[0]

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_authors: int = DEFAULT_LIMITS.max_authors
               ) -> VersionVector:
        """Parse a vector of at most ``max_authors`` authors. Raises ValidationError."""
        tag = "vv"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=4,
                                 max_bytes=vv_max_bytes(max_authors))
        _, _, authors, seqs = obj
        _wire.expect(_wire.is_bytes(authors) and _wire.is_bytes(seqs), tag, "authors and seqs must be bin")
        n = len(authors) // PUBLIC_KEY_BYTES
        _wire.expect(len(authors) == n * PUBLIC_KEY_BYTES and len(seqs) == 8 * n, tag,
                     "authors must be n x 32 bytes and seqs n x 8 bytes")
        _wire.expect(n <= max_authors, tag, f"{n} authors exceed the limit of {max_authors}")
        s = np.frombuffer(seqs, dtype="<u8")
        _wire.expect(bool(np.all((s >= 1) & (s < 2**63))), tag, "seqs must be in [1, 2**63)")
        if n > 1:  # strictly increasing rows, compared as big-endian 64-bit words
            words = np.frombuffer(authors, dtype=">u8").reshape(n, 4)
            prev, nxt = words[:-1], words[1:]
            differs = prev != nxt
            first = np.argmax(differs, axis=1)
            rows = np.arange(n - 1)
            _wire.expect(bool(np.all(differs.any(axis=1))
                              and np.all(nxt[rows, first] > prev[rows, first])), tag,
                         "authors must be strictly increasing (sorted, no duplicates)")
        vv = cls.__new__(cls)
        entries = tuple(zip((authors[i : i + PUBLIC_KEY_BYTES] for i in range(0, len(authors), 32)),
                            s.tolist(), strict=True))
        object.__setattr__(vv, "entries", entries)
        object.__setattr__(vv, "_map", dict(entries))
        object.__setattr__(vv, "_encoded", [])
        _wire.expect(vv.encode() == bytes(data), tag, "non-canonical encoding")
        return vv


@dataclass(frozen=True, slots=True)
class Digest:
    """Anti-entropy summary of a replica: its vector, its state hash and how many contributions it holds."""

    version_vector: VersionVector
    state_hash: str
    contribution_count: int

    def encode(self) -> bytes:
        return _wire.pack([FORMAT_VERSION, "digest", self.version_vector.encode(),
                           bytes.fromhex(self.state_hash), self.contribution_count])

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_authors: int = DEFAULT_LIMITS.max_authors) -> Digest:
        """Parse a digest whose vector has at most ``max_authors`` authors. Raises ValidationError."""
        tag = "digest"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=5,
                                 max_bytes=vv_max_bytes(max_authors) + _DIGEST_FRAMING_BYTES)
        _, _, vv_raw, sh, count = obj
        _wire.expect(_wire.is_bytes(vv_raw), tag, "version vector must be bin")
        vv = VersionVector.decode(vv_raw, max_authors=max_authors)
        _wire.expect(_wire.is_bytes(sh, HASH_BYTES), tag, "state hash must be 32 bytes")
        _wire.expect(_wire.is_int(count) and count == vv.total, tag, "count must equal the vector total")
        d = cls(vv, sh.hex(), count)
        _wire.expect(d.encode() == bytes(data), tag, "non-canonical encoding")
        return d
