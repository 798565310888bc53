"""daemon.node.membership: heartbeats make a peer known; a leaving node says goodbye."""

from __future__ import annotations

from pathlib import Path

from node_testlib import FakeNet, host_for, running_node, until
from node_testlib import node_config as config


async def test_a_leaving_node_says_goodbye(tmp_path: Path) -> None:
    net = FakeNet()
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    net.link(host_for(a_home, net).peer_id, host_for(b_home, net).peer_id)
    join = config(node={"bootstrap": [host_for(a_home, net).addr]}, training={"enabled": False})
    async with running_node(a_home, net, config()) as a:
        async with running_node(b_home, net, join) as b:
            b_id = b.host.peer_id
            await until(lambda: b_id in a.status().peer_info)  # a heartbeat made b a known member
        info = a.status().peer_info[b_id]
        assert info.training == "leaving"
