"""The crdt exception tree (the only exceptions crdt raises on purpose).

::

    CrdtError                     base of everything below; never raised directly
    ├── ValidationError           bytes or a record from outside (or a caller's argument) is malformed,
    │   │                         unsigned, out of range or inconsistent; ``.reason`` says which rule broke
    │   ├── SignatureError        the Ed25519 signature does not verify
    │   ├── GenesisMismatchError  the record belongs to another genesis / model layout
    │   ├── GapTooLargeError      a contribution is too far ahead of its author's contiguous prefix, or
    │   │                         the buffer (count or payload bytes) is full (not malicious by itself:
    │   │                         fetch the missing seqs, then retry)
    │   ├── CapacityError         accepting it would exceed ``Limits.max_authors`` (a new author)
    │   ├── AttestationError      a peer's snapshot lacks a quorum of matching checkpoints from the run's
    │   │                         signers, or a checkpoint cannot be signed for this state
    │   └── ConflictError         two *different* validly signed contributions claim the same
    │                             (author, seq) slot: the author equivocated; the second one is refused
    │                             (first one wins locally). ``.evidence`` holds both, a proof to ban on.
    └── HistoryPrunedError        a merge or anti-entropy answer needs contributions this replica has
                                  already compacted away; transfer a snapshot instead

Why one tree: the daemon's handlers catch ``ValidationError`` at the boundary and turn it into "drop the
message and maybe penalise the peer"; anything that is not a ``CrdtError`` is a bug in meshtrain and must
propagate. Decoders convert every lower-level failure (msgpack, numpy, cryptography) into
``ValidationError`` chained with ``from``, so no foreign exception type ever leaks out of a decoder.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "CapacityError",
    "ConflictError",
    "CrdtError",
    "GapTooLargeError",
    "GenesisMismatchError",
    "HistoryPrunedError",
    "SignatureError",
    "ValidationError",
]


class CrdtError(Exception):
    """Base class of every error crdt raises deliberately."""


class ValidationError(CrdtError):
    """Input failed validation. ``str(err)`` is a human-readable reason naming the broken rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SignatureError(ValidationError):
    """The signature does not verify against the author's public key."""


class GenesisMismatchError(ValidationError):
    """The record refers to a different genesis (other model, other fragment layout)."""


class GapTooLargeError(ValidationError):
    """Seq is beyond the per-author buffering window; the sender should be asked for the gap first."""


class CapacityError(ValidationError):
    """A new author would exceed ``Limits.max_authors``; the author's records are refused, not buffered."""


class AttestationError(ValidationError):
    """A snapshot is not attested by a quorum of the run's checkpoint signers (see crdt.checkpoint)."""


class ConflictError(ValidationError):
    """Equivocation: a different contribution already occupies this (author, seq) slot."""

    def __init__(self, reason: str, evidence: tuple[object, object] = (None, None)) -> None:
        super().__init__(reason)
        self.evidence = evidence


class HistoryPrunedError(CrdtError):
    """The needed contributions were compacted away (below the retention floor)."""
