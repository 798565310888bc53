"""Anti-entropy: plan_sync decisions, retention, and a lossy/shuffling/duplicating N-replica simulation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pytest
from crdt_testlib import SIGNERS, contribution, genesis, history, read_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    CheckpointPolicy,
    Contribution,
    Digest,
    GapTooLargeError,
    Limits,
    ModelState,
    VersionVector,
    plan_sync,
    retention_floor,
)

G = genesis(length=96, n_fragments=3)


def _replay(cs) -> ModelState:
    s = ModelState(G)
    for c in cs:
        s.apply(c)
    return s


def test_plan_sync_cases() -> None:
    hist = history(G, n_authors=3, per_author=3)
    full, part = _replay(hist), _replay([c for c in hist if c.seq == 1])
    plan = plan_sync(full, part.digest())
    assert {c.id for c in plan.send} == {c.id for c in hist if c.seq > 1}
    assert not plan.remote_has_more and not plan.in_sync and not plan.remote_needs_snapshot
    back = plan_sync(part, full.digest())
    assert back.send == () and back.remote_has_more
    same = plan_sync(full, full.digest())
    assert same.in_sync and not same.diverged and same.send == ()
    fake = Digest(full.version_vector, "00" * 32, full.contribution_count)
    assert plan_sync(full, fake).diverged
    assert len(plan_sync(full, ModelState(G).digest(), max_count=2).send) == 2


def test_retention_floor_and_snapshot_fallback() -> None:
    hist = history(G, n_authors=3, per_author=4)
    full = _replay(hist)
    peer_a = _replay([c for c in hist if c.seq <= 3])
    peer_b = _replay([c for c in hist if c.seq <= 2 or c.author == SIGNERS[0].public_key])
    floor = retention_floor(full.version_vector, [peer_a.version_vector, peer_b.version_vector])
    assert dict(floor) == {s.public_key: (3 if i == 0 else 2) for i, s in enumerate(SIGNERS[:3])}
    full.compact(floor)
    for peer in (peer_a, peer_b):
        plan = plan_sync(full, peer.digest())
        assert not plan.remote_needs_snapshot
        for c in plan.send:
            peer.apply(c)
        assert peer.state_hash == full.state_hash
    newcomer = plan_sync(full, ModelState(G).digest())
    assert newcomer.remote_needs_snapshot
    policy = CheckpointPolicy(frozenset({SIGNERS[4].public_key}), 1)
    restored = ModelState.from_snapshot(G, read_snapshot(G, full.snapshot_parts()),
                                        checkpoints=[full.checkpoint(SIGNERS[4])], policy=policy)
    assert restored.state_hash == full.state_hash


# -- simulation ---------------------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    state: ModelState
    own: list[Contribution] = field(default_factory=list)


def _simulate(seed: int, n: int, per_author: int, drop: float, dup: float, max_steps: int = 20_000) -> None:
    rng = np.random.default_rng(seed)
    limits = Limits(max_buffered_gap=4, max_buffered_total=16)  # small: exercises GapTooLarge refusals
    reps = [Replica(i, ModelState(G, limits=limits)) for i in range(n)]
    made = {i: [contribution(G, SIGNERS[i], s, seed=seed) for s in range(1, per_author + 1)]
            for i in range(n)}
    inbox: list[tuple[int, str, bytes | list[bytes], int]] = []  # (dst, kind, data, src)

    def send(dst: int, kind: str, data, src: int) -> None:
        if rng.random() < drop:
            return
        inbox.append((dst, kind, data, src))
        if rng.random() < dup:
            inbox.append((dst, kind, data, src))

    every = [c for cs in made.values() for c in cs]
    target = _replay(every).state_hash
    step = 0
    for step in range(max_steps):  # noqa: B007 - reported in the failure message
        # authors publish their next contribution now and then, gossiping it to one random peer
        i = int(rng.integers(n))
        if made[i] and rng.random() < 0.3:
            c = made[i].pop(0)
            reps[i].state.apply(c)
            send(int(rng.integers(n)), "contribs", [c.encode()], i)
        # periodic digest to a random peer
        if rng.random() < 0.5:
            src, dst = (int(x) for x in rng.choice(n, size=2, replace=False))
            send(dst, "digest", reps[src].state.digest().encode(), src)
        # deliver one message chosen at random (shuffles delivery order)
        if inbox:
            dst, kind, data, src = inbox.pop(int(rng.integers(len(inbox))))
            me = reps[dst].state
            if kind == "digest":
                plan = plan_sync(me, Digest.decode(data), max_count=3)
                if plan.send:
                    send(src, "contribs", [c.encode() for c in plan.send], dst)
                if plan.remote_has_more:
                    send(src, "digest", me.digest().encode(), dst)
            else:
                for raw in data:
                    with contextlib.suppress(GapTooLargeError):
                        me.apply(Contribution.decode(raw))
        if not any(made.values()) and all(r.state.state_hash == target for r in reps):
            break
    hashes = {r.state.state_hash for r in reps}
    assert hashes == {target}, f"not converged after {step} steps"
    ref = reps[0].state.materialize().tobytes()
    assert all(r.state.materialize().tobytes() == ref for r in reps)
    assert all(r.state.version_vector == VersionVector.from_dict(
        {SIGNERS[i].public_key: per_author for i in range(n)}) for r in reps)


@pytest.mark.parametrize(
    ("seed", "drop", "dup"), [(1, 0.0, 0.0), (2, 0.3, 0.2), (3, 0.5, 0.5), (4, 0.2, 0.0)]
)
def test_replicas_converge(seed: int, drop: float, dup: float) -> None:
    _simulate(seed, n=5, per_author=6, drop=drop, dup=dup)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 6), drop=st.floats(0, 0.6), dup=st.floats(0, 0.6))
def test_replicas_converge_property(seed: int, n: int, drop: float, dup: float) -> None:
    _simulate(seed, n=n, per_author=4, drop=drop, dup=dup)
