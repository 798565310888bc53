"""Signer, Genesis, Contribution, VersionVector, Digest: round trips and strict decoding."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import numpy as np
import pytest
from crdt_testlib import BASE, SIGNERS, contribution, genesis
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    Contribution,
    Digest,
    Genesis,
    GenesisMismatchError,
    Limits,
    ModelState,
    SignatureError,
    Signer,
    Snapshot,
    ValidationError,
    VersionVector,
    encode_payload,
    make_contribution,
    verify_signature,
)


def test_signer_round_trip() -> None:
    s = Signer.from_seed(b"\x01" * 32)
    assert len(s.public_key) == 32
    sig = s.sign(b"hello")
    assert sig == s.sign(b"hello")  # deterministic
    assert verify_signature(s.public_key, b"hello", sig)
    assert not verify_signature(s.public_key, b"hellO", sig)
    assert not verify_signature(b"\x00" * 31, b"hello", sig)
    assert not verify_signature(s.public_key, b"hello", sig[:-1])
    with pytest.raises(ValidationError):
        Signer.from_seed(b"short")


def test_genesis_round_trip_and_id() -> None:
    g = genesis()
    g2 = Genesis.decode(g.encode())
    assert g2 == g and g2.id == g.id and len(g.id) == 64
    np.testing.assert_array_equal(g2.params, g.params)
    assert g2.meta["task"] == "test"
    assert not g.params.flags.writeable
    other = Genesis(g.params.copy(), g.fragments, {"task": "other"})
    assert other.id != g.id


@pytest.mark.parametrize(
    ("params", "fragments", "meta", "reason"),
    [
        (np.zeros(4, np.float64), ((0, 4),), {}, "float32"),
        (np.zeros(4, np.float32), ((0, 2), (3, 4)), {}, "contiguous"),
        (np.zeros(4, np.float32), ((0, 3),), {}, "cover"),
        (np.zeros(4, np.float32), (), {}, "at least one"),
        (np.array([np.nan], np.float32), ((0, 1),), {}, "NaN"),
        (np.zeros(1, np.float32), ((0, 1),), {"a": 1}, "str->str"),
    ],
)
def test_genesis_rejects(params, fragments, meta, reason) -> None:
    with pytest.raises(ValidationError, match=reason):
        Genesis(params, fragments, meta)


def test_contribution_round_trip() -> None:
    g = genesis()
    c = contribution(g, SIGNERS[0], 1)
    data = c.encode()
    c2 = Contribution.decode(data)
    assert c2 == c and c2.id == c.id
    idx, vals = c2.validate_against(g)
    assert idx.dtype == np.uint32 and vals.dtype == np.float32


def test_contribution_signature_and_fields() -> None:
    g = genesis()
    c = contribution(g, SIGNERS[0], 1)
    forged = dataclasses.replace(c, weight=c.weight * 2)
    with pytest.raises(SignatureError):
        Contribution.decode(forged.encode())
    stolen = dataclasses.replace(c, author=SIGNERS[1].public_key)
    with pytest.raises(SignatureError):
        stolen.verify()
    assert c.id != forged.id
    for bad, reason in [
        (dataclasses.replace(c, seq=0), "seq"),
        (dataclasses.replace(c, codec="zip"), "codec"),
        (dataclasses.replace(c, weight=float("nan")), "weight"),
        (dataclasses.replace(c, weight=-1.0), "weight"),
        (dataclasses.replace(c, base_version=b"x"), "base_version"),
        (dataclasses.replace(c, author=b"x"), "author"),
    ]:
        with pytest.raises(ValidationError, match=reason):
            Contribution.decode(bad.encode())
    with pytest.raises(ValidationError, match="exceeds"):
        Contribution.decode(c.encode(), limits=Limits(max_payload_bytes=10))


def test_validate_against() -> None:
    g = genesis(length=96, n_fragments=3)
    s = SIGNERS[0]
    big = encode_payload("sparse-f32", 32, np.array([0], np.uint32), np.array([1e5], np.float32))
    c = make_contribution(s, genesis_id=g.id, seq=1, fragment=0, codec="sparse-f32", payload=big, weight=1.0,
                          base_version=BASE)
    with pytest.raises(ValidationError, match="norm"):
        c.validate_against(g)
    c = make_contribution(s, genesis_id=g.id, seq=1, fragment=7, codec="sparse-f32", payload=big, weight=1.0,
                          base_version=BASE)
    with pytest.raises(GenesisMismatchError):
        c.validate_against(g)
    wide = encode_payload("sparse-f32", 64, np.array([40], np.uint32), np.array([1.0], np.float32))
    c = make_contribution(s, genesis_id=g.id, seq=1, fragment=0, codec="sparse-f32", payload=wide, weight=1.0,
                          base_version=BASE)
    with pytest.raises(ValidationError, match="out of range"):
        c.validate_against(g)


def test_non_canonical_rejected() -> None:
    c = contribution(genesis(), SIGNERS[0], 1)
    obj = msgpack.unpackb(c.encode())
    obj[7] = 0.5  # float64 weight re-packed as float32 is a different byte string for the same value
    data = msgpack.packb(obj, use_single_float=True)
    with pytest.raises(ValidationError):
        Contribution.decode(data)


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


# -- fuzz: every decoder raises ValidationError and nothing else -------------------------------------------

_G = genesis()
_SAMPLES = {
    "contribution": contribution(_G, SIGNERS[0], 1).encode(),
    "genesis": _G.encode(),
    "vv": VersionVector.from_dict({SIGNERS[0].public_key: 2}).encode(),
    "digest": Digest(VersionVector.from_dict({SIGNERS[0].public_key: 2}), "00" * 32, 2).encode(),
    "snapshot": ModelState(_G).snapshot().encode(),
}
_DECODERS = {
    "contribution": Contribution.decode,
    "genesis": Genesis.decode,
    "vv": VersionVector.decode,
    "digest": Digest.decode,
    "snapshot": Snapshot.decode,
}

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=10),
    max_leaves=20,
)


def _mutate(data: bytes, pos: int, byte: int, cut: int) -> bytes:
    b = bytearray(data)
    if b:
        b[pos % len(b)] = byte
    return bytes(b[: max(0, len(b) - cut)])


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(_DECODERS)), pos=st.integers(0, 10_000), byte=st.integers(0, 255),
       cut=st.integers(0, 3))
def test_fuzz_mutated_records(kind: str, pos: int, byte: int, cut: int) -> None:
    data = _mutate(_SAMPLES[kind], pos, byte, cut)
    with contextlib.suppress(ValidationError):
        _DECODERS[kind](data)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(sorted(_DECODERS)), obj=_msgpack_values, header=st.booleans())
def test_fuzz_structured_garbage(kind: str, obj: object, header: bool) -> None:
    if header and isinstance(obj, list):
        obj = [1, kind, *obj]
    data = msgpack.packb(obj, use_bin_type=True)
    try:
        rec = _DECODERS[kind](data)
    except ValidationError:
        return
    assert rec.encode() == data  # the rare valid one (e.g. an empty vector) must be canonical


@pytest.mark.parametrize("kind", sorted(_DECODERS))
@pytest.mark.parametrize("junk", [None, "str", 5, b"", b"\xc1", b"\x91\x01" * 3])
def test_wrong_types(kind: str, junk: object) -> None:
    with pytest.raises(ValidationError):
        _DECODERS[kind](junk)  # type: ignore[arg-type]
