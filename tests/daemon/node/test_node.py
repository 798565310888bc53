"""daemon.node.node: founding and joining, the training loop's states, goodbye, status. Whole nodes run
over an in-memory host with a stand-in trainer (node_testlib), so no sockets and no torch process."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import numpy as np
import pytest
from node_testlib import PARAMS, FakeNet, FakeTrainer, host_for, running_node, until
from node_testlib import node_config as config

from daemon.config import Config, ConfigError, task_path
from daemon.home import Home
from daemon.node.node import Node, NodeError, host_config
from daemon.node.store import Store
from daemon.status import TrainingState


async def test_a_founder_trains_its_rounds_and_reports_them(tmp_path: Path) -> None:
    net = FakeNet()
    async with running_node(tmp_path, net, config(node={"run": "r1", "clip_norm": 0.5})) as node:
        await until(lambda: node.training_state is TrainingState.DONE)
        status = node.status()
        genesis = node.parts.replica.state.genesis
        founder = node.signer.public_key.hex()  # the checkpoint signer of the run, by default
        assert dict(genesis.meta) == {
            "run": "r1", "task": "stdlib-lm", "clip_norm": "0.5",
            "checkpoint_signers": founder, "checkpoint_quorum": "1",
        }
        assert status.round == 3 and status.contributions == 3 and status.clip_norm == 0.5
        assert [r.round for r in node.parts.rounds.history] == [1, 2, 3]
        spans = node.parts.rounds.history[-1].spans_s  # where a round's time goes (bench_model_scale)
        assert set(spans) == {"materialize", "train", "sign", "accept", "commit", "announce"}
        assert status.initial_eval.contributions == 0 and status.eval.contributions == 3
        assert node.trainer.commits == 3  # the trainer saved its state after each durable contribution
        result = await node.export_checkpoint(tmp_path / "model.safetensors")
        assert result["state_hash"] == status.state_hash and (tmp_path / "model.safetensors").exists()


async def test_status_answers_before_the_state_is_loaded(tmp_path: Path) -> None:
    host = host_for(tmp_path, FakeNet())
    node = Node(Home(tmp_path), Config(), host=host, trainer=FakeTrainer())  # type: ignore[arg-type]
    assert node.training_state is TrainingState.STARTING and node.rounds_done == 0
    status = node.status()
    assert status.training is TrainingState.STARTING and status.state_hash is None and status.round == 0
    with pytest.raises(NodeError, match="not loaded"):
        node.parts  # noqa: B018 - the parts that need the state
    node.store.close()


async def test_the_training_process_starts_beside_the_host_and_is_closed_if_the_host_fails(
    tmp_path: Path,
) -> None:
    """The child's start (torch, the task: seconds) overlaps the host's; a host that cannot start (a port
    taken) fails the node with its own error and leaves no training process behind."""
    host = host_for(tmp_path, FakeNet())
    trainer = FakeTrainer()
    trainer_starting, closed = asyncio.Event(), []

    async def start_trainer() -> None:
        trainer_starting.set()
        await asyncio.Event().wait()  # importing torch, for as long as the host needs

    async def start_host() -> None:
        await asyncio.wait_for(trainer_starting.wait(), 10)  # times out if the node waits for the trainer
        raise OSError(errno.EADDRINUSE, "address in use")

    async def close_trainer() -> None:
        closed.append(True)

    trainer.start, trainer.aclose, host.start = start_trainer, close_trainer, start_host  # type: ignore[method-assign]
    node = Node(Home(tmp_path), Config(), host=host, trainer=trainer)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="address in use"):
        await node.run()
    assert closed == [True]
    node.store.close()


async def test_a_joiner_fetches_the_genesis_and_a_restart_keeps_everything(tmp_path: Path) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    join = config(node={"bootstrap": [host_for(founder, net).addr]})
    async with running_node(founder, net, config()) as f:
        # Its own initialization is not the founder's: it cannot rebuild the genesis, so it downloads it.
        async with running_node(joiner, net, join, trainer=FakeTrainer(scale=2.0)) as j:
            await until(lambda: f.status().contributions == 6 and j.status().contributions == 6)
            status = j.status()
            assert status.genesis == f.status().genesis and not status.join.rebuilt
            assert status.join.source == f.host.peer_id and status.join.genesis_transfer is not None
            state_hash = j.status().state_hash
        async with running_node(joiner, net, join) as j:  # restarted: from its own store, nothing lost
            assert j.status().state_hash == state_hash and j.status().round == 3


async def test_a_joiner_whose_initialization_is_the_genesis_downloads_nothing(tmp_path: Path) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    async with running_node(founder, net, config()) as f:
        pinned = {"bootstrap": [f.host.addr], "genesis": f.status().genesis}
        async with running_node(joiner, net, config(node=pinned)) as j:
            await until(lambda: j.status().contributions == 6)
            status = j.status()
            assert status.genesis == f.status().genesis and status.join.rebuilt
            assert status.join.genesis_transfer is None and status.join.source is None
            assert j.host.fetches == []  # no blob fetch was started
        assert Store(joiner / "store").load_genesis().id == f.status().genesis


async def test_a_joiner_refuses_a_genesis_that_is_not_the_pinned_one_and_takes_the_right_one(
    tmp_path: Path,
) -> None:
    net = FakeNet()
    right, wrong, joiner = tmp_path / "right", tmp_path / "wrong", tmp_path / "joiner"
    net.link(host_for(wrong, net).peer_id, host_for(joiner, net).peer_id)
    async with (
        running_node(right, net, config()) as r,
        running_node(wrong, net, config(), trainer=FakeTrainer(seed=1, scale=2.0)) as w,
    ):
        pinned = r.status().genesis
        assert pinned != w.status().genesis  # same run and task, the other's parameters
        join = config(node={"bootstrap": [r.host.addr], "genesis": pinned, "rebuild_genesis": False},
                      training={"enabled": False})
        async with running_node(joiner, net, join) as j:
            await until(lambda: w.host.peer_id in j.status().join.refused)
            net.link(r.host.peer_id, j.host.peer_id)  # the right peer comes along
            await until(lambda: j.status().genesis == pinned)
            status = j.status()
            assert status.join.source == r.host.peer_id and status.join.pinned_genesis == pinned
            assert "is not the pinned" in status.join.refused[w.host.peer_id]
            assert status.counters.rejected_reasons == {"GenesisRefused": 1}
        assert Store(joiner / "store").load_genesis().id == pinned  # the wrong one never touched the disk


async def test_a_joiner_stays_up_while_every_peer_serves_a_wrong_genesis(tmp_path: Path) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    async with running_node(founder, net, config()) as f:
        other_task = config(node={"bootstrap": [f.host.addr]}, training={"task": "digits"})
        async with running_node(joiner, net, other_task) as j:  # answers status meanwhile
            await until(lambda: f.host.peer_id in j.status().join.refused)
            status = j.status()
            assert status.training is TrainingState.FETCHING_GENESIS and status.genesis is None
            assert "trains task 'stdlib-lm'" in status.join.refused[f.host.peer_id]
        assert Store(joiner / "store").load_genesis() is None


async def test_a_home_of_another_run_is_a_config_error(tmp_path: Path) -> None:
    async with running_node(tmp_path, FakeNet(), config()):
        pass
    with pytest.raises(ConfigError, match="belongs to run 'default', not 'another'"):
        async with running_node(tmp_path, FakeNet(), config(node={"run": "another"})):
            pass


async def test_a_full_disk_pauses_training_and_pulls_and_the_node_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = FakeNet()
    full_home, peer_home = tmp_path / "full", tmp_path / "peer"
    net.link(host_for(full_home, net).peer_id, host_for(peer_home, net).peer_id)
    trainer = FakeTrainer()
    trainer.round_gate = gate = asyncio.Event()
    async with running_node(full_home, net, config(training={"max_rounds": 0}), trainer=trainer) as node:
        gate.set()
        await until(lambda: node.status().round == 1)
        store = node.store
        real_append = store.append

        def no_space(contribution: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store, "append", no_space)
        monkeypatch.setattr(store, "free_bytes", lambda: 0)
        gate.set()  # round 2 is signed, refused by the store, never announced
        await until(lambda: node.status().disk_full)
        status = node.status()
        assert status.round == 1 and status.counters.refused_disk_full == 1
        joiner = config(node={"bootstrap": [host_for(full_home, net).addr]}, training={"enabled": False})
        async with running_node(peer_home, net, joiner) as peer:  # a full node still serves what it has
            await until(lambda: peer.status().contributions == 1)
            gate.set()
            assert trainer.rounds == 2  # training waits for room: no third round
            monkeypatch.setattr(store, "append", real_append)
            monkeypatch.setattr(store, "free_bytes", lambda: 2**40)
            await until(lambda: node.status().round == 2 and not node.status().disk_full, timeout_s=15)
            await until(lambda: peer.status().contributions == 2)


async def test_task_options_are_part_of_the_run(tmp_path: Path) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    async with running_node(founder, net, config(task={"n_layer": 2})) as f:
        assert f.parts.replica.state.genesis.meta["task_options"] == '{"n_layer":2}'
        other = config(node={"bootstrap": [f.host.addr]}, task={"n_layer": 3})
        async with running_node(joiner, net, other) as j:
            await until(lambda: f.host.peer_id in j.status().join.refused)
            assert "[task] options" in j.status().join.refused[f.host.peer_id]


def test_a_relative_plug_in_file_is_found_from_the_home_dir(tmp_path: Path) -> None:
    assert task_path("tasks/mine.py:Mine", tmp_path) == f"{tmp_path}/tasks/mine.py:Mine"
    assert task_path("/abs/mine.py:Mine", tmp_path) == "/abs/mine.py:Mine"
    assert task_path("pkg.mod:factory", tmp_path) == "pkg.mod:factory"
    assert task_path("digits", tmp_path) == "digits"


def test_nat_settings_are_p2p_s_and_a_bad_one_is_a_config_error(tmp_path: Path) -> None:
    config = Config.from_dict({"nat": {"relay_service": "on", "relay_max_reservations": 4}})
    assert host_config(tmp_path, config).nat.relay_max_reservations == 4
    for bad, fragment in (({"relay_service": "yes"}, "nat.relay_service must be one of"),
                          ({"relay_servise": "on"}, "relay_servise")):
        with pytest.raises(ConfigError, match=fragment):
            host_config(tmp_path, Config.from_dict({"nat": bad}))


async def test_a_founder_takes_its_parameters_from_a_checkpoint(tmp_path: Path) -> None:
    weights = np.arange(PARAMS, dtype=np.float32)
    (tmp_path / "model.bin").write_bytes(weights.tobytes())
    founder = config(training={"init_from": str(tmp_path / "model.bin")})
    async with running_node(tmp_path / "a", FakeNet(), founder) as node:
        assert np.array_equal(node.parts.replica.state.genesis.params, weights)
    (tmp_path / "short.bin").write_bytes(weights[:5].tobytes())
    with pytest.raises(ConfigError, match=r"\[training\] init_from: .* not a checkpoint of this task"):
        short = config(training={"init_from": str(tmp_path / "short.bin")})
        async with running_node(tmp_path / "b", FakeNet(), short):
            pass


async def test_with_an_influence_window_a_founder_alone_waits_for_others_and_records_state_their_base(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run founded with ``influence_window`` paces each author by the others' progress (crdt/_window.py):
    the founder alone contributes once and then waits; once a joiner contributes, both go on, and every
    record states the others' contributions it was computed from, growing with each seq."""
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    windowed = config(node={"run": "w", "clip_norm": 0.5, "influence_window": 1})
    caplog.set_level("INFO", logger="daemon.node.rounds")
    async with running_node(founder, net, windowed) as f:
        await until(lambda: "waiting for other authors' contributions" in caplog.text)
        assert f.parts.rounds.rounds_done == 1 and f.status().influence_window == 1
        assert f.status().training is TrainingState.RUNNING
        join = config(node={"run": "w", "bootstrap": [f.host.addr]})
        async with running_node(joiner, net, join) as j:
            await until(lambda: f.status().contributions == 6 and j.status().contributions == 6, timeout_s=30)
            assert j.status().state_hash == f.status().state_hash and j.status().influence_window == 1
    state = f.parts.replica.state
    for node in (f, j):
        author = node.signer.public_key
        bases = [state.get(author, seq).base_count for seq in (1, 2, 3)]  # type: ignore[union-attr]
        assert bases == sorted(set(bases)), bases  # strictly growing: at most one record per other's


async def test_an_open_run_asking_for_work_admits_a_joiner_that_proved_it_once(tmp_path: Path) -> None:
    """``admission_bits`` (crdt/admission.py): the founder and a joiner each find their proof once, every
    record carries it, both converge, and a restart reuses the kept proof."""
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    net.link(host_for(founder, net).peer_id, host_for(joiner, net).peer_id)
    async with running_node(founder, net, config(node={"run": "pow", "admission_bits": 10})) as f:
        join = config(node={"run": "pow", "bootstrap": [f.host.addr]})
        async with running_node(joiner, net, join) as j:
            await until(lambda: f.status().contributions == 6 and j.status().contributions == 6, timeout_s=30)
            assert j.status().admission_bits == 10 and j.status().state_hash == f.status().state_hash
            state = j.parts.replica.state
            for node in (f, j):
                records = [state.get(node.signer.public_key, seq) for seq in (1, 2, 3)]
                assert len({c.admission_nonce for c in records if c is not None}) == 1
                assert all(c is not None and c.admission_nonce > 0 for c in records)
    kept = (joiner / "store" / "admission").read_text().split()
    assert kept[0] == state.genesis.id and int(kept[1]) == records[0].admission_nonce  # type: ignore[union-attr]
