"""A real node (fake host and trainer, one event loop) behind a real control socket, for the tests of
the Python client and of the commands that talk to a daemon.

The client and the CLI are synchronous: tests call them in a worker thread (``asyncio.to_thread``) while
the node and its control site run in the test's loop.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from node_testlib import FakeNet, FakeTrainer, running_node, until

from daemon.cli.main import main
from daemon.config import Config
from daemon.node.node import Node
from daemon.service.api import open_control_site

ROUNDS = 2


class SafetensorsTrainer(FakeTrainer):
    """Exports a real safetensors file (one tensor, "weight"), as the training process does."""

    async def export(self, fill: Callable[[np.ndarray], object], size: int, path: Path) -> None:
        from safetensors.numpy import save_file

        params = np.empty(size, np.float32)
        fill(params)
        save_file({"weight": params}, str(path))


@dataclass
class Served:
    node: Node
    socket: Path
    home: Path
    stops: list[str] = field(default_factory=list)
    """One entry per call of the stop hook (``POST /v1/stop``)."""


@pytest.fixture
async def served_node(tmp_path: Path) -> AsyncIterator[Served]:
    """A node that founded its run and trained ``ROUNDS`` rounds, serving its control API; the socket
    lives in a short temporary dir (a Unix socket path has at most 107 bytes)."""
    config = Config.from_dict({
        "node": {"run": "served"},
        "training": {"max_rounds": ROUNDS, "eval_every": 1},
        "task": {"hidden": 8},
    })
    home = tmp_path / "node"
    async with running_node(home, FakeNet(), config, trainer=SafetensorsTrainer()) as node:
        await until(lambda: node.status().round == ROUNDS)
        with tempfile.TemporaryDirectory(prefix="mt-", dir="/tmp") as short:
            served = Served(node=node, socket=Path(short) / "control.sock", home=home)
            runner = await open_control_site(node, served.socket, on_stop=lambda: served.stops.append("stop"))
            try:
                yield served
            finally:
                await runner.cleanup()


async def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """``meshtrain ARGS`` in a worker thread (the node it talks to runs in this loop)."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=env)
