"""Checkpoints: signed statements about a state, and the rule for adopting a peer's snapshot.

Theory of operation
-------------------
Records carry their author's signature, so a replica that builds its state from records can check every
byte of it. A snapshot carries none: before checkpoints, a peer answering a pull with "snapshot required"
could serve any accumulator with an inflated version vector and the matching state hash, and the victim
adopted it, refused the honest author's next real contribution as a duplicate, and spread the poison to
whoever pulled from it. The rule now: every byte a replica adopts traces back to signatures it can check
(records) or to signers its run or operator trusts (checkpoints).

A :class:`Checkpoint` says, signed by ``signer``: "in run ``genesis_id``, the state holding exactly each
author's contributions 1..vector[author] has state hash ``state_hash``". The hash binds the genesis, the
vector's digest and the accumulator (crdt.snapshot), so one checkpoint names one exact snapshot content.

Who signs what. The run's signer set and quorum (:class:`CheckpointPolicy`, from the genesis meta or the
operator's configuration) are fixed per run. A signer signs only states it computed itself from records
whose signatures it verified (``ModelState.self_verified``; ``ModelState.checkpoint`` refuses others):
never one it adopted from a peer, even a quorum-attested one. So a signature never launders another
signer's claim, and replicas with stricter policies than their signers' are not weakened by them. It
signs its own snapshots, and countersigns a fellow signer's checkpoint after recomputing that vector's
hash itself (``ModelState.checkpoint(signer, at=vector)`` rewinds exactly, records above the vector
subtracted in place and added back, as long as it still retains them).

The decision (:func:`check_attestation`, pure): adopt a snapshot only if at least ``quorum`` distinct
signers of the policy signed checkpoints for exactly its genesis, vector and state hash, and no signer of
the policy signed another hash for that vector; the body must then hash to the header's state hash
(:class:`crdt.SnapshotReader`). ``ModelState.from_snapshot`` runs the decision itself; the only other
way to build a state from a snapshot is ``from_own_snapshot``, for the replica's own disk.

What attackers can do. Anyone short of a quorum of signer keys: nothing beyond refusing to serve. A forged
snapshot is refused whatever its hash, the model stays as it was, and vectors are never inflated: a
vector credits an author only with seqs that signed records or an attested checkpoint show. A colluding
quorum can attest any state: arbitrary parameters, and a vector crediting honest authors with seqs they
never signed (their real contributions then look like duplicates to the replicas that adopted it). It
cannot rewrite replicas that compute from records, and honest signers who recompute that vector get a
different hash: two checkpoints of one vector with different hashes are transferable proof that signers
lied, and ``check_attestation`` refuses the snapshot as soon as one honest signer's contradiction is
among the checkpoints it is given. Choose ``quorum > len(signers) / 2`` so that two different states can
only both be attested if some signer signed both (itself provable); liveness needs ``quorum`` honest
signers that keep the history down to the vectors joiners fetch.

Wire layout (canonical msgpack, as crdt.records)::

    Checkpoint  = [FORMAT_VERSION, "checkpoint", genesis_id(bin32), vv(bin), state_hash(bin32),
                   signer(bin32), signature(bin64)]
    signed body = [FORMAT_VERSION, "checkpoint-body", genesis_id, vv digest(bin32), state_hash, signer]

Rejected alternatives: trusting the serving peer's own signature (one throwaway key forges);
signatures over the encoded snapshot bytes (compressor output is not canonical across versions, and a
checkpoint would then name one file instead of one state); threshold signatures (one aggregate instead
of q signatures of 64 bytes, for a dependency and a key ceremony).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from crdt import _wire
from crdt.errors import AttestationError, SignatureError, ValidationError
from crdt.records import DEFAULT_LIMITS, FORMAT_VERSION, HASH_BYTES, Genesis
from crdt.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Signer, verify_signature
from crdt.snapshot import SnapshotHeader
from crdt.vv import VersionVector, vv_max_bytes

__all__ = ["Checkpoint", "CheckpointPolicy", "check_attestation", "make_checkpoint", "require_self_verified"]

#: Genesis meta keys of a run's policy: comma-separated hex public keys, and a decimal quorum.
META_SIGNERS = "checkpoint_signers"
META_QUORUM = "checkpoint_quorum"
#: Largest signer set: a policy is a short list of operators, not a membership list.
MAX_SIGNERS = 256
#: Checkpoint framing besides the vector: headers, genesis id, hash, key and signature (~170 bytes).
_CHECKPOINT_FRAMING_BYTES = 256


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """Who may attest a snapshot of a run: ``quorum`` distinct keys out of ``signers``."""

    signers: frozenset[bytes]
    quorum: int

    def __post_init__(self) -> None:
        tag = "checkpoint policy"
        _wire.expect(isinstance(self.signers, frozenset) and 0 < len(self.signers) <= MAX_SIGNERS, tag,
                     f"signers must be a frozenset of 1 to {MAX_SIGNERS} keys")
        _wire.expect(all(_wire.is_bytes(k, PUBLIC_KEY_BYTES) for k in self.signers), tag,
                     "signers must be 32-byte Ed25519 public keys")
        _wire.expect(_wire.is_int(self.quorum) and 1 <= self.quorum <= len(self.signers), tag,
                     "quorum must be between 1 and the number of signers")

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> CheckpointPolicy | None:
        """The policy the run's genesis fixes (meta ``checkpoint_signers``, ``checkpoint_quorum``), or None
        if it fixes none (then no peer snapshot can be adopted; joiners need the full history).

        Raises:
            ValidationError: the meta entries are malformed.
        """
        keys, quorum = genesis.meta.get(META_SIGNERS), genesis.meta.get(META_QUORUM)
        if keys is None and quorum is None:
            return None
        tag = "genesis"
        _wire.expect(keys is not None and quorum is not None, tag,
                     f"meta needs both {META_SIGNERS} and {META_QUORUM}")
        assert keys is not None and quorum is not None
        try:
            signers = frozenset(bytes.fromhex(k) for k in keys.split(","))
        except ValueError:
            raise ValidationError(f"{tag}: {META_SIGNERS} must be comma-separated hex keys") from None
        _wire.expect(quorum.isdigit() and len(quorum) <= 4, tag, f"{META_QUORUM} must be a small integer")
        return cls(signers, int(quorum))

    def to_meta(self) -> dict[str, str]:
        """The genesis meta entries that fix this policy for a run."""
        return {META_SIGNERS: ",".join(sorted(k.hex() for k in self.signers)), META_QUORUM: str(self.quorum)}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signer's statement that the state of ``genesis_id`` at ``version_vector`` hashes to
    ``state_hash``. Build with ``ModelState.checkpoint`` or :meth:`decode`."""

    genesis_id: str
    version_vector: VersionVector
    state_hash: str
    signer: bytes
    signature: bytes

    def _body(self) -> bytes:
        return _wire.pack([FORMAT_VERSION, "checkpoint-body", bytes.fromhex(self.genesis_id),
                           self.version_vector.digest(), bytes.fromhex(self.state_hash), self.signer])

    def encode(self) -> bytes:
        return _wire.pack([FORMAT_VERSION, "checkpoint", bytes.fromhex(self.genesis_id),
                           self.version_vector.encode(), bytes.fromhex(self.state_hash), self.signer,
                           self.signature])

    def verify(self) -> None:
        """Raises SignatureError unless ``signer`` signed this checkpoint."""
        if not verify_signature(self.signer, self._body(), self.signature):
            raise SignatureError("checkpoint: signature does not verify for its signer")

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_authors: int = DEFAULT_LIMITS.max_authors
               ) -> Checkpoint:
        """Parse, check the canonical form and verify the signature. Raises ValidationError."""
        tag = "checkpoint"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=7,
                                 max_bytes=vv_max_bytes(max_authors) + _CHECKPOINT_FRAMING_BYTES)
        _, _, gid, vv_raw, sh, signer, sig = obj
        _wire.expect(_wire.is_bytes(gid, HASH_BYTES), tag, "genesis id must be 32 bytes")
        _wire.expect(_wire.is_bytes(vv_raw), tag, "version vector must be bin")
        _wire.expect(_wire.is_bytes(sh, HASH_BYTES), tag, "state hash must be 32 bytes")
        _wire.expect(_wire.is_bytes(signer, PUBLIC_KEY_BYTES), tag, "signer must be 32 bytes")
        _wire.expect(_wire.is_bytes(sig, SIGNATURE_BYTES), tag, "signature must be 64 bytes")
        cp = cls(gid.hex(), VersionVector.decode(vv_raw, max_authors=max_authors), sh.hex(), signer, sig)
        _wire.expect(cp.encode() == bytes(data), tag, "non-canonical encoding")
        cp.verify()
        return cp


