"""daemon.node.rounds: the training loop's states: pause, resume, start more rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node_testlib import FakeNet, FakeTrainer, host_for, running_node, until
from node_testlib import node_config as config

from daemon.status import TrainingState
from training import StalenessPolicy


async def test_pause_resume_and_start_more_rounds(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    async with running_node(tmp_path, FakeNet(), config(training={"max_rounds": 1}), trainer=trainer) as node:
        rounds = node.parts.rounds
        await until(lambda: node.training_state is TrainingState.DONE)
        rounds.pause()
        assert rounds.start(2) == 3  # also resumes
        await until(lambda: node.status().round == 3 and node.training_state is TrainingState.DONE)
        rounds.pause()
        rounds.start(0)
        trainer.round_gate = gate = asyncio.Event()
        rounds.pause()
        gate.set()  # the round in flight finishes; the next one waits for resume
        await until(lambda: node.training_state is TrainingState.PAUSED)
        paused_at = node.status().round
        rounds.resume()
        gate.set()
        await until(lambda: node.status().round > paused_at)


async def test_a_joiner_takes_in_the_run_before_its_first_round(tmp_path: Path) -> None:
    """Six daemons joined by invite each lost their first round: it started from the genesis while the
    first pulls brought in the run, and all of that counted as staleness (40 > the bound of 16 here)."""
    net = FakeNet()
    founder = host_for(tmp_path / "a", net)
    net.link(founder.peer_id, host_for(tmp_path / "b", net).peer_id)
    trains = config(training={"max_rounds": 40}, sync={"interval_s": 0.05})
    async with running_node(tmp_path / "a", net, trains) as a:
        await until(lambda: a.status().contributions == 40)
        trainer = FakeTrainer(seed=1)
        trainer.round_gate = asyncio.Event()  # the first round holds here, its base state taken
        join = trains.with_overrides("node", bootstrap=(founder.addr,))
        join = join.with_overrides("training", max_rounds=1)
        async with running_node(tmp_path / "b", net, join, trainer=trainer) as b:
            await until(lambda: len(trainer.peers_per_round) == 1)
            assert b.status().contributions == 40  # the base of its first round: the run, not the genesis
            trainer.round_gate.set()
            await until(lambda: b.status().round == 1 or b.status().counters.stale_rounds_skipped > 0)
            assert b.status().counters.stale_rounds_skipped == 0


async def test_peers_whose_heartbeat_says_training_count_before_their_first_contribution(
    tmp_path: Path,
) -> None:
    """Six joiners starting together each counted a run of two (founder and self) and bounded staleness
    by that; a heartbeat saying "running" makes a peer count before its first contribution lands."""
    net = FakeNet()
    founder = host_for(tmp_path / "a", net)
    net.link(founder.peer_id, host_for(tmp_path / "b", net).peer_id)
    held = FakeTrainer(seed=1)
    held.round_gate = asyncio.Event()  # b trains, but its first round never ends during the test
    trains = config(training={"max_rounds": 0}, sync={"interval_s": 0.05})
    async with running_node(tmp_path / "a", net, trains) as a:
        join = trains.with_overrides("node", bootstrap=(founder.addr,))
        async with running_node(tmp_path / "b", net, join, trainer=held) as b:
            await until(lambda: a.parts.rounds.live_peers() == 2, timeout_s=30)  # a heartbeat in <= 6 s
            assert b.status().round == 0  # counted from its heartbeat alone


async def test_joiners_starting_together_train_without_waiting_for_an_anti_entropy_period(
    tmp_path: Path,
) -> None:
    """With anti-entropy every 30 s, a joiner's first round waited for a digest that only the period
    would bring; a waiting round now pulls from its connected peers at once."""
    net = FakeNet()
    founder = host_for(tmp_path / "a", net)
    net.link(founder.peer_id, host_for(tmp_path / "b", net).peer_id)
    trains = config(training={"max_rounds": 3}, sync={"interval_s": 3600.0})
    async with running_node(tmp_path / "a", net, trains) as a:
        await until(lambda: a.status().contributions == 3)
        join = trains.with_overrides("node", bootstrap=(founder.addr,))
        async with running_node(tmp_path / "b", net, join) as b:
            await until(lambda: b.status().round == 3 and b.status().contributions == 6)
            assert b.parts.rounds.history[0].staleness == 0  # it started from the run, not the genesis


async def test_a_round_is_dropped_only_past_what_every_connected_peer_could_land(tmp_path: Path) -> None:
    """N from the peers seen training lags behind peers that start together; the drop bound does not."""
    net = FakeNet()
    me = host_for(tmp_path / "a", net)
    for i in range(5):
        net.link(me.peer_id, net.add(f"peer{i}").peer_id)
    async with running_node(tmp_path / "a", net, config(training={"enabled": False})) as node:
        seen_two = StalenessPolicy(expected_peers=2, max_staleness=8)
        policy = node.parts.rounds._staleness_policy(seen_two)
        assert policy.max_staleness == 4 * 6 and policy.expected_peers == 2  # the weight's N is unchanged
        assert policy.weight(20) > 0.0 and policy.weight(25) == 0.0


async def test_in_lockstep_a_round_waits_for_every_training_peer_and_not_past_the_timeout(
    tmp_path: Path,
) -> None:
    net = FakeNet()
    founder = host_for(tmp_path / "a", net)
    net.link(founder.peer_id, host_for(tmp_path / "b", net).peer_id)
    fast, slow = FakeTrainer(), FakeTrainer(seed=1)
    fast.round_gate, slow.round_gate = asyncio.Event(), asyncio.Event()
    lockstep = config(training={"max_rounds": 0, "lockstep": True}, sync={"interval_s": 0.05})
    async with running_node(tmp_path / "a", net, lockstep, trainer=fast) as a:
        join = lockstep.with_overrides("node", bootstrap=(founder.addr,))
        async with running_node(tmp_path / "b", net, join, trainer=slow) as b:
            b_id = b.host.peer_id
            # b's heartbeat says it trains (its first one may say "loading": the next is within 6 s)
            await until(lambda: a.parts.rounds.live_peers() == 2, timeout_s=30)
            fast.round_gate.set()
            await until(lambda: a.status().round == 1)
            fast.round_gate.set()  # a may train round 2, but b has not contributed since round 1 began
            await until(lambda: a.parts.rounds.waiting_for == {b_id})
            assert fast.round_gate.is_set() and a.status().round == 1
            slow.round_gate.set()  # b's first round lands at a (pushed): a's round 2 goes ahead
            await until(lambda: a.status().round == 2 and not fast.round_gate.is_set())
            await until(lambda: a.parts.rounds.waiting_for == {b_id})  # and waits for b again
            a.config = a.config.with_overrides("training", lockstep_timeout_s=0.5)  # b never answers
            fast.round_gate.set()
            await until(lambda: a.status().round == 3)
