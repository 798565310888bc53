"""VersionVector and Digest: what a replica has applied, in a form cheap to exchange.

Because every author numbers its contributions 1, 2, 3, ... and replicas apply each author's
contributions in seq order (buffering gaps), "the set of contributions applied" is exactly described by
one integer per author: the highest contiguous seq. Two replicas with equal vectors applied the same
contributions (modulo equivocation, see crdt.state), hence hold bit-identical accumulators.

Wire layout::

    VersionVector = [FORMAT_VERSION, "vv", [[author(bin32), seq(uint >= 1)], ...]]   authors strictly sorted
    Digest        = [FORMAT_VERSION, "digest", VersionVector-bytes(bin), state_hash(bin32), count(uint)]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from crdt import _wire
from crdt.records import FORMAT_VERSION, HASH_BYTES, content_hash
from crdt.signing import PUBLIC_KEY_BYTES

__all__ = ["MAX_VV_BYTES", "Digest", "VersionVector"]

#: Cap on an encoded vector: 64k authors x ~45 bytes. A mesh far beyond that needs a different design.
MAX_VV_BYTES = 4 * 2**20


@dataclass(frozen=True, slots=True)
class VersionVector(Mapping[bytes, int]):
    """Immutable mapping author -> highest contiguous seq (absent authors read as 0)."""

    entries: tuple[tuple[bytes, int], ...] = ()
    _map: dict[bytes, int] = field(init=False, repr=False, compare=False, hash=False)

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
        return _wire.pack([FORMAT_VERSION, "vv", [[a, s] for a, s in self.entries]])

    @classmethod
    def decode(cls, data: bytes) -> VersionVector:
        tag = "vv"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=3, max_bytes=MAX_VV_BYTES)
        rows = obj[2]
        _wire.expect(isinstance(rows, list) and all(isinstance(r, list) and len(r) == 2 for r in rows), tag,
                     "entries must be [[author, seq], ...]")
        _wire.expect(all(_wire.is_bytes(r[0]) and _wire.is_int(r[1]) for r in rows), tag,
                     "entries must be [bytes, int]")
        vv = cls(tuple((r[0], r[1]) for r in rows))
        _wire.expect(vv.encode() == bytes(data), tag, "non-canonical encoding (unsorted, zero or duplicate)")
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
    def decode(cls, data: bytes) -> Digest:
        tag = "digest"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=5,
                                 max_bytes=MAX_VV_BYTES + 256)
        _, _, vv_raw, sh, count = obj
        _wire.expect(_wire.is_bytes(vv_raw), tag, "version vector must be bin")
        vv = VersionVector.decode(vv_raw)
        _wire.expect(_wire.is_bytes(sh, HASH_BYTES), tag, "state hash must be 32 bytes")
        _wire.expect(_wire.is_int(count) and count == vv.total, tag, "count must equal the vector total")
        d = cls(vv, sh.hex(), count)
        _wire.expect(d.encode() == bytes(data), tag, "non-canonical encoding")
        return d
