"""What each member of the run is known to hold: the last version vector heard from it, and when.

Three readers: compaction forgets only what every member it waits for holds (`PeerHoldings.members`),
sync pulls from a peer whose vector shows records we lack (`PeerHoldings.get`), and a round waits until
this node holds what its peers hold together (`PeerHoldings.together`).

A vector only grows: a new one is joined with what the member was known to hold, because a digest may be a
few records old (``Replica.digest`` hashes a frozen state while more arrive). A member not heard from for
``ttl_s`` is forgotten and at most `MAX_MEMBERS` (the most recently heard) are kept: otherwise one digest
with an empty vector, from anyone who knows the genesis id, would pin compaction forever. The replica
persists the table before it compacts by it (``Store.write_peer_vectors``), so that a restart forgets no
member.

Pure bookkeeping: no I/O, and the clock is injected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import crdt

__all__ = ["DEFAULT_MEMBER_TTL_S", "MAX_MEMBERS", "PeerHoldings"]

log = logging.getLogger(__name__)

#: A member not heard from for this long stops holding compaction back (it catches up from a snapshot).
DEFAULT_MEMBER_TTL_S = 3600.0
#: Members whose vectors hold compaction back (the most recently heard); more would be a memory lever.
MAX_MEMBERS = 512


class PeerHoldings:
    """peer id -> (the version vector it is known to hold, when it was last heard: unix time)."""

    def __init__(self, vectors: dict[str, tuple[crdt.VersionVector, float]] | None = None, *,
                 ttl_s: float = DEFAULT_MEMBER_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.vectors: dict[str, tuple[crdt.VersionVector, float]] = dict(vectors or {})
        self.ttl_s = ttl_s
        self._clock = clock

    def get(self, peer: str) -> crdt.VersionVector | None:
        """What ``peer`` was last known to hold (None: never heard from, or forgotten)."""
        known = self.vectors.get(peer)
        return None if known is None else known[0]

    def note_vector(self, peer: str, vector: crdt.VersionVector) -> None:
        """Record what ``peer`` holds (from its digest), joined with what it was known to hold."""
        known = self.get(peer)
        self.vectors[peer] = (vector if known is None else known.merge(vector), self._clock())

    def note_holds(self, peer: str, contribution: crdt.Contribution) -> None:
        """``peer`` took ``contribution`` (a push of ours): what it holds, as last heard, plus that record
        if the author's earlier ones are known to be there (else it may wait in its gap buffer)."""
        known = self.get(peer)
        before = known.get(contribution.author) if known is not None else 0
        if before != contribution.seq - 1:
            return
        held = crdt.VersionVector.from_dict({contribution.author: contribution.seq})
        self.note_vector(peer, known.merge(held) if known is not None else held)

    def together(self) -> crdt.VersionVector | None:
        """What the peers heard from within ``ttl_s`` hold together (per author, the most any of them
        reported), or None before any peer's digest arrived."""
        oldest = self._clock() - self.ttl_s
        held = [vv for vv, heard in self.vectors.values() if heard >= oldest]
        if not held:
            return None
        merged = held[0]
        for vv in held[1:]:
            merged = merged.merge(vv)
        return merged

    def members(self, ours: crdt.VersionVector, *, within: int) -> dict[str, crdt.VersionVector]:
        """The members compaction waits for: heard within ``ttl_s`` and at most ``within`` contributions
        behind ``ours`` (one further behind catches up from a snapshot anyway). Forgets the members not
        heard within ``ttl_s`` and all but the `MAX_MEMBERS` latest."""
        oldest = self._clock() - self.ttl_s
        fresh = sorted(
            ((heard, peer, vv) for peer, (vv, heard) in self.vectors.items() if heard >= oldest),
            reverse=True,
        )[:MAX_MEMBERS]
        forgotten = len(self.vectors) - len(fresh)
        if forgotten:
            log.info("forgetting members not heard from recently count=%d", forgotten)
        self.vectors = {peer: (vv, heard) for heard, peer, vv in fresh}
        return {
            peer: vv
            for peer, (vv, _) in self.vectors.items()
            if sum(max(0, s - vv.get(a)) for a, s in ours.items()) <= within
        }
