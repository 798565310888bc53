"""daemon.node.sync: whole nodes over an in-memory network (no sockets): anti-entropy converges, and
hostile or slow peers cannot hold back the others, get a relayer blamed, or make a node pull forever."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path

from node_testlib import (
    FakeHost,
    FakeNet,
    FakeTrainer,
    Handler,
    host_for,
    records,
    running_node,
    signer,
    until,
)

import crdt
import p2p
from daemon.config import Config
from daemon.node import wire


def config(**training: object) -> Config:
    return Config.from_dict(
        {
            "training": {"max_rounds": 0, "enabled": False, **training},
            "sync": {"interval_s": 0.05, "request_timeout_s": 30.0},
        }
    )


async def test_three_nodes_converge_on_every_contribution(tmp_path: Path) -> None:
    net = FakeNet()
    homes = [tmp_path / name for name in "abc"]
    peers = [host_for(home, net).peer_id for home in homes]
    net.link(peers[0], peers[1])
    net.link(peers[1], peers[2])  # a and c meet only through b
    trains = config(enabled=True, max_rounds=3)
    join = trains.with_overrides("node", bootstrap=(net.hosts[peers[0]].addr,))
    async with (
        running_node(homes[0], net, trains) as a,
        running_node(homes[1], net, join) as b,
        running_node(homes[2], net, join.with_overrides("training", enabled=False)) as c,
    ):
        nodes = (a, b, c)
        await until(lambda: all(n.status().contributions == 6 for n in nodes))
        await until(lambda: len({n.status().state_hash for n in nodes}) == 1)
    assert a.status().counters.rejected == 0


async def test_a_stalling_peer_does_not_hold_back_an_honest_one(tmp_path: Path) -> None:
    net = FakeNet()
    victim_home, honest_home = tmp_path / "victim", tmp_path / "honest"
    victim, honest = host_for(victim_home, net), host_for(honest_home, net)
    staller = net.add("12D3KooWstaller")
    stalled = asyncio.Event()

    async def stall(peer: str, data: bytes) -> bytes:
        stalled.set()
        await asyncio.Event().wait()  # never answers (the request times out after 30 s)
        raise AssertionError

    staller.set_request_handler(wire.SYNC_PROTOCOL, stall)
    net.link(victim.peer_id, staller.peer_id)
    net.link(victim.peer_id, honest.peer_id)
    async with running_node(honest_home, net, config(enabled=True, max_rounds=2)) as h:
        await until(lambda: h.status().round == 2)
        join = config().with_overrides("node", bootstrap=(honest.addr,))
        async with running_node(victim_home, net, join) as v:
            await until(stalled.is_set)
            await until(lambda: v.status().contributions == 2, timeout_s=5.0)  # far below the 30 s stall
            assert v.status().state_hash == h.status().state_hash


async def test_a_peer_that_always_claims_more_cannot_keep_the_others_out(tmp_path: Path) -> None:
    """With one pull slot, a liar that answers every pull with one new record and "I have a million more"
    would hold a node's sync forever; the round-trip budget hands the slot to the honest peer."""
    net = FakeNet()
    victim_home, honest_home = tmp_path / "victim", tmp_path / "honest"
    victim, honest = host_for(victim_home, net), host_for(honest_home, net)
    liar = net.add("12D3KooWliar")
    net.link(victim.peer_id, honest.peer_id)
    async with running_node(honest_home, net, config(enabled=True, max_rounds=1)) as h:
        join = config().with_overrides("node", bootstrap=(honest.addr,))
        async with running_node(victim_home, net, join) as v:
            await until(lambda: v.status().genesis is not None)  # fetched (a blob, through a thread)
            machine = v.parts.sync.machine
            machine.policy = dataclasses.replace(machine.policy, parallel=1)  # one slot: they must share it
            await until(lambda: v.status().version_vector.get(h.host.peer_id) == 1)
            flood = records(v, author=7, seqs=range(1, 100_000))

            async def one_more_each_time(peer: str, data: bytes) -> bytes:
                record = next(flood)
                claim = crdt.VersionVector.from_dict({record.author: 10**6})  # "I have a million"
                digest = crdt.Digest(claim, "00" * 32, 10**6).encode()
                return wire.SyncResponse(digest=digest, contributions=(record.encode(),)).encode()

            liar.set_request_handler(wire.SYNC_PROTOCOL, one_more_each_time)
            net.link(victim.peer_id, liar.peer_id)
            budget = machine.policy.max_round_trips
            await until(lambda: sum(p == liar.peer_id for p, _ in victim.requests) > 2 * budget)
            h.parts.rounds.start(1)  # the honest peer makes one more contribution while the liar floods
            await until(lambda: v.status().version_vector.get(h.host.peer_id) == 2)


