"""daemon.node.attestation: which checkpoints a node keeps, and the newest state a quorum vouches for."""

from __future__ import annotations

import pytest
from node_testlib import HIST, SIGNER, genesis, signer, state_of

import crdt
from daemon.node.attestation import KEPT_PER_SIGNER, Attestations, policy_for_run

OTHER = signer(98)


def test_the_founder_is_always_a_signer_and_the_quorum_fits() -> None:
    policy = policy_for_run(SIGNER.public_key, [OTHER.public_key, SIGNER.public_key], quorum=5)
    assert policy.signers == {SIGNER.public_key, OTHER.public_key} and policy.quorum == 2
    assert policy_for_run(SIGNER.public_key, [], quorum=0).quorum == 1


def test_quorum_attested_vector_and_what_is_refused() -> None:
    g = genesis()
    policy = policy_for_run(SIGNER.public_key, [OTHER.public_key], quorum=2)
    book = Attestations(g, policy, max_authors=16)
    old, new = state_of(HIST[:3]), state_of(HIST[:6])
    assert book.attested_vector() is None
    book.add(new.checkpoint(SIGNER))
    assert book.attested_vector() is None  # one of two
    book.add(old.checkpoint(SIGNER))
    book.add(old.checkpoint(OTHER))
    assert book.attested_vector() == old.version_vector  # only the old state has both signatures
    book.add(new.checkpoint(OTHER))
    assert book.attested_vector() == new.version_vector
    assert book.for_state(new.version_vector, new.state_hash) != []
    stranger = crdt.Signer.from_seed(b"\x05" * 32)
    with pytest.raises(crdt.ValidationError, match="not a checkpoint signer"):
        book.decode(new.checkpoint(stranger).encode())
    assert not book.add(new.checkpoint(SIGNER))  # already held


def test_a_contradiction_is_kept_and_memory_is_bounded_per_signer() -> None:
    g = genesis()
    book = Attestations(g, policy_for_run(SIGNER.public_key, [OTHER.public_key], quorum=1), max_authors=16)
    state = state_of(HIST[:3])
    honest = state.checkpoint(SIGNER)
    lie = crdt.make_checkpoint(OTHER, genesis_id=g.id, version_vector=state.version_vector,
                               state_hash="ab" * 32)
    book.add(honest)
    book.add(lie)
    assert book.contradictions == [(honest, lie)]
    for n in range(1, len(HIST) + 1):
        book.add(state_of(HIST[:n]).checkpoint(SIGNER))
    assert sum(c.signer == SIGNER.public_key for c in book.held()) == KEPT_PER_SIGNER
