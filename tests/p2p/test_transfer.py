"""Sans-IO tests of p2p/_transfer.py: manifests, wire format, the chunk plan, resume scanning. No sockets."""

from __future__ import annotations

import random

import pytest

from p2p import IntegrityError, ProtocolViolation
from p2p._transfer import (
    MIN_CHUNK_BYTES,
    BlobRequest,
    BlobSource,
    FetchPlan,
    Manifest,
    Op,
    Verdict,
    blob_digest,
    check_blob,
    scan_verified_chunks,
)

CHUNK = MIN_CHUNK_BYTES


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_manifest_build_roundtrip_and_ranges() -> None:
    data = blob(3 * CHUNK + 17)
    m = Manifest.build(data, chunk_size=CHUNK)
    assert m.chunk_count == 4 and m.size == len(data) and m.digest == blob_digest(data)
    assert m.chunk_range(0) == (0, CHUNK) and m.chunk_range(3) == (3 * CHUNK, 17)
    assert Manifest.decode(m.encode()) == m
    same = Manifest.build_from_reader(lambda o, n: data[o : o + n], len(data), chunk_size=CHUNK)
    assert same == m
    empty = Manifest.build(b"", chunk_size=CHUNK)
    assert empty.chunk_count == 0 and Manifest.decode(empty.encode()) == empty
    with pytest.raises(IndexError):
        m.chunk_range(4)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:10],  # truncated header
        lambda b: b[:-1],  # truncated digest list
        lambda b: b + b"\0" * 32,  # one digest too many
        lambda b: bytes([2]) + b[1:],  # unknown version
        lambda b: b[:9] + (1).to_bytes(4, "big") + b[13:],  # chunk size below the minimum
    ],
)
def test_manifest_decode_rejects_garbage(mutate) -> None:  # type: ignore[no-untyped-def]
    good = Manifest.build(blob(2 * CHUNK), chunk_size=CHUNK).encode()
    with pytest.raises(ProtocolViolation):
        Manifest.decode(mutate(good))


def test_request_roundtrip_and_garbage() -> None:
    req = BlobRequest(Op.READ, b"snapshot/abc", offset=5 * CHUNK, length=CHUNK)
    assert BlobRequest.decode(req.encode()) == req
    assert BlobRequest.decode(BlobRequest(Op.MANIFEST, b"").encode()).op is Op.MANIFEST
    for bad in (b"", b"\x01\x09\x00\x00" + b"\0" * 12, req.encode()[:-1], b"\x07" + req.encode()[1:]):
        with pytest.raises(ProtocolViolation):
            BlobRequest.decode(bad)
    with pytest.raises(ValueError):
        BlobRequest(Op.READ, b"x" * 2000).encode()


def test_blob_source_bounds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = blob(2 * CHUNK + 5)
    path = tmp_path / "b"
    path.write_bytes(data)
    for src in (
        BlobSource.from_bytes(data, chunk_size=CHUNK),
        BlobSource.from_file(str(path), chunk_size=CHUNK),
    ):
        assert src.manifest == Manifest.build(data, chunk_size=CHUNK)
        assert src.read(CHUNK, 10) == data[CHUNK : CHUNK + 10]
        with pytest.raises(ValueError):
            src.read(2 * CHUNK, 6)  # past the end
        with pytest.raises(ValueError):
            src.read(-1, 1)


def drive(plan: FetchPlan, sources: dict[str, bytes], order: random.Random) -> bytearray:
    """Run the plan to completion against in-memory peers, completing requests in a random order."""
    out = bytearray(plan.manifest.size)
    in_flight: list[tuple[str, int]] = []
    while not plan.complete:
        for peer in plan.active_peers():
            while (i := plan.next_chunk(peer)) is not None:
                in_flight.append((peer, i))
        assert in_flight, "plan stalled"
        peer, i = in_flight.pop(order.randrange(len(in_flight)))
        off, n = plan.manifest.chunk_range(i)
        if plan.on_data(peer, i, sources[peer][off : off + n]) is Verdict.ACCEPTED:
            out[off : off + n] = sources[peer][off : off + n]
    return out