async def test_garbage_answers_are_counted_and_penalized_and_foreign_peers_left_alone(tmp_path: Path) -> None:
    net = FakeNet()
    home = tmp_path / "victim"
    victim = host_for(home, net)
    junk, other_run = net.add("12D3KooWjunk"), net.add("12D3KooWother")

    async def answer_junk(peer: str, data: bytes) -> bytes:
        return b"\x93not a sync response"

    async def foreign(peer: str, data: bytes) -> bytes:
        raise wire.ForeignRun("this node serves genesis ffff")

    junk.set_request_handler(wire.SYNC_PROTOCOL, answer_junk)
    other_run.set_request_handler(wire.SYNC_PROTOCOL, foreign)
    for host in (junk, other_run):
        net.link(victim.peer_id, host.peer_id)
    async with running_node(home, net, config()) as v:
        machine = v.parts.sync.machine
        await until(lambda: other_run.peer_id in machine.foreign and junk.peer_id in victim.penalized)
        assert v.status().counters.rejected_reasons.get("WireError", 0) >= 1
        asked = sum(1 for peer, _ in victim.requests if peer == other_run.peer_id)
        await until(lambda: sum(1 for p, _ in victim.requests if p == junk.peer_id) >= 3)  # periods pass
        assert sum(1 for peer, _ in victim.requests if peer == other_run.peer_id) == asked
        assert other_run.peer_id not in victim.penalized  # another run is not hostile


async def test_an_equivocation_relayed_by_an_honest_peer_is_the_authors_fault(tmp_path: Path) -> None:
    net = FakeNet()
    home = tmp_path / "victim"
    victim = host_for(home, net)
    relay_a, relay_b = net.add("12D3KooWrelayA"), net.add("12D3KooWrelayB")
    async with running_node(home, net, config()) as v:
        genesis = v.parts.replica.state.genesis
        first = next(records(v, author=9, seqs=range(1, 2)))
        second = crdt.make_contribution(
            signer(9), genesis_id=genesis.id, seq=1, fragment=0, codec=first.codec,
            payload=first.payload, weight=0.5, base_version=first.base_version,
        )

        def serving(record: crdt.Contribution) -> Handler:
            async def handler(peer: str, data: bytes) -> bytes:
                vv = crdt.VersionVector.from_dict({record.author: 1})
                digest = crdt.Digest(vv, "00" * 32, 1)
                return wire.SyncResponse(digest=digest.encode(), contributions=(record.encode(),)).encode()

            return handler

        relay_a.set_request_handler(wire.SYNC_PROTOCOL, serving(first))
        relay_b.set_request_handler(wire.SYNC_PROTOCOL, serving(second))
        net.link(victim.peer_id, relay_a.peer_id)
        await until(lambda: v.status().contributions == 1)
        net.link(victim.peer_id, relay_b.peer_id)
        await until(lambda: v.status().counters.equivocations == 1)
        status = v.status()
        author = next(iter(status.equivocators))
        assert status.equivocators[author] == [1] and author in status.suspects
        assert victim.penalized == []  # neither relayer is blamed
        assert "ConflictError" not in status.counters.rejected_reasons


