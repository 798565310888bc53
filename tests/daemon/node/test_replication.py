"""daemon.node.replication: the pull scheduler as a pure state machine, driven event by event."""

from __future__ import annotations

import random

import pytest

from daemon.node.replication import Action, ActionKind, Replication, ReplicationPolicy


def machine(*peers: str, parallel: int = 2, round_trips: int = 3, fanout: int = 2) -> Replication:
    policy = ReplicationPolicy(
        fanout=fanout, pullback_interval_s=2.0, parallel=parallel, max_round_trips=round_trips
    )
    m = Replication(policy)
    m.set_connected(peers)
    return m


def pull(peer: str) -> Action:
    return Action(ActionKind.PULL, peer)


def test_announcement_pulls_from_the_author_when_connected_else_from_the_forwarder() -> None:
    m = machine("author", "relay")
    m.announced(author="author", via="relay")
    assert m.next_actions() == [pull("author")]
    m = machine("relay")
    m.announced(author="stranger", via="relay")
    assert m.next_actions() == [pull("relay")]
    m = machine()
    m.announced(author="a", via="b")  # nobody connected: nothing to do
    assert m.next_actions() == []


def test_one_request_per_peer_and_at_most_parallel_peers() -> None:
    m = machine("a", "b", "c", parallel=2)
    for peer in ("a", "b", "c", "a"):
        m.announced(author=peer, via=peer)
    assert m.next_actions() == [pull("a"), pull("b")]
    assert m.next_actions() == []  # both slots busy, and a is already in flight
    assert m.answered("a", progressed=False, behind=False, snapshot_required=False, records=0) is None
    assert m.next_actions() == [pull("c")]


def test_a_peer_that_claims_more_forever_yields_its_slot_after_the_budget() -> None:
    m = machine("liar", "honest", parallel=1, round_trips=3)
    m.announced(author="liar", via="liar")
    m.announced(author="honest", via="honest")
    assert m.next_actions() == [pull("liar")]
    more = {"progressed": True, "behind": True, "snapshot_required": False, "records": 1}
    for _ in range(2):  # each answer brings one new record and claims more
        assert m.answered("liar", **more) == pull("liar")
    assert m.answered("liar", **more) is None
    assert m.next_actions() == [pull("honest")]  # the honest peer got the slot ...
    assert m.wanted == ["liar"]  # ... and the liar waits at the back of the queue


def test_snapshot_required_with_nothing_servable_fetches_a_snapshot() -> None:
    m = machine("a")
    m.tick(random.Random(0))
    assert m.next_actions() == [pull("a")]
    assert m.answered("a", progressed=False, behind=True, snapshot_required=True, records=0) == Action(
        ActionKind.SNAPSHOT, "a"
    )
    assert m.in_flight == 1
    m.snapshot_done("a")
    assert m.in_flight == 0


def test_foreign_peers_are_not_asked_again_until_they_reconnect() -> None:
    m = machine("other-run")
    m.tick(random.Random(0))
    m.next_actions()
    m.failed("other-run", foreign=True)
    m.tick(random.Random(0))
    m.announced(author="other-run", via="other-run")
    assert m.next_actions() == []
    m.set_connected([])
    m.set_connected(["other-run"])  # it may have restarted on our run
    m.tick(random.Random(0))
    assert m.next_actions() == [pull("other-run")]


def test_blocked_peers_are_dropped_from_the_queue_and_a_pull_ends_when_blocked() -> None:
    m = machine("a", "b", parallel=1)
    m.announced(author="a", via="a")
    m.announced(author="b", via="b")
    assert m.next_actions() == [pull("a")]
    m.set_blocked({"a", "b"})
    assert m.wanted == []
    assert m.answered("a", progressed=True, behind=True, snapshot_required=False, records=1) is None
    m.tick(random.Random(0))
    assert m.next_actions() == []


def test_pull_backs_are_rate_limited_per_peer() -> None:
    m = machine("a")
    m.served("a", peer_has_more=True, now=10.0)
    assert m.next_actions() == [pull("a")]
    m.answered("a", progressed=True, behind=False, snapshot_required=False, records=1)
    m.served("a", peer_has_more=True, now=11.0)  # within the interval: no second pull-back
    assert m.next_actions() == []
    m.served("a", peer_has_more=True, now=12.5)
    assert m.next_actions() == [pull("a")]
    m.served("b", peer_has_more=True, now=20.0)  # not connected: nothing
    assert m.wanted == []


def test_anti_entropy_picks_fanout_usable_peers() -> None:
    m = machine("a", "b", "c", "d", fanout=2, parallel=4)
    m.set_blocked({"a"})
    m.tick(random.Random(1))
    picked = {a.peer for a in m.next_actions()}
    assert len(picked) == 2 and "a" not in picked


def test_answers_for_pulls_not_in_progress_are_bugs() -> None:
    m = machine("a")
    with pytest.raises(RuntimeError, match="no pulling"):
        m.answered("a", progressed=True, behind=True, snapshot_required=False, records=1)
    with pytest.raises(RuntimeError):
        m.snapshot_done("a")


def test_divergence_is_reported_once_and_cleared_when_hashes_agree() -> None:
    m = machine("a")
    assert not m.compared("a", same_vector=False, same_hash=False)
    assert m.compared("a", same_vector=True, same_hash=False)
    assert not m.compared("a", same_vector=True, same_hash=False)  # already reported
    assert m.diverged == {"a"}
    assert not m.compared("a", same_vector=True, same_hash=True)
    assert m.diverged == set()


def test_a_waiting_round_pulls_at_once_from_peers_ahead_but_never_from_blocked_or_gone_ones() -> None:
    m = machine("ahead", "blocked")
    m.set_blocked(["blocked"])
    for peer in ("ahead", "blocked", "gone"):
        m.behind(peer)
    assert m.next_actions() == [pull("ahead")]
    m.behind("ahead")  # already pulling: one pull per peer
    assert m.next_actions() == []


def test_peers_whose_surplus_a_pull_in_progress_covers_wait_for_it() -> None:
    """A node catching up from three peers that held the same records took each record three times."""
    m = machine("a", "b", "c", parallel=4)
    for peer in ("a", "b", "c"):
        m.behind(peer)
    covers = {"b": {"a"}, "c": {"a", "b"}}  # b's surplus is in a's digest; c's in a's or b's

    def covered(peer: str, pulling: frozenset[str]) -> bool:
        return bool(covers.get(peer, set()) & pulling)

    assert m.next_actions(covered) == [pull("a")]
    assert m.next_actions(covered) == []  # still covered while a's pull runs
    assert m.answered("a", progressed=True, behind=False, snapshot_required=False, records=5) is None
    assert m.next_actions(covered) == [pull("b")]  # c waits for b in turn
    assert m.answered("b", progressed=False, behind=False, snapshot_required=False, records=0) is None
    assert m.next_actions(covered) == [pull("c")]
    assert m.wanted == []
