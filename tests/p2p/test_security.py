"""Membership (swarm key, allowlist) and per-peer limits of p2p.Host, with real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import p2p
from p2p import Host, HostConfig, Identity, PeerLimits
from p2p._security import MAX_TRACKED_PEERS, PeerGate

pytestmark = pytest.mark.timeout(60)

ECHO = "/meshtrain/test-echo/1"
TOPIC = "meshtrain/test/security"


async def echo(peer_id: str, data: bytes) -> bytes:
    return data


async def poll(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


# ---------------------------------------------------------------------------------------------- key files


def test_swarm_key_roundtrip_and_file_mode(tmp_path: Path) -> None:
    text = p2p.generate_swarm_key()
    key = p2p.parse_swarm_key(text)
    assert len(key) == 32 and key != p2p.parse_swarm_key(p2p.generate_swarm_key())
    path = tmp_path / "swarm.key"
    p2p.write_swarm_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(p2p.load_swarm_key(path)) == 32
    with pytest.raises(FileExistsError):
        p2p.write_swarm_key(path)  # never overwrite a run's secret
    os.chmod(path, 0o644)
    with pytest.raises(p2p.SwarmKeyError, match="readable by other users"):
        p2p.load_swarm_key(path)
    with pytest.raises(p2p.SwarmKeyError, match="cannot read"):
        p2p.load_swarm_key(tmp_path / "missing.key")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "/key/swarm/psk/1.0.0/\n/base64/\n" + "00" * 32,
        "/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32,
        "/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 31,
        "/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 32 + "\nextra",
    ],
)
def test_bad_swarm_keys_are_refused(text: str) -> None:
    with pytest.raises(p2p.SwarmKeyError):
        p2p.parse_swarm_key(text)


# ---------------------------------------------------------------------------------------------- gate unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gate_rate_limit_refills_and_bans() -> None:
    clock = FakeClock()
    limits = PeerLimits(request_rate_per_s=2.0, request_burst=3, ban_after_penalties=4, ban_s=10.0)
    gate = PeerGate(limits=limits, clock=clock)
    assert [gate.admit_request("p") for _ in range(3)] == [None, None, None]
    assert gate.admit_request("p") == "RateLimited"
    clock.now += 0.5  # one token back
    assert gate.admit_request("p") is None
    assert gate.admit_request("other") is None  # buckets are per peer
    for _ in range(3):
        gate.admit_request("p")
    assert gate.is_banned("p") and gate.admit_request("p") == "Banned"
    assert not gate.admit_connection("p")
    clock.now += 10.0
    assert not gate.is_banned("p") and gate.admit_connection("p")
    assert gate.stats()["bans"] == 1 and gate.stats()["refused_requests_rate"] == 4


def test_gate_allowlist_and_bounded_memory() -> None:
    gate = PeerGate(allow_peers=frozenset({"member"}), limits=PeerLimits(gossip_burst=1))
    assert gate.admit_connection("member") and not gate.admit_connection("outsider")
    assert gate.admit_request("outsider") == "NotMember"
    assert gate.refuse_gossip_author("outsider") == "not_member"
    assert gate.refuse_gossip_author("member") is None and gate.admit_gossip_rate("member")
    assert not gate.admit_gossip_rate("member")  # burst of 1 spent
    gate.gossip_admission = {"member"}.__contains__
    assert gate.refuse_gossip_author("member") is None
    gate.gossip_admission = lambda peer: 1 / 0 > 0  # a buggy hook refuses, never raises into libp2p
    assert gate.refuse_gossip_author("member") == "not_admitted"
    counters = gate.stats()
    assert counters["dropped_gossip_not_member"] == 1 and counters["dropped_gossip_not_admitted"] == 1
    assert counters["dropped_gossip_rate"] == 1
    open_gate = PeerGate(limits=PeerLimits(ban_after_penalties=10**6))
    for i in range(3 * MAX_TRACKED_PEERS):  # a peer-id flood
        open_gate.admit_request(f"p{i}")
        open_gate.penalize(f"p{i}")
    assert len(open_gate._requests) <= MAX_TRACKED_PEERS
    assert len(open_gate._penalties) <= MAX_TRACKED_PEERS


# ---------------------------------------------------------------------------------------------- real hosts


def _config(**kwargs: object) -> HostConfig:
    return HostConfig(dial_timeout_s=3.0, **kwargs)  # type: ignore[arg-type]


async def test_swarm_key_admits_members_only() -> None:
    key, other = os.urandom(32), os.urandom(32)
    async with (
        Host(Identity.generate(), config=_config(swarm_key=key)) as a,
        Host(Identity.generate(), config=_config(swarm_key=key)) as member,
        Host(Identity.generate(), config=_config(swarm_key=other)) as wrong_key,
        Host(Identity.generate(), config=_config()) as no_key,
    ):
        a.set_request_handler(ECHO, echo)
        assert await member.connect(a.listen_addrs()[0]) == a.peer_id
        assert await member.request(a.peer_id, ECHO, b"hi", timeout_s=5) == b"hi"
        outsiders = [wrong_key, no_key]
        for outsider in outsiders:  # dialing in
            with pytest.raises(p2p.PeerUnreachable):
                await outsider.connect(a.listen_addrs()[0])
            with pytest.raises(p2p.P2PError):
                await outsider.request(a.peer_id, ECHO, b"x", timeout_s=3)
        for outsider in outsiders:  # and being dialed
            with pytest.raises(p2p.PeerUnreachable):
                await a.connect(outsider.listen_addrs()[0])
        assert a.connected_peers() == [member.peer_id]
        assert a.stats()["requests_received"] == 1


async def test_allowlist_refuses_outsider_requests_and_gossip() -> None:
    member_id, outsider_id = Identity.generate(), Identity.generate()
    allow = frozenset({member_id.peer_id})
    async with (
        Host(Identity.generate(), config=_config(allow_peers=allow)) as a,
        Host(member_id, config=_config()) as member,
        Host(outsider_id, config=_config()) as outsider,
    ):
        a.set_request_handler(ECHO, echo)
        inbox = a.subscribe(TOPIC)
        member.subscribe(TOPIC)
        outsider.subscribe(TOPIC)
        await member.connect(a.listen_addrs()[0])
        await outsider.connect(member.listen_addrs()[0])  # the member forwards the outsider's gossip
        with pytest.raises(p2p.PeerUnreachable, match="not an allowed member"):
            await a.connect(outsider.listen_addrs()[0])
        with pytest.raises(p2p.P2PError):  # refused (RemoteError NotMember) or connection closed
            await outsider.connect(a.listen_addrs()[0])
            await outsider.request(a.peer_id, ECHO, b"x", timeout_s=3)
        assert await poll(lambda: outsider.peer_id not in a.connected_peers())
        assert await poll(lambda: len(member.gossip_peers(TOPIC)) >= 1 and len(a.gossip_peers(TOPIC)) >= 1)
        await outsider.publish(TOPIC, b"from outsider")
        assert await poll(lambda: a.stats()["gate"]["dropped_gossip_not_member"] >= 1)
        await member.publish(TOPIC, b"from member")
        message = await asyncio.wait_for(inbox.get(), 10)
        assert message.data == b"from member" and inbox.empty()
        assert a.stats()["gate"]["refused_connections"] >= 1


async def test_request_flood_is_throttled_then_banned() -> None:
    limits = PeerLimits(request_rate_per_s=1.0, request_burst=5, ban_after_penalties=10)
    async with (
        Host(Identity.generate(), config=_config(peer_limits=limits)) as a,
        Host(Identity.generate()) as b,
    ):
        a.set_request_handler(ECHO, echo)
        await b.connect(a.listen_addrs()[0])
        outcomes: dict[str, int] = {}
        for _ in range(40):
            try:
                await b.request(a.peer_id, ECHO, b"flood", timeout_s=3)
                key = "ok"
            except p2p.RemoteError as exc:
                key = exc.error_type
            except p2p.P2PError as exc:
                key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1
        assert outcomes["ok"] <= 6, outcomes  # the burst (plus at most one refill), never the flood
        assert outcomes.get("RateLimited", 0) >= 5, outcomes
        gate = a.stats()["gate"]
        assert gate["bans"] == 1 and b.peer_id in a.banned_peers()
        assert await poll(lambda: b.peer_id not in a.connected_peers())
        with pytest.raises(p2p.P2PError):
            await b.connect(a.listen_addrs()[0])
            await b.request(a.peer_id, ECHO, b"again", timeout_s=3)


async def test_penalize_from_application_bans() -> None:
    limits = PeerLimits(ban_after_penalties=3)
    async with (
        Host(Identity.generate(), config=_config(peer_limits=limits)) as a,
        Host(Identity.generate()) as b,
    ):
        await b.connect(a.listen_addrs()[0])
        # a registers the connection a moment after b's connect returns: wait for it, or the check
        # below could pass before the (asynchronous) penalties are even processed
        assert await poll(lambda: b.peer_id in a.connected_peers())
        for _ in range(3):
            a.penalize(b.peer_id)
        assert await poll(lambda: b.peer_id in a.banned_peers())
        assert await poll(lambda: b.peer_id not in a.connected_peers())
