"""Discovery over the Kademlia DHT: nodes that only know one bootstrap peer find each other."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from p2p import Host, HostConfig, Identity, NatConfig
from p2p._discovery import DiscoveryPace, run_key

pytestmark = pytest.mark.timeout(40)

FAST = HostConfig(discovery_interval_s=0.3, dial_private_addrs=True)  # loopback addresses


A, B, C = "12D3KooWa", "12D3KooWb", "12D3KooWc"


def settle(pace: DiscoveryPace, rounds: int, members: frozenset[str]) -> list[float]:
    return [pace.after_round(known=members, connected=members, dialed=0, failed=False) for _ in range(rounds)]


def test_a_settled_mesh_backs_off_to_the_longest_wait() -> None:
    pace = DiscoveryPace(10.0, 300.0)
    assert pace.after_round(known=frozenset({A, B}), connected=frozenset({A}), dialed=1, failed=False) == 10.0
    waits = settle(pace, 7, frozenset({A, B}))  # B connected: the view changed once, then stays
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]


def test_any_change_of_the_view_snaps_back_to_the_base_interval() -> None:
    ab = frozenset({A, B})
    changes = {
        "a member lost": {"known": ab, "connected": frozenset({A})},
        "a member learned of": {"known": ab | {C}, "connected": ab},
        "a dial": {"known": ab, "connected": ab, "dialed": 1},
        "a failed round": {"known": ab, "connected": ab, "failed": True},
    }
    for what, change in changes.items():
        pace = DiscoveryPace(10.0, 300.0)
        settle(pace, 6, ab)
        assert pace.wait_s == 300.0
        round_ = {"dialed": 0, "failed": False, **change}
        assert pace.after_round(**round_) == 10.0, what  # type: ignore[arg-type]


def test_alone_it_keeps_looking_at_the_base_interval() -> None:
    assert settle(DiscoveryPace(10.0, 300.0), 4, frozenset()) == [10.0] * 4
    with pytest.raises(ValueError):
        DiscoveryPace(10.0, 5.0)


def test_run_key_is_a_stable_multihash() -> None:
    key = run_key("run-1")
    assert key.startswith("1220") and len(key) == 68  # sha2-256 multihash, hex
    assert key == run_key("run-1") != run_key("run-2")


async def test_four_hosts_find_each_other_through_one_bootstrap() -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Host(Identity.generate(), run_id="r1", config=FAST))
        boot = [a.listen_addrs()[0]]
        b, c, d = [
            await stack.enter_async_context(
                Host(Identity.generate(), bootstrap=boot, run_id="r1", config=FAST)
            )
            for _ in range(3)
        ]
        # A stranger in another run, also bootstrapped from A.
        other = await stack.enter_async_context(
            Host(Identity.generate(), bootstrap=boot, run_id="r2", config=FAST)
        )
        everyone = {h.peer_id for h in (a, b, c, d)}
        async with asyncio.timeout(30):
            while not all(everyone - {h.peer_id} <= set(h.connected_peers()) for h in (a, b, c, d)):
                await asyncio.sleep(0.1)
        assert d.peer_id in c.connected_peers() and c.peer_id in d.connected_peers()
        # DHT routing may connect `other` to r1's nodes, but it is never counted as a run member.
        async with asyncio.timeout(10):
            while not all(everyone - {h.peer_id} <= set(h.run_peers()) for h in (b, c, d)):
                await asyncio.sleep(0.1)
        assert all(other.peer_id not in h.run_peers() for h in (a, b, c, d))
        assert set(other.run_peers()) & everyone == set()
        stats = c.stats()
        assert stats["discovery_rounds"] >= 1 and stats["discovery_dials_ok"] >= 1  # others may dial us first
        assert not stats["discovery_failed"]


async def test_bootstrap_retries_until_the_peer_appears() -> None:
    seed_identity = Identity.generate()
    async with Host(seed_identity, config=FAST) as probe:
        port = probe.listen_addrs()[0].split("/")[4]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{seed_identity.peer_id}"
    async with Host(Identity.generate(), bootstrap=[addr], config=FAST) as late:
        async with asyncio.timeout(10):  # bootstrap peer is down: dials fail and are counted, nothing crashes
            while late.stats()["discovery_dials_failed"] < 1:
                await asyncio.sleep(0.05)
        async with Host(seed_identity, listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"], config=FAST) as seed:
            async with asyncio.timeout(10):
                while seed.peer_id not in late.connected_peers():
                    await asyncio.sleep(0.05)


async def test_announced_loopback_addresses_are_not_dialed_by_default() -> None:
    no_nat = NatConfig(autonat=False, relay_service="off", use_relays=False, hole_punch=False)  # no relays
    internet = HostConfig(discovery_interval_s=0.3, nat=no_nat)  # dial_private_addrs=False, the default
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Host(Identity.generate(), run_id="r1", config=internet))
        boot = [a.listen_addrs()[0]]  # an explicit bootstrap address is dialled, loopback or not
        b, c = [
            await stack.enter_async_context(
                Host(Identity.generate(), bootstrap=boot, run_id="r1", config=internet)
            )
            for _ in range(2)
        ]
        async with asyncio.timeout(20):
            while min(h.stats()["discovery_refused_addrs"] for h in (b, c)) < 1:
                await asyncio.sleep(0.05)
        assert a.peer_id in b.connected_peers() and a.peer_id in c.connected_peers()
        for h in (b, c):  # discovery dialled the bootstrap address and nothing else
            assert h.stats()["discovery_dials_ok"] == 1 and h.stats()["discovery_dials_failed"] == 0
