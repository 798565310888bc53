"""Checkpoints and the adoption rule: forged snapshots are refused, quorum-attested ones adopted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from crdt_testlib import SIGNERS, contribution, genesis, history, read_snapshot, signer

from crdt import (
    ApplyOutcome,
    AttestationError,
    Checkpoint,
    CheckpointPolicy,
    Genesis,
    ModelState,
    SignatureError,
    SnapshotHeader,
    SnapshotReader,
    ValidationError,
    VersionVector,
    check_attestation,
    make_checkpoint,
)
from crdt.snapshot import combine_state_hash, encode_snapshot, fragment_digest

G = genesis(length=96, n_fragments=3)
HIST = history(G, n_authors=3, per_author=3)
HONEST = SIGNERS[0]
OPERATORS = [signer(100 + i) for i in range(3)]
POLICY = CheckpointPolicy(frozenset(s.public_key for s in OPERATORS), 2)
ATTACKER = signer(666)


def _replay(cs, g: Genesis = G) -> ModelState:
    s = ModelState(g)
    for c in cs:
        s.apply(c)
    return s


def _forged_stream(g: Genesis, vector: VersionVector, acc: np.ndarray) -> tuple[bytes, SnapshotHeader]:
    """What the attack script served: any accumulator, any vector, and the hash that matches them."""
    hashes = [fragment_digest(acc[a:b]) for a, b in g.fragments]
    header = SnapshotHeader(g.id, vector, combine_state_hash(g.id, vector, hashes), True)
    return b"".join(encode_snapshot(g, header, acc)), header


def test_a_forged_snapshot_is_refused_and_changes_nothing() -> None:
    victim = _replay([c for c in HIST if c.seq <= 2])
    before_hash, before_model = victim.state_hash, victim.materialize().tobytes()
    inflated = VersionVector.from_dict({**dict(victim.version_vector), HONEST.public_key: 1_000_000})
    acc = np.random.default_rng(0).integers(-(2**62), 2**62, G.length, dtype=np.int64)
    stream, header = _forged_stream(G, inflated, acc)
    forged = read_snapshot(G, stream)  # self-consistent: its content does match its hash
    attacker_says = make_checkpoint(ATTACKER, genesis_id=G.id, version_vector=inflated,
                                    state_hash=header.state_hash)
    for offered in ([], [attacker_says], [attacker_says, attacker_says]):
        with pytest.raises(AttestationError, match="0 of the 2"):
            ModelState.from_snapshot(G, forged, checkpoints=offered, policy=POLICY, log=victim.records())
    assert victim.state_hash == before_hash and victim.materialize().tobytes() == before_model
    nxt = next(c for c in HIST if c.author == HONEST.public_key and c.seq == 3)
    assert victim.apply(nxt) is ApplyOutcome.APPLIED  # not a "duplicate" of a seq nobody signed


def test_a_quorum_attested_snapshot_is_adopted() -> None:
    """Two operators compute the state from records in different orders and attest it; a joiner adopts
    the snapshot served by a third party, checking the header before the body arrives."""
    a, b = _replay(HIST), _replay(list(reversed(HIST)))
    checkpoints = [a.checkpoint(OPERATORS[0]), b.checkpoint(OPERATORS[2])]
    head, *body = a.snapshot_parts()  # the first part is the magic and the header
    reader = SnapshotReader(G, max_authors=16)
    reader.feed(head[:40])
    assert reader.header is None
    reader.feed(head[40:])
    assert reader.header is not None and not reader.done
    assert check_attestation(reader.header, checkpoints, POLICY) == tuple(
        sorted(checkpoints, key=lambda cp: cp.signer))
    reader.feed(b"".join(body))
    joiner = ModelState.from_snapshot(G, reader.finish(), checkpoints=checkpoints, policy=POLICY)
    assert joiner.state_hash == a.state_hash and joiner.materialize().tobytes() == a.materialize().tobytes()
    assert not joiner.self_verified
    with pytest.raises(AttestationError, match="peer's snapshot"):  # it cannot launder the signatures
        joiner.checkpoint(OPERATORS[1])
    assert ModelState.from_own_snapshot(G, read_snapshot(G, a.snapshot_parts())).self_verified


@pytest.mark.parametrize("case", ["one signer", "same signer twice", "non-signers", "other genesis",
                                  "other vector", "bad signature"])
def test_what_does_not_make_a_quorum(case: str) -> None:
    state = _replay(HIST)
    header = read_snapshot(G, state.snapshot_parts()).header
    good = state.checkpoint(OPERATORS[0])
    earlier = _replay([c for c in HIST if c.seq <= 2])
    offered = {
        "one signer": [good],
        "same signer twice": [good, good],
        "non-signers": [state.checkpoint(ATTACKER), state.checkpoint(SIGNERS[1]), good],
        "other genesis": [good, make_checkpoint(OPERATORS[1], genesis_id="ab" * 32,
                                                version_vector=header.version_vector,
                                                state_hash=header.state_hash)],
        "other vector": [good, earlier.checkpoint(OPERATORS[1])],
        "bad signature": [good, dataclasses.replace(state.checkpoint(OPERATORS[1]), signature=b"\1" * 64)],
    }[case]
    with pytest.raises(AttestationError, match="1 of the 2"):
        check_attestation(header, offered, POLICY)


def test_signers_contradicting_each_other_block_adoption() -> None:
    """A colluding pair attests a forged state at the honest vector; one honest signer's checkpoint of
    the real state for that vector is enough to refuse it (and the pair is evidence)."""
    real = _replay(HIST)
    acc = real.accumulator.copy()
    acc[0] += 10**12
    _, header = _forged_stream(G, real.version_vector, acc)
    liars = [make_checkpoint(s, genesis_id=G.id, version_vector=header.version_vector,
                             state_hash=header.state_hash) for s in OPERATORS[:2]]
    assert check_attestation(header, liars, POLICY)  # a colluding quorum *can* attest
    with pytest.raises(AttestationError, match="contradict"):
        check_attestation(header, [*liars, real.checkpoint(OPERATORS[2])], POLICY)


def test_a_snapshot_whose_body_does_not_match_its_attested_header_is_refused() -> None:
    real = _replay(HIST)
    header = SnapshotHeader(G.id, real.version_vector, real.state_hash, True)
    acc = real.accumulator.copy()
    acc[5] += 1
    with pytest.raises(ValidationError, match="does not match its state hash"):
        read_snapshot(G, b"".join(encode_snapshot(G, header, acc)))


def test_countersigning_a_past_vector() -> None:
    """An operator that is ahead recomputes a fellow's checkpoint at its vector, and signs the same hash;
    one that cannot (it compacted past it, or never verified) is told so."""
    behind = _replay([c for c in HIST if c.seq <= 2])
    ahead = _replay(HIST)
    theirs = behind.checkpoint(OPERATORS[0])
    mine = ahead.checkpoint(OPERATORS[1], at=theirs.version_vector)
    assert mine.state_hash == theirs.state_hash and mine.version_vector == theirs.version_vector
    header = read_snapshot(G, behind.snapshot_parts()).header
    assert len(check_attestation(header, [theirs, mine], POLICY)) == 2


def test_checkpoint_round_trip_and_strict_decoding() -> None:
    cp = _replay(HIST).checkpoint(OPERATORS[0])
    assert Checkpoint.decode(cp.encode()) == cp
    with pytest.raises(SignatureError):
        Checkpoint.decode(dataclasses.replace(cp, state_hash="00" * 32).encode())
    with pytest.raises(ValidationError, match="exceeds the limit"):
        Checkpoint.decode(cp.encode(), max_authors=0)


def test_policy_in_the_genesis_meta() -> None:
    meta = {"task": "t", **POLICY.to_meta()}
    g = Genesis(G.params, G.fragments, meta)
    assert CheckpointPolicy.from_genesis(g) == POLICY
    assert CheckpointPolicy.from_genesis(G) is None
    meta = POLICY.to_meta()
    for bad in ({"checkpoint_quorum": "2"}, {**meta, "checkpoint_quorum": "x"},
                {**meta, "checkpoint_quorum": "4"}, {**meta, "checkpoint_signers": "zz"}):
        with pytest.raises(ValidationError):
            CheckpointPolicy.from_genesis(Genesis(G.params, G.fragments, bad))


def test_only_a_replicas_own_snapshot_loads_without_attestation() -> None:
    """The two constructors: a peer's snapshot needs checkpoints; the own-disk path keeps the writer's
    provenance (a state that adopted a peer's snapshot stays unable to attest after a restart)."""
    adopted = ModelState.from_snapshot(G, read_snapshot(G, _replay(HIST).snapshot_parts()),
                                       checkpoints=[_replay(HIST).checkpoint(s) for s in OPERATORS[:2]],
                                       policy=POLICY)
    restarted = ModelState.from_own_snapshot(G, read_snapshot(G, adopted.snapshot_parts()))
    assert restarted.state_hash == adopted.state_hash and not restarted.self_verified
    with pytest.raises(TypeError):
        ModelState.from_snapshot(G, read_snapshot(G, adopted.snapshot_parts()))  # type: ignore[call-arg]
    assert contribution(G, HONEST, 4).seq == 4