def make_checkpoint(signer: Signer, *, genesis_id: str, version_vector: VersionVector,
                    state_hash: str) -> Checkpoint:
    """Sign a checkpoint as given. Low level: a node signs only states it computed, through
    ``ModelState.checkpoint``, which checks that; this is for it and for tests."""
    unsigned = Checkpoint(genesis_id, version_vector, state_hash, signer.public_key, b"")
    return Checkpoint(genesis_id, version_vector, state_hash, signer.public_key,
                      signer.sign(unsigned._body()))


def require_self_verified(self_verified: bool) -> None:
    """A signer attests only states it computed from records it verified (ModelState.checkpoint,
    FrozenState.checkpoint).

    Raises:
        AttestationError: the state includes a peer's snapshot.
    """
    if not self_verified:
        raise AttestationError("checkpoint: this state includes a peer's snapshot; a signer attests only "
                               "states it computed from records it verified")


def check_attestation(header: SnapshotHeader, checkpoints: Iterable[Checkpoint],
                      policy: CheckpointPolicy) -> tuple[Checkpoint, ...]:
    """May a peer's snapshot with this header be adopted? Returns the quorum of checkpoints that says so.

    Checkpoints by keys outside the policy, for another genesis or another vector, or whose signature does
    not verify, are ignored (a peer may pass anything along). Pure: no I/O, no clock.

    Raises:
        AttestationError: fewer than ``policy.quorum`` distinct signers attest exactly this genesis,
            vector and state hash, or a signer of the policy signed a different hash for this vector
            (signers contradict each other: adopt neither, and keep both checkpoints as evidence).
    """
    attesting: dict[bytes, Checkpoint] = {}
    for cp in checkpoints:
        if (cp.signer not in policy.signers or cp.genesis_id != header.genesis_id
                or cp.version_vector != header.version_vector):
            continue
        try:
            cp.verify()
        except SignatureError:
            continue
        if cp.state_hash != header.state_hash:
            raise AttestationError(
                f"snapshot: signer {cp.signer.hex()[:16]} attests another state hash for this vector "
                f"({cp.state_hash[:16]}, snapshot says {header.state_hash[:16]}): signers contradict "
                "each other")
        attesting[cp.signer] = cp
    if len(attesting) < policy.quorum:
        raise AttestationError(
            f"snapshot: {len(attesting)} of the {policy.quorum} required signers attest its state "
            f"{header.state_hash[:16]}")
    return tuple(attesting[k] for k in sorted(attesting))
