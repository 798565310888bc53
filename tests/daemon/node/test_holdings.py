"""daemon.node.holdings: what each member is known to hold (a vector only grows; silent members and
members past MAX_MEMBERS are forgotten). Compaction by these vectors is tested in test_replica.py."""

from __future__ import annotations

from node_testlib import HIST

import crdt
from daemon.node.holdings import MAX_MEMBERS, PeerHoldings

A, B = sorted({c.author for c in HIST})[:2]


def _vv(**seqs: int) -> crdt.VersionVector:
    return crdt.VersionVector.from_dict({{"a": A, "b": B}[name]: seq for name, seq in seqs.items()})


def test_a_vector_heard_is_joined_with_what_the_member_was_known_to_hold() -> None:
    holdings = PeerHoldings()
    holdings.note_vector("m", _vv(a=3))
    holdings.note_vector("m", _vv(a=1, b=2))  # an older digest: hashed from a frozen state
    assert holdings.get("m") == _vv(a=3, b=2)
    assert holdings.get("never") is None


def test_a_member_that_took_our_push_holds_it_unless_an_earlier_record_may_be_missing() -> None:
    holdings = PeerHoldings()
    first, second, third = sorted((c for c in HIST if c.author == A), key=lambda c: c.seq)[:3]
    holdings.note_holds("fresh", second)  # nothing heard from it: seq 1 may be missing, 2 in its gap buffer
    assert holdings.get("fresh") is None
    holdings.note_holds("fresh", first)
    holdings.note_holds("fresh", second)
    assert holdings.get("fresh") == _vv(a=second.seq)
    holdings.note_vector("member", _vv(b=5))
    holdings.note_holds("member", first)
    holdings.note_holds("member", third)  # after a push that failed: not claimed
    assert holdings.get("member") == _vv(b=5, a=1)


def test_together_is_the_join_of_members_heard_within_the_ttl() -> None:
    now = [1000.0]
    holdings = PeerHoldings(ttl_s=60.0, clock=lambda: now[0])
    assert holdings.together() is None
    holdings.note_vector("old", _vv(a=9))
    now[0] += 61.0
    assert holdings.together() is None  # the only one heard is too old
    holdings.note_vector("x", _vv(a=2))
    holdings.note_vector("y", _vv(b=4))
    assert holdings.together() == _vv(a=2, b=4)


def test_members_skips_those_far_behind_and_forgets_the_silent_and_the_surplus() -> None:
    now = [1000.0]
    holdings = PeerHoldings(ttl_s=60.0, clock=lambda: now[0])
    holdings.note_vector("silent", _vv(a=10))
    now[0] += 61.0
    for i in range(MAX_MEMBERS + 5):  # strangers with empty digests, each heard a moment later
        now[0] += 0.001
        holdings.note_vector(f"stranger{i}", crdt.VersionVector())
    holdings.note_vector("close", _vv(a=9))
    members = holdings.members(_vv(a=10), within=3)
    assert members == {"close": _vv(a=9)}  # the strangers lack 10 > 3
    assert len(holdings.vectors) == MAX_MEMBERS and "silent" not in holdings.vectors
    assert "close" in holdings.vectors and "stranger0" not in holdings.vectors  # the oldest went first
