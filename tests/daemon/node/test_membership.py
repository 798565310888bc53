"""daemon.node.membership: heartbeats make a peer known; a leaving node says goodbye."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from node_testlib import FakeNet, host_for, running_node, until
from node_testlib import node_config as config

import p2p
from daemon.node import membership as membership_module
from daemon.node import wire
from daemon.node.membership import HEARTBEAT_REFRESH_S, HEARTBEAT_S, HEARTBEAT_SETTLE_S, Membership


async def test_a_leaving_node_says_goodbye(tmp_path: Path) -> None:
    net = FakeNet()
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    net.link(host_for(a_home, net).peer_id, host_for(b_home, net).peer_id)
    fast = {"interval_s": 0.05}  # b becomes a member (heartbeats admitted) once the two have synced
    join = config(node={"bootstrap": [host_for(a_home, net).addr]}, training={"enabled": False}, sync=fast)
    async with running_node(a_home, net, config(sync=fast)) as a:
        async with running_node(b_home, net, join) as b:
            b_id = b.host.peer_id
            # b's first heartbeats may come before it synced with a (not yet a member: dropped); it beats
            # again every HEARTBEAT_S while the connection is new (HEARTBEAT_SETTLE_S), so wait that long.
            await until(lambda: b_id in a.status().peer_info, timeout_s=HEARTBEAT_SETTLE_S)
        info = a.status().peer_info[b_id]
        assert info.training == "leaving"


class _Host:
    """What Membership.tick reads from a host, and the heartbeats it publishes."""

    def __init__(self) -> None:
        self.moved = 0
        self.peers = ["a", "b", "c"]
        self.down = False
        self.published: list[wire.Heartbeat] = []

    def stats(self) -> dict[str, int]:
        return {"bytes_sent": self.moved, "bytes_received": 0}

    def connected_peers(self) -> list[str]:
        return self.peers

    async def publish(self, topic: str, data: bytes) -> None:
        if self.down:
            raise p2p.P2PError("no mesh peers")
        self.published.append(wire.Heartbeat.decode(data))


def _member(host: _Host, now: dict[str, object]) -> Membership:

    def beat(throughput: int) -> wire.Heartbeat:
        return wire.Heartbeat(round=now["round"], contributions=0, training=str(now["training"]),
                              reachability="public", task="t", device="cpu", throughput_bps=throughput)

    member = Membership(host, run="r", beat=beat, reject=lambda peer, exc: None)  # type: ignore[arg-type]
    member._sent, member._peers, member._peers_changed = (0, 0.0, None), frozenset(host.peers), -1e9
    return member


async def test_a_heartbeat_goes_out_on_a_change_or_when_due() -> None:
    """Rounds and throughput alone do not send one; a training-state change does at the next check, and
    an unchanged one is refreshed every HEARTBEAT_REFRESH_S."""
    host, now = _Host(), {"round": 0, "training": "running"}
    member = _member(host, now)
    refresh = HEARTBEAT_REFRESH_S
    assert await member.tick(0.0)  # the first one always
    now["round"], host.moved = 7, 5_000
    assert not await member.tick(HEARTBEAT_S)
    assert not await member.tick(refresh - 1)
    now["training"] = "paused"
    assert await member.tick(refresh - 1)
    assert host.published[-1].training == "paused" and host.published[-1].round == 7
    assert host.published[-1].throughput_bps == int(5_000 / (refresh - 1))  # since the last one sent
    assert not await member.tick(2 * refresh - 2)
    assert await member.tick(2 * refresh - 1)  # due: unchanged, refreshed
    assert len(host.published) == 3


async def test_heartbeats_are_frequent_while_peers_change_and_retried_until_one_goes_out() -> None:
    host, now = _Host(), {"round": 0, "training": "running"}
    member = _member(host, now)
    host.down = True
    assert not await member.tick(0.0)  # nobody to tell: not counted as told
    host.down = False
    assert await member.tick(HEARTBEAT_S)
    assert not await member.tick(2 * HEARTBEAT_S)
    host.peers = [*host.peers, "d"]  # a newcomer: every HEARTBEAT_S for HEARTBEAT_SETTLE_S
    t = 3 * HEARTBEAT_S
    sent = [await member.tick(t + i * HEARTBEAT_S) for i in range(12)]
    settled = HEARTBEAT_SETTLE_S // HEARTBEAT_S  # checks within HEARTBEAT_SETTLE_S of the change
    assert all(sent[:settled]) and not any(sent[settled:])


async def test_a_change_of_training_state_is_told_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lockstep waits only for peers whose heartbeat says they train: told at the next check, up to
    HEARTBEAT_S (5 s) later, a start took a round or two to reach the others (rounds of 3-4 s)."""
    monkeypatch.setattr(membership_module, "HEARTBEAT_S", 3600.0)  # only the change can send it now
    host, now = _Host(), {"round": 0, "training": "disabled"}
    member = _member(host, now)
    sender = asyncio.create_task(member._send_periodically())
    try:
        await until(lambda: len(host.published) == 1)  # the first one always
        now["training"] = "running"
        member.state_changed()
        await until(lambda: len(host.published) == 2)
        assert host.published[-1].training == "running"
    finally:
        sender.cancel()
