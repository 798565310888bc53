from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.node.wire import (
    Announcement,
    BlobRef,
    GenesisOffer,
    GenesisRequest,
    Heartbeat,
    SnapshotOffer,
    SyncRequest,
    SyncResponse,
    WireError,
    valid_gossip,
)

REF = BlobRef(blob=b"snapshot/" + b"ab" * 32, root=b"r" * 32, size=10)


def test_round_trips() -> None:
    a = Announcement(author=b"a" * 32, seq=3, fragment=1, size=100, id="ab" * 32)
    assert Announcement.decode(a.encode()) == a
    r = SyncResponse(digest=b"d", contributions=(b"x", b"y"), checkpoints=(b"c",))
    assert SyncResponse.decode(r.encode()) == r
    q = SyncRequest(genesis="ab" * 32, digest=b"d", attested=12)
    assert SyncRequest.decode(q.encode()) == q
    with pytest.raises(WireError, match="attested"):
        SyncRequest.decode(msgpack.packb({"v": 1, "genesis": "ab" * 32, "digest": b"d", "attested": -1}))
    with pytest.raises(WireError, match="checkpoints"):
        SyncResponse.decode(dataclasses.replace(r, checkpoints=(b"c",) * 257).encode())
    h = Heartbeat(
        round=3,
        contributions=9,
        training="running",
        reachability="private",
        task="digits",
        device="cpu",
        throughput_bps=1200,
    )
    assert Heartbeat.decode(h.encode()) == h
    g = GenesisRequest(run="r")
    assert GenesisRequest.decode(g.encode()) == g
    offer = GenesisOffer(id="ab" * 32, meta={"run": "r"}, fragments=((0, 8), (8, 16)), ref=REF)
    assert GenesisOffer.decode(offer.encode()) == offer
    snapshot = SnapshotOffer(checkpoints=(b"c",), ref=REF)
    assert SnapshotOffer.decode(snapshot.encode()) == snapshot


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": "../../etc/passwd"}, "64 lowercase hex"),  # it names the download's file
        ({"root": b"short"}, "32-byte manifest root"),
        ({"size": 0}, "positive size"),
        ({"blob": b""}, "blob id"),
        ({"meta": {str(i): "x" for i in range(65)}}, "meta must be at most 64"),
        ({"fragments": [[0, "8"]]}, "fragments must be"),
    ],
)
def test_genesis_offer_rejects(change: dict, reason: str) -> None:
    good = GenesisOffer(id="ab" * 32, meta={}, fragments=((0, 8),), ref=REF).encode()
    with pytest.raises(WireError, match=reason):
        GenesisOffer.decode(msgpack.packb({**msgpack.unpackb(good), **change}))


def test_snapshot_offer_needs_checkpoints_and_stays_small() -> None:
    with pytest.raises(WireError, match="carries the checkpoints that attest it"):
        SnapshotOffer.decode(SnapshotOffer(checkpoints=(), ref=REF).encode())
    with pytest.raises(WireError, match="exceeds"):
        SnapshotOffer.decode(SnapshotOffer(checkpoints=(b"x" * (5 << 20),), ref=REF).encode())


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"v": 2, "run": "r"}, "unsupported wire version"),
        ({"v": 1}, "field 'run' missing"),
        ([1, 2], "expected a map"),
    ],
)
def test_genesis_request_rejects(message: object, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        GenesisRequest.decode(msgpack.packb(message))


def test_announcement_rejects_bad_fields() -> None:
    good = {"v": 1, "author": b"a" * 32, "seq": 1, "fragment": 0, "size": 1, "id": "x"}
    for key, value, reason in [
        ("author", b"short", "32-byte"),
        ("seq", 0, "out of range"),
        ("seq", True, "field 'seq'"),
        ("id", 5, "field 'id'"),
    ]:
        with pytest.raises(WireError, match=reason):
            Announcement.decode(msgpack.packb({**good, key: value}))
    with pytest.raises(WireError, match="exceeds"):
        Announcement.decode(msgpack.packb({**good, "id": "x" * 5000}))


def test_sync_response_rejects_non_bytes() -> None:
    with pytest.raises(WireError, match="byte strings"):
        SyncResponse.decode(msgpack.packb({"v": 1, "digest": b"", "contributions": ["s"]}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_another_error(data: bytes) -> None:
    decoders = (
        Announcement.decode,
        Heartbeat.decode,
        SyncRequest.decode,
        SyncResponse.decode,
        GenesisRequest.decode,
        GenesisOffer.decode,
        SnapshotOffer.decode,
    )
    for decoder in decoders:
        with contextlib.suppress(WireError):
            decoder(data)


def test_gossip_validator_accepts_only_what_decodes() -> None:
    validate = valid_gossip(Heartbeat.decode)
    beat = {
        "v": 1,
        "round": 1,
        "contributions": 1,
        "training": "running",
        "reachability": "public",
        "task": "digits",
        "device": "cpu",
        "throughput_bps": 0,
    }
    assert validate("peer", msgpack.packb(beat))
    assert not validate("peer", msgpack.packb({**beat, "reachability": "sideways"}))
    assert not validate("peer", msgpack.packb({**beat, "round": -1}))
    assert not validate("peer", b"\xc1garbage")
