"""The influence window (crdt/state.py, genesis ``meta["influence_window"]``): an author's records are paced
and clipped by the other authors' progress, deterministically, through snapshots and compaction."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from crdt_testlib import SIGNERS, genesis

from crdt import (
    ApplyOutcome,
    Contribution,
    Genesis,
    GenesisMismatchError,
    ModelState,
    SignatureError,
    SnapshotReader,
    ValidationError,
    VersionVector,
    encode_payload,
    make_contribution,
)
from crdt.state import QUANTUM

BASE = genesis()
CLIP = 0.3
HONEST, OTHER, ATTACKER = SIGNERS[0], SIGNERS[1], SIGNERS[2]


def windowed(window: int = 1, clip: float | None = CLIP) -> Genesis:
    meta = {"task": "test", "influence_window": str(window)} | ({"clip_norm": repr(clip)} if clip else {})
    return Genesis(BASE.params, BASE.fragments, meta)


def record(g: Genesis, signer: object, seq: int, base_count: int, value: float = 1.0) -> Contribution:
    n = g.fragment_length(0)
    payload = encode_payload("dense-f32", n, None, np.full(n, value, np.float32))
    return make_contribution(signer, genesis_id=g.id, seq=seq, fragment=0, codec="dense-f32",  # type: ignore[arg-type]
                             payload=payload, weight=1.0, base_version=b"\x00" * 32, base_count=base_count)


def moved(state: ModelState) -> float:
    """L2 distance the model moved from the genesis."""
    return float(np.linalg.norm(state.accumulator.astype(np.float64) * QUANTUM))


def test_a_burst_of_records_moves_the_model_by_one_clip_per_window_of_others_progress() -> None:
    """The issue's attack: one author signing seqs 1 to 100 at once moved the model by 30 with
    clip_norm 0.3. With a window, what it signed ahead of the others waits, and what applies is clipped
    to the run's progress: 3 records of others let in at most 1 + 3/W clips."""
    g = windowed(window=1)
    state = ModelState(g)
    burst = [record(g, ATTACKER, s, base_count=s - 1, value=5.0) for s in range(1, 101)]
    outcomes = state.apply_all(burst)
    assert outcomes[0] == ApplyOutcome.APPLIED and set(outcomes[1:]) == {ApplyOutcome.BUFFERED}
    assert math.isclose(moved(state), CLIP, rel_tol=1e-6)
    for seq in (1, 2, 3):  # the others' progress: zero updates, so the movement is all the attacker's
        state.apply(record(g, HONEST, seq, base_count=seq - 1, value=0.0))
    assert state.version_vector.get(ATTACKER.public_key) == 4  # seqs 2-4 got in, 96 wait
    assert moved(state) <= CLIP * (1 + 3) * (1 + 1e-6)
    plain = Genesis(BASE.params, BASE.fragments, {"task": "test", "clip_norm": repr(CLIP)})
    without = ModelState(plain)
    without.apply_all([record(plain, ATTACKER, s, base_count=s - 1, value=5.0) for s in range(1, 101)])
    assert math.isclose(moved(without), 100 * CLIP, rel_tol=1e-6)  # what the window stops


def test_records_that_claim_no_progress_move_nothing_and_a_base_that_does_not_grow_is_invalid() -> None:
    g = windowed(window=4)
    state = ModelState(g)
    state.apply(record(g, ATTACKER, 1, base_count=0, value=5.0))  # first record: a full clip
    with pytest.raises(ValidationError, match="base_count"):
        state.apply(record(g, ATTACKER, 2, base_count=0, value=5.0))
    for signer in (HONEST, OTHER):
        state.apply(record(g, signer, 1, base_count=0, value=0.0))
    state.apply(record(g, ATTACKER, 2, base_count=1, value=5.0))  # a quarter of a window since seq 1
    assert math.isclose(moved(state), CLIP * 1.25, rel_tol=1e-6)


def test_an_honest_run_with_a_round_between_records_is_not_clipped_more() -> None:
    """Two authors alternating rounds (each record a window apart) hold exactly the accumulator of the same
    records without a window."""
    g = windowed(window=1)
    plain_g = Genesis(BASE.params, BASE.fragments, {"task": "test", "clip_norm": repr(CLIP)})
    windowed_state, plain = ModelState(g), ModelState(plain_g)
    for seq in range(1, 6):
        for signer in (HONEST, OTHER):
            windowed_state.apply(record(g, signer, seq, base_count=seq - 1, value=0.01 * seq))
            plain.apply(record(plain_g, signer, seq, base_count=seq - 1, value=0.01 * seq))
    assert windowed_state.contribution_count == 10
    assert np.array_equal(windowed_state.accumulator, plain.accumulator)


