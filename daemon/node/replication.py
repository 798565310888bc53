"""Replication decisions, sans-IO: whom to pull from, when, how far, and what a peer's answer means.

Theory of operation
-------------------
A node catches up by *pulling*: it sends a peer its digest and gets back what it lacks, a batch at a time
(``daemon/node/sync.py`` moves the bytes). This module decides everything around that, as a pure state
machine in the manner of h11: the driver feeds it events (methods named for what happened) and asks it
for actions (:meth:`Replication.next_actions`); it never touches a socket, a clock or a random source of
its own (``now`` and ``rng`` are passed in), so tests drive it through any schedule.

Why a node wants to pull from a peer:

* an **announcement** of a contribution it lacks (gossip): pull from its author when connected, else from
  the peer that forwarded it;
* **anti-entropy**: every period, ``fanout`` random usable peers (epidemic: each node's control traffic
  stays flat as the mesh grows, and every pair meets within a few periods);
* a **pull-back**: a peer that pulled from us showed it holds something we lack; at most once per period
  per peer, so two nodes that cannot serve each other do not ping-pong.

Per peer::

    IDLE --(wanted)--> WANTED --(slot free)--> PULLING --(answer: more, still behind)--> PULLING
                                                  |  \\--(answer: snapshot required)--> SNAPSHOT
                                                  |                                        |
                                                  +--(caught up / failed / budget spent)---+--> IDLE

Fairness and bounds: at most ``parallel`` peers are pulled at once, one request in flight per peer, and a
pull ends after ``max_round_trips`` answers even if the peer claims more; the peer then goes to the back
of the queue. One slow or hostile peer therefore holds one slot for a bounded time, and the others are
served meanwhile. Rejected: one pull at a time (a peer that answers slowly, or claims more forever while
sending one record per answer, held every other peer's data back: 2,000 round trips in a test). But a
peer whose known surplus a pull in progress already covers waits for that pull (the driver says which,
from the peers' last digests): pulled at once, peers that hold the same records each send all of them.

A peer answering ``ForeignRun`` trains another model: it is not asked again while connected. Blocked peers
(partition drills) are never pulled from. Divergence: a peer showing our exact version vector with
another state hash holds a different record for some slot (an equivocating author, or corruption);
anti-entropy cannot repair that, so it is reported (:attr:`diverged`) and cleared when the hashes agree
again.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Action", "ActionKind", "Replication", "ReplicationPolicy"]

#: Answers one pull may take from a peer before the peer yields its slot (x max_batch records each).
DEFAULT_MAX_ROUND_TRIPS = 16
#: Peers pulled from at once: enough to overlap round trips on high-latency links, few enough that a
#: 2-core node is not flooded with answers to verify at the same time.
DEFAULT_PARALLEL = 4


class ActionKind(enum.Enum):
    PULL = "pull"
    """Send the peer our digest; it answers with what we lack."""
    SNAPSHOT = "snapshot"
    """Fetch the peer's snapshot: it compacted what we lack."""


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    peer: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicationPolicy:
    fanout: int
    """Peers chosen per anti-entropy period."""
    pullback_interval_s: float
    """Least time between two pull-backs of one peer (the anti-entropy period)."""
    parallel: int = DEFAULT_PARALLEL
    max_round_trips: int = DEFAULT_MAX_ROUND_TRIPS


class _Phase(enum.Enum):
    WANTED = "wanted"
    PULLING = "pulling"
    SNAPSHOT = "snapshot"


@dataclass(slots=True)
class _Pull:
    phase: _Phase
    round_trips: int = 0


