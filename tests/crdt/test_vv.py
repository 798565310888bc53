"""VersionVector and Digest: lattice operations, the packed layout, and decoders capped by max_authors."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from crdt_testlib import SIGNERS

from crdt import FORMAT_VERSION, Digest, ValidationError, VersionVector


def _authors(n: int) -> list[bytes]:
    return sorted(hashlib.sha256(b"author-%d" % i).digest() for i in range(n))


def test_version_vector() -> None:
    a, b, c = (s.public_key for s in SIGNERS[:3])
    v1 = VersionVector.from_dict({a: 3, b: 1})
    v2 = VersionVector.from_dict({b: 4, c: 2, a: 0})
    m = v1.merge(v2)
    assert dict(m) == {a: 3, b: 4, c: 2} and m.total == 9
    assert m == v2.merge(v1) and m.dominates(v1) and m.dominates(v2) and not v1.dominates(v2)
    assert v1.get(c) == 0 and len(v2) == 2
    assert VersionVector.decode(m.encode()) == m
    assert m.digest() == VersionVector.decode(m.encode()).digest() != v1.digest()
    d = Digest(m, "ab" * 32, 9)
    assert Digest.decode(d.encode()) == d
    with pytest.raises(ValidationError, match="count"):
        Digest.decode(Digest(m, "ab" * 32, 8).encode())


def test_packed_layout_is_40_bytes_per_author() -> None:
    vv = VersionVector.from_dict(dict.fromkeys(_authors(1000), 2**40))
    assert 40_000 < len(vv.encode()) <= 40_000 + 32
    assert VersionVector.decode(vv.encode(), max_authors=1000) == vv
    assert VersionVector.decode(VersionVector().encode()) == VersionVector()


def test_decoders_refuse_more_authors_than_the_cap() -> None:
    vv = VersionVector.from_dict(dict.fromkeys(_authors(100), 1))
    digest = Digest(vv, "00" * 32, 100)
    assert VersionVector.decode(vv.encode(), max_authors=100) == vv
    assert Digest.decode(digest.encode(), max_authors=100) == digest
    with pytest.raises(ValidationError, match="exceeds the limit"):
        VersionVector.decode(vv.encode(), max_authors=99)
    with pytest.raises(ValidationError, match="exceeds the limit"):
        Digest.decode(digest.encode(), max_authors=99)


def test_an_oversized_digest_is_refused_from_its_length_alone() -> None:
    """64 MiB of claimed authors: refused before msgpack parses it (nothing model-sized is built)."""
    huge = msgpack.packb([FORMAT_VERSION, "digest", b"\0" * (64 * 2**20), b"\0" * 32, 0])
    with pytest.raises(ValidationError, match="exceeds the limit"):
        Digest.decode(huge, max_authors=4096)


@pytest.mark.parametrize(
    ("authors", "seqs", "reason"),
    [
        ([b"b" * 32, b"a" * 32], [1, 1], "strictly increasing"),
        ([b"a" * 32, b"a" * 32], [1, 1], "strictly increasing"),
        ([b"a" * 32 + b"\x00\x01", b"b" * 30], [1, 1], "strictly increasing"),
        ([b"a" * 32], [0], "seqs must be"),
        ([b"a" * 32], [2**63], "seqs must be"),
        ([b"a" * 32], [], "n x 8"),
        ([b"a" * 31], [1], "n x 32"),
    ],
)
def test_packed_vector_rules(authors: list[bytes], seqs: list[int], reason: str) -> None:
    raw = msgpack.packb([FORMAT_VERSION, "vv", b"".join(authors),
                         b"".join(s.to_bytes(8, "little") for s in seqs)], use_bin_type=True)
    with pytest.raises(ValidationError, match=reason):
        VersionVector.decode(raw)


def test_sorted_order_is_bytewise_including_trailing_zero_bytes() -> None:
    """Keys that differ only in trailing zero bytes must still order bytewise (not as C strings)."""
    lo, hi = b"\x01" * 31 + b"\x00", b"\x01" * 31 + b"\x01"
    vv = VersionVector.from_dict({hi: 1, lo: 2})
    assert VersionVector.decode(vv.encode()) == vv and list(vv) == [lo, hi]