def _history(g: Genesis) -> list[Contribution]:
    """Three authors, one of them bursting ahead; every record eventually applicable."""
    out = [record(g, ATTACKER, s, base_count=s - 1, value=-3.0) for s in range(1, 7)]
    for seq in range(1, 5):
        out.append(record(g, HONEST, seq, base_count=2 * (seq - 1), value=0.02))
        out.append(record(g, OTHER, seq, base_count=2 * (seq - 1) + 1, value=-0.01))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_any_order_with_duplicates_gives_the_same_state(seed: int) -> None:
    g = windowed(window=2)
    history = _history(g)
    reference = ModelState(g)
    reference.apply_all(history)
    rng = random.Random(seed)
    shuffled = history + rng.sample(history, 5)
    rng.shuffle(shuffled)
    state = ModelState(g)
    for c in shuffled:
        state.apply(c)
    assert state.version_vector == reference.version_vector
    assert state.state_hash == reference.state_hash and state.pending_count == 0


def test_a_compacted_snapshot_keeps_the_bases_and_clips_the_next_record_alike() -> None:
    g = windowed(window=2)
    state = ModelState(g)
    state.apply_all(_history(g))
    past = state.version_vector
    state.compact(past)  # the last records are gone: their bases live on in the state and snapshot
    reader = SnapshotReader(g, max_authors=16)
    for part in state.snapshot_parts():
        reader.feed(part)
    snapshot = reader.finish()
    assert snapshot.header.bases.get(ATTACKER.public_key) == 5
    restored = ModelState.from_own_snapshot(g, snapshot)
    assert restored.state_hash == state.state_hash
    nxt = record(g, ATTACKER, 7, base_count=6, value=-3.0)  # one step past its base 5: half a window
    state.apply(nxt)
    restored.apply(nxt)
    assert restored.state_hash == state.state_hash


def test_the_state_hash_binds_the_bases_so_a_snapshot_cannot_lie_about_them() -> None:
    g = windowed(window=2)
    state = ModelState(g)
    state.apply_all(_history(g))
    parts = list(state.snapshot_parts())
    header = SnapshotReader(g, max_authors=16)
    header.feed(parts[0])
    assert header.header is not None
    forged = header.header.__class__(header.header.genesis_id, header.header.version_vector,
                                     header.header.state_hash, True,
                                     VersionVector.from_dict({ATTACKER.public_key: 1}))
    from crdt.log import frame_record
    from crdt.records import FORMAT_VERSION
    from crdt.snapshot import SNAPSHOT_MAGIC
    reader = SnapshotReader(g, max_authors=16)
    reader.feed(SNAPSHOT_MAGIC + bytes([FORMAT_VERSION]) + frame_record(forged.encode()))
    for part in parts[1:]:
        reader.feed(part)
    with pytest.raises(ValidationError, match="state hash"):
        reader.finish()


def test_state_hash_at_a_past_vector_matches_a_state_built_from_its_records() -> None:
    """What a checkpoint signer computes to countersign a fellow signer's checkpoint."""
    g = windowed(window=2)
    history = _history(g)
    state = ModelState(g)
    state.apply_all(history)
    past = VersionVector.from_dict({ATTACKER.public_key: 3, HONEST.public_key: 2, OTHER.public_key: 1})
    rebuilt = ModelState(g)
    rebuilt.apply_all([c for c in history if c.seq <= past.get(c.author)])
    assert rebuilt.version_vector == past
    assert state.state_hash_at(past) == rebuilt.state_hash


def test_base_count_is_signed_and_omitted_when_zero() -> None:
    g = windowed()
    plain = record(g, HONEST, 1, base_count=0)
    stated = record(g, HONEST, 1, base_count=7)
    assert len(stated.encode()) > len(plain.encode())  # the field rides only when stated
    assert Contribution.decode(stated.encode()).base_count == 7
    assert Contribution.decode(plain.encode()).base_count == 0
    fields = ("author", "genesis_id", "seq", "fragment", "codec", "payload", "weight", "base_version",
              "signature")
    tampered = Contribution(*[getattr(stated, f) for f in fields], base_count=8)
    with pytest.raises(SignatureError):
        Contribution.decode(tampered.encode())


@pytest.mark.parametrize("raw", ["0", "-1", "1.5", "abc", ""])
def test_a_window_must_be_a_positive_integer(raw: str) -> None:
    with pytest.raises(GenesisMismatchError):
        ModelState(Genesis(BASE.params, BASE.fragments, {"influence_window": raw}))