async def test_rounds_count_the_peers_that_train_now(tmp_path: Path) -> None:
    """DiLoCo's N comes from the authors whose contributions arrive, not from a constant: three training
    nodes pass N = 3 once they hear each other; [diloco] expected_peers fixes it instead."""
    net = FakeNet()
    homes = [tmp_path / name for name in "abc"]
    peers = [host_for(home, net).peer_id for home in homes]
    for a, b in itertools.combinations(peers, 2):
        net.link(a, b)
    trains = config(enabled=True, max_rounds=6)
    join = trains.with_overrides("node", bootstrap=(net.hosts[peers[0]].addr,))
    fixed = join.with_overrides("diloco", expected_peers=5)
    trainers = [FakeTrainer(seed=i) for i in range(3)]
    for trainer in trainers:
        trainer.round_gate = asyncio.Event()
    async with (
        running_node(homes[0], net, trains, trainer=trainers[0]) as a,
        running_node(homes[1], net, join, trainer=trainers[1]) as b,
        running_node(homes[2], net, fixed, trainer=trainers[2]) as c,
    ):
        for done in range(1, 7):  # rounds in lockstep: each waits until everyone's last one arrived
            await until(lambda n=done: all(len(t.peers_per_round) == n for t in trainers))
            for trainer in trainers:
                trainer.round_gate.set()
            await until(lambda n=done: all(x.status().contributions == 3 * n for x in (a, b, c)))
    assert trainers[0].peers_per_round[0] == 1  # alone at first
    assert trainers[0].peers_per_round[-1] == 3 and trainers[1].peers_per_round[-1] == 3
    assert set(trainers[2].peers_per_round) == {None}  # configured: the trainer uses expected_peers


async def test_gossip_from_peers_outside_the_run_is_dropped_until_they_sync(tmp_path: Path) -> None:
    net = FakeNet()
    home = tmp_path / "node"
    node_host = host_for(home, net)
    stranger = net.add("12D3KooWstranger")
    net.link(node_host.peer_id, stranger.peer_id)
    beat = wire.Heartbeat(round=1, contributions=0, training="running", reachability="unknown",
                          task="stdlib-lm", device="cpu", throughput_bps=0).encode()
    async with running_node(home, net, config()) as v:
        await stranger.publish(wire.heartbeat_topic("default"), beat)  # dropped at the gate, synchronously
        assert v.parts.membership.heartbeats == {} and not v.parts.sync.is_member(stranger.peer_id)
        empty = crdt.Digest(crdt.VersionVector(), "00" * 32, 0).encode()
        request = wire.SyncRequest(genesis=v.status().genesis, digest=empty)
        await stranger.request(node_host.peer_id, wire.SYNC_PROTOCOL, request.encode(), timeout_s=5)
        await stranger.publish(wire.heartbeat_topic("default"), beat)
        await until(lambda: stranger.peer_id in v.status().peer_info)  # it showed our genesis: admitted


async def test_a_node_that_misses_all_checkpoint_gossip_learns_them_from_sync_answers(tmp_path: Path) -> None:
    """Gossip is best effort: a CI run had a node miss all six of the founder's checkpoints and never
    compact. Sync answers carry the newest attested checkpoints to a requester that knows older ones."""
    net = FakeNet()
    founder, follower = host_for(tmp_path / "a", net), host_for(tmp_path / "b", net)
    net.link(founder.peer_id, follower.peer_id)
    base = config(enabled=True, max_rounds=8).with_overrides("sync", snapshot_every=4)
    joiner = base.with_overrides("node", bootstrap=(founder.addr,)).with_overrides("training", enabled=False)
    async with running_node(tmp_path / "a", net, base) as a, running_node(tmp_path / "b", net, joiner) as b:
        topic = wire.checkpoint_topic(b.config.node.run)
        follower.validators[topic] = lambda _peer, _data: False  # every checkpoint gossip to b is lost
        await until(lambda: b.status().contributions == 8 and b.status().retained_contributions < 8)
        assert b.parts.replica.attestations.attested_vector() is not None
        assert a.status().counters.rejected == b.status().counters.rejected == 0