def test_plan_spreads_chunks_over_peers_and_completes() -> None:
    data = blob(10 * CHUNK + 1)
    m = Manifest.build(data, chunk_size=CHUNK)
    plan = FetchPlan(m, max_in_flight_per_peer=2)
    for p in ("a", "b", "c"):
        plan.add_peer(p)
    out = drive(plan, {"a": data, "b": data, "c": data}, random.Random(1))
    check_blob(m, blob_digest(out))
    assert bytes(out) == data
    assert all(plan.peers[p].chunks_ok >= 2 for p in "abc")  # everyone did part of the work
    assert plan.bytes_accepted == len(data) and plan.peer_errors() == {}


def test_corrupt_peer_is_dropped_and_its_chunks_refetched() -> None:
    data = blob(8 * CHUNK)
    bad = bytearray(data)
    bad[3 * CHUNK + 7] ^= 1  # chunk 3 corrupt at peer "evil"
    m = Manifest.build(data, chunk_size=CHUNK)
    plan = FetchPlan(m, max_in_flight_per_peer=8)
    plan.add_peer("evil")
    plan.add_peer("good")
    assert [plan.next_chunk("evil") for _ in range(4)] == [0, 1, 2, 3]
    assert plan.on_data("evil", 3, bytes(bad[3 * CHUNK : 4 * CHUNK])) is Verdict.CORRUPT
    assert "chunk 3 failed verification" in plan.peer_errors()["evil"]
    assert plan.next_chunk("evil") is None and plan.active_peers() == ["good"]
    out = drive(plan, {"good": data}, random.Random(2))  # 0..2 were in flight at evil: back in the pool
    assert bytes(out) == data


def test_peer_failure_requeues_in_flight_and_exhaustion_is_visible() -> None:
    m = Manifest.build(blob(4 * CHUNK), chunk_size=CHUNK)
    plan = FetchPlan(m, max_in_flight_per_peer=2)
    plan.add_peer("a")
    plan.add_peer("b")
    assert (plan.next_chunk("a"), plan.next_chunk("a"), plan.next_chunk("a")) == (0, 1, None)  # capped
    assert (plan.next_chunk("b"), plan.next_chunk("b")) == (2, 3)
    plan.on_failure("a", 0, "connection reset")
    assert plan.peer_errors() == {"a": "connection reset"}
    assert plan.next_chunk("b") is None  # b is at its cap; 0 and 1 wait in the pool for it
    plan.on_failure("b", None, "peer disconnected")
    assert plan.active_peers() == [] and not plan.complete


def test_endgame_duplicates_a_slow_peers_last_chunk() -> None:
    data = blob(2 * CHUNK)
    m = Manifest.build(data, chunk_size=CHUNK)
    plan = FetchPlan(m, max_in_flight_per_peer=1)
    plan.add_peer("slow")
    plan.add_peer("fast")
    assert plan.next_chunk("slow") == 0 and plan.next_chunk("fast") == 1
    assert plan.on_data("fast", 1, data[CHUNK:]) is Verdict.ACCEPTED
    assert plan.next_chunk("fast") == 0  # endgame: re-ask what "slow" still holds
    assert plan.on_data("fast", 0, data[:CHUNK]) is Verdict.ACCEPTED and plan.complete
    assert plan.on_data("slow", 0, data[:CHUNK]) is Verdict.DUPLICATE


def test_resume_scan_keeps_only_matching_chunks() -> None:
    data = blob(5 * CHUNK + 3)
    m = Manifest.build(data, chunk_size=CHUNK)
    partial = bytearray(data[: 3 * CHUNK + 100])  # torn inside chunk 3
    partial[CHUNK + 1] ^= 0xFF  # and chunk 1 rotted on disk
    have = scan_verified_chunks(m, lambda o, n: bytes(partial[o : o + n]), len(partial))
    assert have == {0, 2}
    plan = FetchPlan(m, have=have)
    plan.add_peer("p")
    assert [plan.next_chunk("p"), plan.next_chunk("p")] == [1, 3]
    with pytest.raises(ValueError):
        FetchPlan(m, have=[99])


def test_check_blob_detects_a_lying_manifest() -> None:
    m = Manifest.build(blob(CHUNK), chunk_size=CHUNK)
    with pytest.raises(IntegrityError):
        check_blob(m, blob_digest(b"something else"))
