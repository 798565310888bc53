"""Sans-IO tests of p2p/_transfer.py: manifests and their bounds, the session wire format, the chunk plan."""

from __future__ import annotations

import random
import struct

import pytest

from p2p import IntegrityError, ProtocolViolation
from p2p._transfer import (
    DEFAULT_CHUNK_BYTES,
    DIGEST_BYTES,
    MAX_BLOB_BYTES,
    MAX_BLOB_REQUEST_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_BYTES,
    BlobRequest,
    FetchPlan,
    Manifest,
    Op,
    Verdict,
    blob_digest,
    check_blob,
    chunk_digest,
    default_chunk_size,
)

CHUNK = MIN_CHUNK_BYTES
GIB = 1024**3


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_manifest_build_roundtrip_and_ranges() -> None:
    data = blob(3 * CHUNK + 17)
    m = Manifest.build(data, chunk_size=CHUNK)
    assert m.chunk_count == 4 and m.size == len(data) and m.digest == blob_digest(data)
    assert m.chunk_range(0) == (0, CHUNK) and m.chunk_range(3) == (3 * CHUNK, 17)
    assert m.chunk_digests[3] == chunk_digest(data[3 * CHUNK :])
    assert chunk_digest(data[:10], data[10:CHUNK]) == m.chunk_digests[0]  # pieces hash like the whole
    assert Manifest.decode(m.encode()) == m
    same = Manifest.build_from_reader(lambda o, n: data[o : o + n], len(data), chunk_size=CHUNK)
    assert same == m
    empty = Manifest.build(b"", chunk_size=CHUNK)
    assert empty.chunk_count == 0 and Manifest.decode(empty.encode()) == empty
    with pytest.raises(IndexError):
        m.chunk_range(4)


def test_root_authenticates_every_field() -> None:
    m = Manifest.build(blob(2 * CHUNK), chunk_size=CHUNK)
    assert len(m.root) == DIGEST_BYTES and m.root == Manifest.decode(m.encode()).root
    lying = Manifest(m.size, m.chunk_size, m.digest, (m.chunk_digests[0], b"\0" * DIGEST_BYTES))
    assert lying.root != m.root  # same size and whole digest, one chunk digest changed
    assert Manifest.build(blob(2 * CHUNK), chunk_size=2 * CHUNK).root != m.root