async def test_contributions_are_pushed_to_members_and_announced_only_when_one_is_out_of_reach(
    tmp_path: Path,
) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "a", tmp_path / "b"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    trains = config(enabled=True, max_rounds=4)
    join = config().with_overrides("node", bootstrap=(host_for(founder, net).addr,))
    trainer = FakeTrainer()
    trainer.round_gate = asyncio.Event()  # each round waits for the test
    async with (
        running_node(founder, net, trains, trainer=trainer) as a,
        running_node(joiner, net, join) as b,
    ):
        await until(lambda: b.host.peer_id in a.parts.sync.members)  # it pulled once: a member
        for done in (1, 2):
            trainer.round_gate.set()
            await until(lambda: b.status().contributions == done)  # noqa: B023 - awaited at once
            await until(lambda: len(a.history()) == done)  # noqa: B023 - a's round is handed to the spreader
            await a.parts.sync.spreader.spread()  # which decided whether to announce it, after b's answer
        assert b.status().counters.pushes_received == 2  # each round's record, straight from its author
        assert a.status().counters.pushed == 2 and a.status().counters.announced == 0  # nobody else to tell
        held = a.parts.replica.holdings.get(b.host.peer_id)  # from the push's answer: what b holds
        assert held.total == 2
        a.parts.sync.spreader.must_reach = lambda: {b.host.peer_id, "12D3KooWfar"}  # heard of, not connected
        for done in (3, 4):
            trainer.round_gate.set()
            await until(lambda: b.status().contributions == done)  # noqa: B023
            await until(lambda: len(a.history()) == done)  # noqa: B023
            await a.parts.sync.spreader.spread()
        assert a.status().counters.announced == 2  # the far member is told by gossip (rounds 3 and 4)
        assert b.status().counters.pushes_received == 4


async def test_a_member_gets_our_digest_in_a_push_once_per_anti_entropy_period(tmp_path: Path) -> None:
    """In every push the sender's digest was 1.3 % of a 0.28M-parameter run's bytes; compaction needs it
    no more often than a pull would bring it."""
    net = FakeNet()
    founder, joiner = tmp_path / "a", tmp_path / "b"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    trains = config(enabled=True, max_rounds=3).with_overrides("sync", interval_s=3600)
    join = config().with_overrides("node", bootstrap=(host_for(founder, net).addr,))
    trainer = FakeTrainer()
    trainer.round_gate = asyncio.Event()
    async with (
        running_node(founder, net, trains, trainer=trainer) as a,
        running_node(joiner, net, join) as b,
    ):
        await until(lambda: b.host.peer_id in a.parts.sync.members)
        serve, digests = b.host.handlers[wire.PUSH_PROTOCOL], []

        async def spy(peer: str, data: bytes) -> bytes:
            digests.append(wire.Push.decode(data).digest)
            return await serve(peer, data)

        b.host.handlers[wire.PUSH_PROTOCOL] = spy
        for done in (1, 2):
            trainer.round_gate.set()
            await until(lambda: b.status().contributions == done)  # noqa: B023 - awaited at once
        assert [bool(d) for d in digests] == [True, False]
        a.config = a.config.with_overrides("sync", interval_s=0.001)  # the period has passed
        trainer.round_gate.set()
        await until(lambda: b.status().contributions == 3)
        assert [bool(d) for d in digests] == [True, False, True]
        held = b.parts.replica.holdings.get(a.host.peer_id)
        assert held.total == 3 and b.status().counters.rejected == 0


