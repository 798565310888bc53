"""The daemon tests share in-memory fakes of the host and the training process (node/node_testlib.py),
and a real node's status for the tests of what reads it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "node"))

from node_testlib import FakeNet, host_for, running_node, until

from daemon.config import Config
from daemon.status import Status


@pytest.fixture
async def node_status(tmp_path: Path) -> AsyncIterator[Status]:
    """The status of a real node (fake host and trainer) that trained 2 rounds with one peer, which
    trained 2 rounds too and merged everything."""
    net = FakeNet()
    config = Config.from_dict({"training": {"max_rounds": 2, "eval_every": 1}, "sync": {"interval_s": 0.05}})
    founder = host_for(tmp_path / "a", net)
    joiner = config.with_overrides("node", bootstrap=(founder.addr,))
    net.link(founder.peer_id, host_for(tmp_path / "b", net).peer_id)
    async with running_node(tmp_path / "a", net, config) as a, running_node(tmp_path / "b", net, joiner) as b:
        await until(lambda: a.status().contributions == 4 and b.status().contributions == 4)
        await until(lambda: a.status().eval.contributions == 4 and b.host.peer_id in a.status().peer_info)
        yield a.status()
