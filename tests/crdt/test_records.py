"""Signer, Genesis, Contribution (and the exact norm), record decoders: round trips and strict decoding."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import msgpack
import numpy as np
import pytest
from crdt_testlib import BASE, SIGNERS, contribution, genesis
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    Checkpoint,
    Contribution,
    Digest,
    Genesis,
    GenesisMismatchError,
    Limits,
    ModelState,
    SignatureError,
    Signer,
    SnapshotHeader,
    ValidationError,
    VersionVector,
    encode_payload,
    make_contribution,
    verify_signature,
    weighted_norm,
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


def test_genesis_holds_its_parameters_once() -> None:
    """No second copy of the model: decode keeps msgpack's bytes as the params, and the encoding is
    rebuilt on demand (the id is hashed from its pieces, equal to hashing the whole encoding)."""
    g = genesis(length=4096, n_fragments=4)
    data = g.encode()
    g2 = Genesis.decode(memoryview(data))
    assert isinstance(g2.params.base, bytes) and not g2.params.flags.writeable
    assert not any(isinstance(v, bytes) and len(v) >= g.params.nbytes
                   for v in (getattr(g2, f) for f in ("_head", "_tail")))
    assert g2.encode() == data and g2.id == g.id
    import hashlib
    assert hashlib.blake2b(data, digest_size=32).hexdigest() == g.id
    mutable = np.ones(8, np.float32)
    g3 = Genesis(mutable, ((0, 8),))
    mutable[0] = 5.0  # the caller's array is copied, not aliased
    assert g3.params[0] == 1.0


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
    idx, vals, _ = c2.validate_against(g)
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


def _dense(g: Genesis, values: np.ndarray) -> Contribution:
    payload = encode_payload("dense-f32", g.fragment_length(0), None, values)
    return make_contribution(SIGNERS[0], genesis_id=g.id, seq=1, fragment=0, codec="dense-f32",
                             payload=payload, weight=1.0, base_version=BASE)


def test_max_norm_decision_uses_the_exact_sum() -> None:
    """A crafted update whose squares np.sum adds inexactly (1.0 first, then 4,096 squares of 2**-54
    that vanish against it in numpy's first accumulator lane): with max_norm set to np.sum's norm, the
    exact norm is above the bound and the record is refused; at the exact norm it is accepted. A replica
    that used np.sum would accept the first one: the decision must not depend on the summation order."""
    values = np.full(4097, 2.0**-27, dtype=np.float32)
    values[0] = 1.0
    g = Genesis(np.zeros(values.size, np.float32), ((0, values.size),))
    v64 = values.astype(np.float64)
    numpy_norm = float(np.sqrt(np.sum(v64 * v64)))
    exact = weighted_norm(values, 1.0)
    assert exact == float(np.sqrt(1.0 + 4096 * 2.0**-54))  # 1 + 2**-42 is exact in float64
    assert numpy_norm < exact  # what np.sum gives here: some squares lost
    c = _dense(g, values)
    with pytest.raises(ValidationError, match="norm"):
        c.validate_against(g, Limits(max_norm=numpy_norm))
    assert c.validate_against(g, Limits(max_norm=exact))[2] == exact


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=300),
       st.floats(min_value=1e-6, max_value=1e6))
def test_weighted_norm_is_the_correctly_rounded_one(values: list[float], weight: float) -> None:
    """The integer sum of squares equals math.fsum of the exact float64 squares (correctly rounded),
    subnormals, huge values and zeros included."""
    v64 = np.array(values, np.float32).astype(np.float64)
    expected = math.sqrt(math.fsum((v64 * v64).tolist())) * weight
    assert weighted_norm(np.array(values, np.float32), weight) == expected


def test_non_canonical_rejected() -> None:
    c = contribution(genesis(), SIGNERS[0], 1)
    obj = msgpack.unpackb(c.encode())
    obj[7] = 0.5  # float64 weight re-packed as float32 is a different byte string for the same value
    data = msgpack.packb(obj, use_single_float=True)
    with pytest.raises(ValidationError):
        Contribution.decode(data)


# -- fuzz: every decoder raises ValidationError and nothing else -------------------------------------------

_G = genesis()
_SAMPLES = {
    "contribution": contribution(_G, SIGNERS[0], 1).encode(),
    "genesis": _G.encode(),
    "vv": VersionVector.from_dict({SIGNERS[0].public_key: 2}).encode(),
    "digest": Digest(VersionVector.from_dict({SIGNERS[0].public_key: 2}), "00" * 32, 2).encode(),
    "snapshot": SnapshotHeader(_G.id, VersionVector.from_dict({SIGNERS[0].public_key: 2}), "00" * 32,
                               True).encode(),
    "checkpoint": ModelState(_G).checkpoint(SIGNERS[1]).encode(),
}
_DECODERS = {
    "contribution": Contribution.decode,
    "genesis": Genesis.decode,
    "vv": VersionVector.decode,
    "digest": Digest.decode,
    "snapshot": lambda data: SnapshotHeader.decode(data, max_authors=16),
    "checkpoint": Checkpoint.decode,
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