async def test_a_push_must_be_its_senders_own_record_of_this_run(tmp_path: Path) -> None:
    net = FakeNet()
    home = tmp_path / "victim"
    victim = host_for(home, net)
    author = signer(7)
    pusher = net.add(p2p.peer_id_from_public_key(author.public_key))
    relayer, other_run = net.add("12D3KooWrelayer"), net.add("12D3KooWother")
    for host in (pusher, relayer, other_run):
        net.link(victim.peer_id, host.peer_id)
    async with running_node(home, net, config()) as v:
        own, _ = records(v, 7, range(1, 3))
        digest = crdt.Digest(crdt.VersionVector.from_dict({author.public_key: 1}), "00" * 32, 1).encode()

        async def push(sender: FakeHost, data: bytes) -> str | None:
            try:
                await sender.request(victim.peer_id, wire.PUSH_PROTOCOL, data, timeout_s=5)
            except p2p.RemoteError as exc:
                return exc.error_type
            return None

        assert await push(pusher, wire.Push(digest, own.encode()).encode()) is None
        assert v.status().counters.pushes_received == 1 and v.status().contributions == 1
        held = v.parts.replica.holdings.get(pusher.peer_id)  # the sender's digest: what it holds
        assert held.total == 1
        not_its_own = wire.Push(digest, own.encode()).encode()
        assert await push(relayer, not_its_own) == "WireError"
        assert await push(relayer, b"\x93junk") == "WireError"
        foreign = crdt.make_contribution(  # the signed record says which run it is of
            author, genesis_id="ff" * 32, seq=1, fragment=0, codec=own.codec, payload=own.payload, weight=1.0,
            base_version=own.base_version,
        )
        assert await push(other_run, wire.Push(digest, foreign.encode()).encode()) == "ForeignRun"
        assert v.status().counters.rejected_reasons == {"WireError": 2}
        assert relayer.peer_id in victim.penalized and other_run.peer_id not in victim.penalized


async def test_a_node_behind_peers_that_hold_the_same_records_takes_each_record_once(tmp_path: Path) -> None:
    """Pulled at once, three peers holding the same 40 records each sent all of them (80 duplicates)."""
    net = FakeNet()
    homes = [tmp_path / name for name in "abcd"]
    hosts = [host_for(home, net) for home in homes]
    for one, other in itertools.combinations(hosts, 2):
        net.link(one.peer_id, other.peer_id)
    quiet = config(enabled=False).with_overrides("sync", interval_s=3600)  # no anti-entropy: our pulls only
    join = quiet.with_overrides("node", bootstrap=(hosts[0].addr,))
    async with (
        running_node(homes[0], net, quiet) as a,
        running_node(homes[1], net, join) as b,
        running_node(homes[2], net, join) as c,
        running_node(homes[3], net, join) as d,
    ):
        await until(lambda: all(n.status().state_hash for n in (b, c, d)))  # the joiners took the genesis
        held = list(records(a, 7, range(1, 41)))
        for node in (a, b, c):
            for record in held:
                node.parts.replica.accept(record)
        for node in (a, b, c):
            d.parts.replica.holdings.note_vector(node.host.peer_id, node.parts.replica.state.version_vector)
        d.parts.sync.pull_from_peers_ahead()
        await until(lambda: d.status().contributions == 40)
        assert d.status().counters.duplicates == 0


async def test_newly_connected_peers_are_met_at_once_and_then_pushed_to(tmp_path: Path) -> None:
    """Only members are pushed to, and a peer became one at the first exchange of digests: left to the
    anti-entropy period, three of four daemons started together pushed to one member for six rounds."""
    net = FakeNet()
    homes = [tmp_path / name for name in "abc"]
    hosts = [host_for(home, net) for home in homes]
    for one, other in itertools.combinations(hosts, 2):
        net.link(one.peer_id, other.peer_id)
    quiet = config(enabled=False).with_overrides("sync", interval_s=3600)  # no anti-entropy
    trainer = FakeTrainer()
    trainer.round_gate = asyncio.Event()
    founder = quiet.with_overrides("training", enabled=True, max_rounds=1)
    join = quiet.with_overrides("node", bootstrap=(hosts[0].addr,))
    async with (
        running_node(homes[0], net, founder, trainer=trainer) as a,
        running_node(homes[1], net, join) as b,
        running_node(homes[2], net, join) as c,
    ):
        await until(lambda: {b.host.peer_id, c.host.peer_id} <= a.parts.sync.members)
        trainer.round_gate.set()
        await until(lambda: b.status().contributions == 1 and c.status().contributions == 1)
        assert b.status().counters.pushes_received == c.status().counters.pushes_received == 1