@dataclass
class Replication:
    """The pull scheduler of one node (see the module docstring). Not thread-safe."""

    policy: ReplicationPolicy
    connected: frozenset[str] = frozenset()
    blocked: frozenset[str] = frozenset()
    foreign: set[str] = field(default_factory=set)
    """Connected peers that train another model (they answered ForeignRun)."""
    diverged: set[str] = field(default_factory=set)
    """Peers last seen holding our version vector with another state hash."""
    _pulls: dict[str, _Pull] = field(default_factory=dict)  # insertion order = queue order
    _pulled_back_at: dict[str, float] = field(default_factory=dict)

    # -- who can be pulled from ------------------------------------------------------------------------

    def set_connected(self, peers: Iterable[str]) -> None:
        """The host's current connections. Peers that left are forgotten (a foreign peer that reconnects
        is asked again: it may have restarted on our run)."""
        self.connected = frozenset(peers)
        self._drop_wanted(lambda peer: peer not in self.connected)
        self.foreign &= self.connected
        for gone in [p for p in self._pulled_back_at if p not in self.connected]:
            del self._pulled_back_at[gone]

    def set_blocked(self, peers: Iterable[str]) -> None:
        """Fault injection: exchange no model data with ``peers`` (empty: heal)."""
        self.blocked = frozenset(peers)
        self._drop_wanted(lambda peer: peer in self.blocked)

    def _drop_wanted(self, unusable: Callable[[str], bool]) -> None:
        """Forget queued (not started) pulls of peers that can no longer be pulled from."""
        for peer in [p for p, pull in self._pulls.items() if pull.phase is _Phase.WANTED and unusable(p)]:
            del self._pulls[peer]

    def usable(self, peer: str) -> bool:
        return peer in self.connected and peer not in self.blocked and peer not in self.foreign

    # -- reasons to pull -------------------------------------------------------------------------------

    def announced(self, *, author: str, via: str) -> None:
        """Gossip said ``author`` made a contribution we lack; ``via`` delivered the announcement."""
        for source in (author, via):
            if self.usable(source):
                self._want(source)
                return

    def behind(self, peer: str) -> None:
        """``peer``'s digest showed records we lack, and a round is waiting for them: want it now."""
        if self.usable(peer):
            self._want(peer)

    def tick(self, rng: random.Random) -> None:
        """An anti-entropy period passed: want ``fanout`` random usable peers."""
        candidates = sorted(p for p in self.connected if self.usable(p))
        for peer in rng.sample(candidates, min(self.policy.fanout, len(candidates))):
            self._want(peer)

    def served(self, peer: str, *, peer_has_more: bool, now: float) -> None:
        """We answered ``peer``'s pull; ``peer_has_more``: its digest shows what we lack."""
        if not peer_has_more or not self.usable(peer):
            return
        if now - self._pulled_back_at.get(peer, -float("inf")) > self.policy.pullback_interval_s:
            self._pulled_back_at[peer] = now
            self._want(peer)

    def _want(self, peer: str) -> None:
        if peer not in self._pulls:
            self._pulls[peer] = _Pull(_Phase.WANTED)

    # -- what to do now --------------------------------------------------------------------------------

    def next_actions(self, covered: Callable[[str, frozenset[str]], bool] | None = None) -> list[Action]:
        """Pulls to start now: wanted peers, oldest first, into the free slots.

        ``covered(peer, pulling)``: everything ``peer`` is known to hold beyond us would come from the
        peers being pulled now. Such a peer keeps its place until they are done: peers that hold the same
        records, pulled at once, each send all of them (a node catching up from three peers took every
        record three times). A peer that claims much and sends little holds the others back for one
        pull at most: no progress ends its pull, and ``max_round_trips`` its turn."""
        busy = sum(p.phase is not _Phase.WANTED for p in self._pulls.values())
        pulling = frozenset(p for p, pull in self._pulls.items() if pull.phase is _Phase.PULLING)
        actions = []
        for peer, pull in self._pulls.items():
            if busy >= self.policy.parallel:
                break
            if pull.phase is not _Phase.WANTED or not self.usable(peer):
                continue
            if pulling and covered is not None and covered(peer, pulling):
                continue
            pull.phase = _Phase.PULLING
            busy += 1
            pulling |= {peer}
            actions.append(Action(ActionKind.PULL, peer))
        return actions

    @property
    def in_flight(self) -> int:
        return sum(p.phase is not _Phase.WANTED for p in self._pulls.values())

    @property
    def wanted(self) -> list[str]:
        return [peer for peer, pull in self._pulls.items() if pull.phase is _Phase.WANTED]

    # -- answers ---------------------------------------------------------------------------------------

    def answered(
        self, peer: str, *, progressed: bool, behind: bool, snapshot_required: bool, records: int
    ) -> Action | None:
        """``peer`` answered a pull (its records were applied). Returns the next action for this peer, if
        its pull goes on, or None when it ended.

        Args:
            progressed: at least one of its records was new to us.
            behind: its version vector still has something ours lacks.
            snapshot_required: part of what we lack was compacted there.
            records: how many records the answer carried.
        """
        pull = self._active(peer, _Phase.PULLING)
        pull.round_trips += 1
        if snapshot_required and not records:
            pull.phase = _Phase.SNAPSHOT
            return Action(ActionKind.SNAPSHOT, peer)
        if not (progressed and behind and self.usable(peer)):
            del self._pulls[peer]
            return None
        if pull.round_trips >= self.policy.max_round_trips:
            # Budget spent: to the back of the queue, so the other peers get their turn first.
            del self._pulls[peer]
            self._pulls[peer] = _Pull(_Phase.WANTED)
            return None
        return Action(ActionKind.PULL, peer)

    def failed(self, peer: str, *, foreign: bool = False) -> None:
        """A pull or snapshot fetch failed (unreachable, timed out, refused, or the peer sent junk);
        ``foreign``: the peer answered that it trains another model."""
        self._active(peer, _Phase.PULLING, _Phase.SNAPSHOT)
        del self._pulls[peer]
        if foreign:
            self.foreign.add(peer)

    def snapshot_done(self, peer: str) -> None:
        """The snapshot fetch from ``peer`` ended (adopted or not)."""
        self._active(peer, _Phase.SNAPSHOT)
        del self._pulls[peer]

    def _active(self, peer: str, *phases: _Phase) -> _Pull:
        pull = self._pulls.get(peer)
        if pull is None or pull.phase not in phases:
            raise RuntimeError(f"no {'/'.join(p.value for p in phases)} of peer {peer} in progress")
        return pull

    # -- divergence ------------------------------------------------------------------------------------

    def compared(self, peer: str, *, same_vector: bool, same_hash: bool) -> bool:
        """A digest of ``peer`` was compared with ours; True when this newly shows divergence."""
        if not same_vector:
            return False
        if same_hash:
            self.diverged.discard(peer)
            return False
        if peer in self.diverged:
            return False
        self.diverged.add(peer)
        return True