def test_a_4_gib_blob_has_a_small_bounded_manifest() -> None:
    """A multi-GB genesis or snapshot must be describable: count, size and decode bounds all hold."""
    size = 4 * GIB + 123
    chunk = default_chunk_size(size)
    assert chunk == DEFAULT_CHUNK_BYTES
    m = Manifest(size, chunk, b"\1" * 32, tuple(b"\2" * 32 for _ in range(-(-size // chunk))))
    encoded = m.encode()
    assert m.chunk_count == 1025 and len(encoded) < 40 * 1024  # 32 KiB of chunk digests
    assert Manifest.decode(encoded) == m and m.chunk_range(1024) == (1024 * chunk, 123)


def test_chunk_size_grows_so_the_manifest_stays_bounded() -> None:
    assert default_chunk_size(0) == DEFAULT_CHUNK_BYTES
    assert default_chunk_size(256 * GIB) == DEFAULT_CHUNK_BYTES  # exactly MAX_CHUNKS chunks
    assert default_chunk_size(256 * GIB + 1) == 2 * DEFAULT_CHUNK_BYTES
    assert default_chunk_size(MAX_BLOB_BYTES) == MAX_CHUNK_BYTES
    with pytest.raises(ValueError, match="over the"):
        default_chunk_size(MAX_BLOB_BYTES + 1)
    assert MAX_MANIFEST_BYTES < 2 * 1024 * 1024 + 64
    with pytest.raises(ValueError, match="needs more than"):  # too many chunks for the bound
        Manifest(MAX_CHUNKS * CHUNK + 1, CHUNK, b"\0" * 32, ())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:10],  # truncated header
        lambda b: b[:-1],  # truncated digest list
        lambda b: b + b"\0" * 32,  # one digest too many
        lambda b: bytes([1]) + b[1:],  # the old wire version
        lambda b: b[:9] + (1).to_bytes(4, "big") + b[13:],  # chunk size below the minimum
        lambda b: b[:9] + (MAX_CHUNK_BYTES + 1).to_bytes(4, "big") + b[13:],  # and above the maximum
        lambda b: b + b"\0" * MAX_MANIFEST_BYTES,  # over the manifest bound, refused before parsing
    ],
)
def test_manifest_decode_rejects_garbage(mutate) -> None:  # type: ignore[no-untyped-def]
    good = Manifest.build(blob(2 * CHUNK), chunk_size=CHUNK).encode()
    with pytest.raises(ProtocolViolation):
        Manifest.decode(mutate(good))


def test_manifest_decode_refuses_a_chunk_count_over_the_bound() -> None:
    head = struct.pack(">BQI32sI", 2, (MAX_CHUNKS + 1) * CHUNK, CHUNK, b"\0" * 32, MAX_CHUNKS + 1)
    with pytest.raises(ProtocolViolation):
        Manifest.decode(head + b"\0" * 32 * (MAX_CHUNKS + 1))


def test_request_roundtrip_and_garbage() -> None:
    for req in (BlobRequest(Op.OPEN, b"snapshot/abc"), BlobRequest(Op.READ, index=2**32 - 1)):
        assert BlobRequest.decode(req.encode()) == req
    longest = BlobRequest(Op.OPEN, b"x" * 1024).encode()
    assert len(longest) == MAX_BLOB_REQUEST_BYTES
    read = BlobRequest(Op.READ, index=5).encode()
    for bad in (
        b"",
        b"\x02",
        b"\x02\x09\x00\x00\x00\x00",
        read[:-1],
        read + b"\0",
        b"\x01" + read[1:],
        longest + b"x",
    ):
        with pytest.raises(ProtocolViolation):
            BlobRequest.decode(bad)
    with pytest.raises(ValueError):
        BlobRequest(Op.OPEN, b"x" * 2000).encode()


# ---------------------------------------------------------------------------------------------- the plan


def answer(plan: FetchPlan, peer: str, index: int, data: bytes) -> Verdict:
    return plan.on_data(peer, index, size=len(data), digest=chunk_digest(data))


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
        if answer(plan, peer, i, sources[peer][off : off + n]) is Verdict.ACCEPTED:
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
    bad[3 * CHUNK + 7] ^= 1
    m = Manifest.build(data, chunk_size=CHUNK)
    plan = FetchPlan(m, max_in_flight_per_peer=8)
    plan.add_peer("evil")
    plan.add_peer("good")
    assert [plan.next_chunk("evil") for _ in range(4)] == [0, 1, 2, 3]
    assert answer(plan, "evil", 3, bytes(bad[3 * CHUNK : 4 * CHUNK])) is Verdict.CORRUPT
    assert "chunk 3 failed verification" in plan.peer_errors()["evil"]
    assert plan.next_chunk("evil") is None and plan.active_peers() == ["good"]
    out = drive(plan, {"good": data}, random.Random(2))  # 0..2 were in flight at evil: back in the pool
    assert bytes(out) == data


def test_a_short_chunk_is_corrupt_even_if_its_digest_were_right() -> None:
    data = blob(2 * CHUNK)
    plan = FetchPlan(Manifest.build(data, chunk_size=CHUNK))
    plan.add_peer("p")
    assert plan.next_chunk("p") == 0
    assert plan.on_data("p", 0, size=CHUNK - 1, digest=chunk_digest(data[:CHUNK])) is Verdict.CORRUPT


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
    assert answer(plan, "fast", 1, data[CHUNK:]) is Verdict.ACCEPTED
    assert plan.next_chunk("fast") == 0  # endgame: re-ask what "slow" still holds
    assert answer(plan, "fast", 0, data[:CHUNK]) is Verdict.ACCEPTED and plan.complete
    assert answer(plan, "slow", 0, data[:CHUNK]) is Verdict.DUPLICATE


def test_resume_state_skips_chunks_already_held() -> None:
    m = Manifest.build(blob(5 * CHUNK + 3), chunk_size=CHUNK)
    plan = FetchPlan(m, have={0, 2})
    plan.add_peer("p")
    assert [plan.next_chunk("p"), plan.next_chunk("p")] == [1, 3]
    with pytest.raises(ValueError):
        FetchPlan(m, have=[99])


def test_check_blob_detects_a_lying_manifest() -> None:
    m = Manifest.build(blob(CHUNK), chunk_size=CHUNK)
    with pytest.raises(IntegrityError):
        check_blob(m, blob_digest(b"something else"))
