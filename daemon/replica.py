"""This node's replica of the model: the CRDT state and its durable form (``daemon/store.py``), in step.

Theory of operation
-------------------
Every contribution, local or remote, enters through :meth:`Replica.accept`: applied to the state, then
appended to the WAL with fsync. A crash in between loses a contribution that anti-entropy fetches again,
never one the node already told anybody about.

Every ``snapshot_every`` new contributions the replica writes a snapshot and forgets the history that
every known member already holds: the meet of its own vector and the last vector heard from each member
(:meth:`note_vector`), persisted before compacting by it so that a restart forgets no member. The WAL keeps
every record above that floor, so a restart compacts nothing. With no member heard from, nothing is
compacted: nobody else holds anything, and members that come back could neither get the history nor
adopt our snapshot.

A replica too far behind a peer (the peer compacted what it lacks) adopts the peer's snapshot with
:meth:`adopt`, only if that loses nothing: every contribution it holds that the snapshot lacks must still
be retained here, to be applied on top. What it retained below the snapshot stays servable history.

No networking and no clock: ``daemon/node.py`` drives it.
"""

from __future__ import annotations

import logging

import crdt
from daemon.store import Store

__all__ = ["Replica"]

log = logging.getLogger(__name__)


class Replica:
    """The model state of one node and its store. Not thread-safe (the node's event loop owns it)."""

    def __init__(self, store: Store, state: crdt.ModelState, *, snapshot_every: int) -> None:
        self.store = store
        self.state = state
        self.snapshot_every = snapshot_every
        self.peer_vectors: dict[str, crdt.VersionVector] = store.load_peer_vectors()
        """The last version vector heard from each run member: what compaction may forget."""
        self.snapshots_written = 0
        self.snapshots_installed = 0
        self._since_snapshot = 0

    def accept(self, contribution: crdt.Contribution) -> crdt.ApplyOutcome:
        """Apply, then log durably; snapshot and compact every ``snapshot_every`` new contributions.

        Raises:
            crdt.CrdtError: the contribution is invalid here (nothing was logged).
        """
        outcome = self.state.apply(contribution)
        if outcome is crdt.ApplyOutcome.DUPLICATE:
            return outcome
        self.store.append(contribution)
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_every:
            self.snapshot_and_compact()
        return outcome

    def note_vector(self, peer: str, vector: crdt.VersionVector) -> None:
        """Record what ``peer`` holds (from its digest); the next compaction keeps what it lacks."""
        self.peer_vectors[peer] = vector

    def snapshot_and_compact(self) -> int:
        """Persist a snapshot and forget the history every known member holds. Returns records dropped."""
        snapshot = self.state.snapshot()
        self.store.write_peer_vectors(self.peer_vectors)  # before compacting by them: see the store
        floor = crdt.retention_floor(snapshot.version_vector, self.peer_vectors.values())
        dropped = self.state.compact(floor) if self.peer_vectors else 0
        self.store.write_snapshot(snapshot, floor=self.state.retention_floor)
        self._since_snapshot = 0
        self.snapshots_written += 1
        log.info(
            "snapshot written contributions=%d compacted=%d retained=%d",
            snapshot.version_vector.total,
            dropped,
            self.state.retained_count,
        )
        return dropped

    def adopt(self, snapshot: crdt.Snapshot) -> bool:
        """Catch up through a peer's snapshot; False (nothing changes) if it would drop held history.

        Raises:
            crdt.CrdtError: the snapshot is not of this genesis or does not match its own hash.
        """
        if not self.state.can_serve(snapshot.version_vector):
            return False
        fresh = crdt.ModelState.from_snapshot(self.state.genesis, snapshot, log=self.state.records())
        self.store.write_snapshot(fresh.snapshot(), floor=fresh.retention_floor)
        self.state = fresh
        self._since_snapshot = 0
        self.snapshots_installed += 1
        return True
