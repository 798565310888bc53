"""daemon.node.rounds: the training loop's states: pause, resume, start more rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node_testlib import FakeNet, FakeTrainer, running_node, until
from node_testlib import node_config as config

from daemon.status import TrainingState


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
