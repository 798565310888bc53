"""Anti-entropy helpers (sans-IO): what to send a peer, what to ask for, what may be forgotten.

Protocol sketch (the daemon moves the bytes; this module only decides):

1. Periodically each node sends its :class:`Digest` to a peer (gossip or request/response).
2. On a remote digest, :func:`plan_sync` compares vectors. It returns the exact contributions the remote
   lacks (lowest seqs first, so the remote can apply without buffering), whether the remote has
   contributions we lack (then send our digest back so the remote answers with them), whether the remote
   is behind our retention floor (then offer a snapshot), and whether both are in sync.
3. Equal vectors with different state hashes mean equivocation or a bug: ``diverged`` is set.

Message loss, duplication and reordering are harmless: contributions are idempotent (DUPLICATE), early
ones are buffered (BUFFERED) and every exchange recomputes from the current vectors, so repeated rounds
converge (tests/crdt/test_antientropy.py simulates lossy, shuffling, duplicating networks).

Rejected alternative: Merkle trees over slots. Version vectors are exact and O(authors); a mesh of a few
hundred authors makes a digest a few kB, cheaper than a tree walk's round trips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from crdt.records import Contribution
from crdt.state import ModelState
from crdt.vv import Digest, VersionVector

__all__ = ["SyncPlan", "plan_sync", "retention_floor"]

#: Default cap on contributions per answer: bounds one message to ~max_count x payload size.
DEFAULT_MAX_SEND = 64


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """Decision for one remote digest."""

    send: tuple[Contribution, ...]
    """Contributions the remote lacks (at most max_count; more may remain: plan again next round)."""
    remote_has_more: bool
    """The remote applied contributions we lack: send it our digest so it pushes them."""
    remote_needs_snapshot: bool
    """Some of what the remote lacks was compacted here: only a snapshot can bring it up to date."""
    in_sync: bool
    """Same vector and same state hash."""
    diverged: bool
    """Same vector, different state hash (equivocation or corruption): escalate, do not loop."""


def plan_sync(state: ModelState, remote: Digest, *, max_count: int = DEFAULT_MAX_SEND) -> SyncPlan:
    """Compute the answer to ``remote``'s digest. Pure: does not modify ``state``."""
    ours = state.version_vector
    theirs = remote.version_vector
    same_vv = ours == theirs
    send = tuple(state.contributions_missing_for(theirs, max_count=max_count)) if not same_vv else ()
    return SyncPlan(
        send=send,
        remote_has_more=not ours.dominates(theirs),
        remote_needs_snapshot=not state.can_serve(theirs),
        in_sync=same_vv and remote.state_hash == state.state_hash,
        diverged=same_vv and remote.state_hash != state.state_hash,
    )


def retention_floor(own: VersionVector, peers: Iterable[VersionVector]) -> VersionVector:
    """Pointwise minimum (the meet) of our vector and every known peer's: what everybody already has.

    Contributions at or below it can be compacted after a snapshot without ever being needed by a known
    peer. A peer that is not in ``peers`` (new or long gone) will need a snapshot instead.
    """
    floor = dict(own.items())
    for vv in peers:
        floor = {a: min(s, vv.get(a)) for a, s in floor.items()}
    return VersionVector.from_dict({a: s for a, s in floor.items() if s > 0})
