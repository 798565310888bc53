"""The snapshot stream: exact round trips at any chunking, canonical structure, bounds, compactness."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zstandard
from crdt_testlib import contribution, genesis, history, read_snapshot, signer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crdt.snapshot as snapmod
from crdt import (
    FORMAT_VERSION,
    MAX_AUTHORS,
    SNAPSHOT_MAGIC,
    Genesis,
    GenesisMismatchError,
    Limits,
    ModelState,
    SnapshotHeader,
    SnapshotReader,
    ValidationError,
    VersionVector,
    frame_record,
)
from crdt.snapshot import combine_state_hash, encode_snapshot, fragment_digest

G = genesis(length=96, n_fragments=3)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 entries, so a 96-entry model spans many blocks and fragments cut blocks short."""
    monkeypatch.setattr(snapmod, "BLOCK_ENTRIES", 7)


def _stream(g: Genesis, acc: np.ndarray, vector: VersionVector | None = None) -> bytes:
    vector = vector or VersionVector()
    hashes = [fragment_digest(acc[a:b]) for a, b in g.fragments]
    header = SnapshotHeader(g.id, vector, combine_state_hash(g.id, vector, hashes), True)
    return b"".join(encode_snapshot(g, header, acc))


def _extremes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acc = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    acc[::5] = 0
    acc[1::7] = rng.integers(-300, 300, len(acc[1::7]))
    acc[:4] = [-(2**63), 2**63 - 1, -1, 1]
    return acc


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), chunk=st.integers(1, 400))
def test_exact_round_trip_in_any_chunks(small_blocks: None, seed: int, chunk: int) -> None:
    acc = _extremes(G.length, seed)
    snap = read_snapshot(G, _stream(G, acc), chunk=chunk)
    got, _ = snap.take()
    assert got.tobytes() == acc.tobytes()


def test_a_real_state_round_trips(small_blocks: None) -> None:
    state = ModelState(G)
    for c in history(G, n_authors=4, per_author=6):
        state.apply(c)
    stream = b"".join(state.snapshot_parts())
    back = ModelState.from_own_snapshot(G, read_snapshot(G, stream))
    assert back.accumulator.tobytes() == state.accumulator.tobytes() and back.state_hash == state.state_hash


def test_all_zero_planes_cost_only_framing() -> None:
    empty = b"".join(ModelState(G).snapshot_parts())  # 3 blocks of 32 entries, every plane empty
    assert len(empty) < 8 * G.length / 2


def test_compact_on_a_realistic_accumulator() -> None:
    """Sums of many q8-quantized float32 updates of ~1e-3 (as DiLoCo sends): <= 5 bytes per entry
    (bench/bench_crdt.py measures the real thing: ~3.5)."""
    n = 200_000
    g = Genesis(np.zeros(n, np.float32), ((0, n),))
    rng = np.random.default_rng(1)
    acc = np.zeros(n, np.int64)
    for _ in range(40):
        idx = rng.choice(n, n // 10, replace=False)
        vals = (rng.standard_normal(idx.size) * 1e-3).astype(np.float32)
        acc[idx] += np.rint(vals.astype(np.float64) * 2.0**32).astype(np.int64)
    size = len(_stream(g, acc))
    assert size / n < 5.0, size / n


def _blocks(stream: bytes) -> tuple[bytes, list[list[object]]]:
    """Split a stream into its head (magic + header part) and decoded block bodies."""
    pos = len(SNAPSHOT_MAGIC) + 1
    length = int.from_bytes(stream[pos : pos + 4], "little")
    head_end = pos + 8 + length
    blocks, pos = [], head_end
    while pos < len(stream):
        length = int.from_bytes(stream[pos : pos + 4], "little")
        blocks.append(msgpack.unpackb(stream[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    return stream[:head_end], blocks


def _reassemble(head: bytes, blocks: list[list[object]]) -> bytes:
    return head + b"".join(frame_record(msgpack.packb(b, use_bin_type=True)) for b in blocks)


ZSTD = zstandard.ZstdCompressor(level=1)
_SEVEN = ZSTD.compress(bytes(range(1, 8)))
_CORRUPT_FRAME = _SEVEN[: zstandard.frame_header_size(_SEVEN)] + b"\xff" * 5  # declares 7; bad block


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda b: b[0].__setitem__(2, b[0][2] + 1), "expected the block"),
        (lambda b: b[0][3].__setitem__(7, ZSTD.compress(b"\0" * 7)), "all-zero plane must be empty"),
        (lambda b: b[0][3].__setitem__(0, b[0][3][0] + b"x"), "exactly one zstd frame"),
        (lambda b: b[0][3].__setitem__(0, ZSTD.compress(b"\1" * 8)), "must declare 7"),
        (lambda b: b[0][3].__setitem__(0, _CORRUPT_FRAME), "bad zstd plane"),
        (lambda b: b[0][3].pop(), "8 bins"),
        (lambda b: b.pop(), "incomplete"),
        (lambda b: b.append(b[-1]), "extra bytes"),
    ],
)
def test_structure_is_strict(small_blocks: None, tamper, reason: str) -> None:
    head, blocks = _blocks(_stream(G, _extremes(G.length, 3)))
    tamper(blocks)
    with pytest.raises(ValidationError, match=reason):
        read_snapshot(G, _reassemble(head, blocks))


def test_framing_errors() -> None:
    stream = _stream(G, _extremes(G.length, 4))
    with pytest.raises(ValidationError, match="bad magic"):
        read_snapshot(G, b"MESHWAL" + stream[7:])
    with pytest.raises(ValidationError, match=r"format version 2.*does not migrate"):
        read_snapshot(G, SNAPSHOT_MAGIC + bytes([2]) + stream[8:])
    corrupt = bytearray(stream)
    corrupt[-3] ^= 0xFF
    with pytest.raises(ValidationError, match="checksum"):
        read_snapshot(G, bytes(corrupt))
    with pytest.raises(GenesisMismatchError):
        read_snapshot(genesis(length=96, n_fragments=3, seed=9), stream)
    with pytest.raises(ValidationError, match="incomplete or followed"):
        read_snapshot(G, stream + b"\0")


def test_an_oversized_part_is_refused_from_its_length() -> None:
    """A header claiming 1 GiB is refused as soon as its 8 framing bytes arrive: nothing is buffered."""
    reader = SnapshotReader(G, max_authors=16)
    with pytest.raises(ValidationError, match="exceeds its limit"):
        reader.feed(SNAPSHOT_MAGIC + bytes([FORMAT_VERSION]) + (2**30).to_bytes(4, "little") + b"\0" * 4)
    with pytest.raises(ValidationError, match="already failed"):
        reader.feed(b"\0")


def test_no_accumulator_before_the_first_block() -> None:
    head, *_ = ModelState(G).snapshot_parts()
    reader = SnapshotReader(G, max_authors=16)
    reader.feed(head)
    assert reader.header is not None and reader._acc is None


def test_own_snapshot_always_loads_while_peers_are_capped() -> None:
    """A state with more authors than a peer's cap still reloads from its own disk (MAX_AUTHORS)."""
    authors = [signer(200 + i) for i in range(6)]
    state = ModelState(G, limits=Limits(max_authors=6))
    for s in authors:
        state.apply(contribution(G, s, 1))
    stream = b"".join(state.snapshot_parts())
    with pytest.raises(ValidationError, match="exceeds the limit"):
        read_snapshot(G, stream, max_authors=5)
    assert ModelState.from_own_snapshot(G, read_snapshot(G, stream, max_authors=MAX_AUTHORS)).state_hash == \
        state.state_hash
