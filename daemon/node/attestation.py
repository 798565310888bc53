"""Attested snapshots, the daemon's side: who signs checkpoints, which ones a node keeps, and the newest
state a quorum vouches for (crdt/checkpoint.py has the record and the trust model).

Theory of operation
-------------------
A run's checkpoint policy (signer keys and quorum) is fixed in its genesis: the founder writes it from
``[node] checkpoint_signers`` (default: the founder itself, plus ``allow_peers`` on a private run) and
``checkpoint_quorum``. A signer signs a checkpoint of each snapshot it writes of a state it computed from
records it verified, and publishes it on the run's checkpoint topic. Every node keeps the few newest
checkpoints of each signer (verified, of this genesis, from a signer of the policy: anything else is
junk and counted); a signer that receives a fellow signer's checkpoint recomputes that vector's state
hash and countersigns it when it matches (a mismatch is kept as evidence and reported: two signed hashes
for one vector prove that a signer lied).

What this gives the node (:class:`Attestations`):

* the checkpoints to serve with a snapshot file (``for_state``), and to check a peer's (``crdt``'s
  ``check_attestation`` decides);
* the newest vector a quorum attests (``attested_vector``): compaction never goes above it, so a joiner
  that adopts the attested snapshot can get everything after it as records.

No I/O and no clock: ``daemon/node/sync.py`` moves the checkpoints, ``daemon/node/replica.py`` signs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import crdt

__all__ = ["Attestations", "policy_for_run"]

log = logging.getLogger(__name__)

#: Checkpoints kept per signer (the newest): enough to overlap snapshots in flight, bounded per key.
KEPT_PER_SIGNER = 4


def policy_for_run(founder: bytes, signers: Iterable[bytes], quorum: int) -> crdt.CheckpointPolicy:
    """The policy a founder writes into its genesis: the founder and ``signers``, ``quorum`` of them."""
    keys = frozenset({founder, *signers})
    return crdt.CheckpointPolicy(keys, min(max(quorum, 1), len(keys)))


class Attestations:
    """The checkpoints a node holds for its run, and what they attest. Not thread-safe."""

    def __init__(
        self, genesis: crdt.Genesis, policy: crdt.CheckpointPolicy | None, *, max_authors: int
    ) -> None:
        self.genesis = genesis
        self.policy = policy
        self.max_authors = max_authors
        self._held: dict[bytes, list[crdt.Checkpoint]] = {}  # signer -> its newest checkpoints
        self.contradictions: list[tuple[crdt.Checkpoint, crdt.Checkpoint]] = []
        """Pairs of checkpoints for one vector with different hashes: proof that a signer lied."""

    def is_signer(self, key: bytes) -> bool:
        return self.policy is not None and key in self.policy.signers

    def decode(self, data: bytes) -> crdt.Checkpoint:
        """A checkpoint from a peer, checked: verified, of this genesis, by a signer of the policy.

        Raises:
            crdt.ValidationError: anything else (the caller counts it against the sender).
        """
        checkpoint = crdt.Checkpoint.decode(data, max_authors=self.max_authors)
        if checkpoint.genesis_id != self.genesis.id:
            raise crdt.GenesisMismatchError("checkpoint: of another genesis")
        if not self.is_signer(checkpoint.signer):
            raise crdt.ValidationError("checkpoint: its signer is not a checkpoint signer of this run")
        return checkpoint

    def add(self, checkpoint: crdt.Checkpoint) -> bool:
        """Keep a checked checkpoint; False if it was already held. A second hash for a vector some
        other signer attested is kept as a contradiction and logged."""
        mine = self._held.setdefault(checkpoint.signer, [])
        if checkpoint in mine:
            return False
        for other in self.held():
            same_vector = other.version_vector == checkpoint.version_vector
            if same_vector and other.state_hash != checkpoint.state_hash:
                self.contradictions.append((other, checkpoint))
                log.error("checkpoint signers contradict each other signer=%s other=%s",
                          checkpoint.signer.hex()[:16], other.signer.hex()[:16])
        mine.append(checkpoint)
        del mine[:-KEPT_PER_SIGNER]
        return True

    def held(self) -> list[crdt.Checkpoint]:
        return [c for kept in self._held.values() for c in kept]

    def for_state(self, vector: crdt.VersionVector, state_hash: str) -> list[crdt.Checkpoint]:
        """The held checkpoints of exactly this state (to serve, or store, with its snapshot)."""
        return [c for c in self.held() if c.version_vector == vector and c.state_hash == state_hash]

    def newest_quorum(self) -> list[crdt.Checkpoint]:
        """The checkpoints of the newest state (largest vector total) a quorum of signers attests, one per
        signer; empty if none. Served with sync answers, so attestations reach peers gossip missed."""
        if self.policy is None:
            return []
        by_state: dict[tuple[bytes, str], dict[bytes, crdt.Checkpoint]] = {}
        for c in self.held():
            by_state.setdefault((c.version_vector.digest(), c.state_hash), {})[c.signer] = c
        attested = [list(kept.values()) for kept in by_state.values() if len(kept) >= self.policy.quorum]
        return max(attested, key=lambda kept: kept[0].version_vector.total, default=[])

    def attested_vector(self) -> crdt.VersionVector | None:
        """The newest vector a quorum of signers attests (the largest total), or None."""
        quorum = self.newest_quorum()
        return quorum[0].version_vector if quorum else None
