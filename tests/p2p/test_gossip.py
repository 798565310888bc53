"""Gossip with validators and peer scoring through real libp2p hosts on 127.0.0.1 (p2p/_gossip.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from p2p import GossipMessage, Host, Identity

pytestmark = pytest.mark.timeout(90)

TOPIC = "meshtrain/test/announce"


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def hosts(n: int) -> AsyncIterator[list[Host]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Host(Identity.generate())) for _ in range(n)]


async def mesh_ready(publisher: Host, queues: dict[str, asyncio.Queue[GossipMessage]]) -> None:
    """Publish probes until every queue has one (the mesh is grafted on a 1 s heartbeat), then drain."""
    async with asyncio.timeout(15):
        while not all(q.qsize() for q in queues.values()):
            await publisher.publish(TOPIC, b"ann:probe")
            await asyncio.sleep(0.2)
    for q in queues.values():
        while not q.empty():
            q.get_nowait()


def announcement_schema(from_peer: str, data: bytes) -> bool:
    """What the daemon's validator does, in miniature: a prefix and a size bound."""
    return data.startswith(b"ann:") and len(data) <= 256


async def test_burst_from_three_publishers_reaches_every_subscriber() -> None:
    async with hosts(4) as hs:
        for h in hs:
            h.set_topic_validator(TOPIC, announcement_schema)
        queues = {h.peer_id: h.subscribe(TOPIC) for h in hs}
        for a, b in itertools.combinations(hs, 2):
            await a.connect(b.listen_addrs()[0])
        await wait_for(lambda: all(len(h.gossip_peers(TOPIC)) == 3 for h in hs))
        for p in hs[:3]:
            await mesh_ready(p, {k: q for k, q in queues.items() if k != p.peer_id})

        rate_per_s, seconds = 20, 3  # the daemon announces far less; 3 x 20/s is a generous burst

        async def publish(h: Host) -> None:
            for i in range(rate_per_s * seconds):
                await h.publish(TOPIC, f"ann:{h.peer_id[-6:]}:{i}".encode())
                await asyncio.sleep(1 / rate_per_s)

        await asyncio.gather(*(publish(h) for h in hs[:3]))
        expected = {f"ann:{h.peer_id[-6:]}:{i}".encode() for h in hs[:3] for i in range(rate_per_s * seconds)}
        for h in hs:
            want = {m for m in expected if not m.startswith(f"ann:{h.peer_id[-6:]}:".encode())}
            got: set[bytes] = set()
            async with asyncio.timeout(30):
                while not want <= got:
                    got.add((await queues[h.peer_id].get()).data)
            assert got == want  # every message, nothing else (no duplicates would show as extra items)
            stats = h.stats()
            assert stats["gossip_dropped_queue_full"] == 0 and stats["gossip_rejected_invalid"] == 0


async def test_invalid_message_is_not_forwarded() -> None:
    async with hosts(3) as (a, b, c):
        for h in (b, c):  # a (the offender) validates nothing: it publishes whatever it likes
            h.set_topic_validator(TOPIC, announcement_schema)
        queues = {h.peer_id: h.subscribe(TOPIC) for h in (a, b, c)}
        await b.connect(a.listen_addrs()[0])
        await c.connect(b.listen_addrs()[0])  # a and c are not connected: only b can forward
        await wait_for(lambda: {a.peer_id, c.peer_id} <= set(b.gossip_peers(TOPIC)))
        await mesh_ready(a, {b.peer_id: queues[b.peer_id], c.peer_id: queues[c.peer_id]})
        await a.publish(TOPIC, b"evil: not an announcement")
        await wait_for(lambda: b.stats()["gossip_rejected_invalid"] == 1)
        await a.publish(TOPIC, b"ann:after")  # a is penalised (P4) but still above the publish threshold
        seen: list[bytes] = []
        async with asyncio.timeout(15):
            while b"ann:after" not in seen:
                seen.append((await queues[c.peer_id].get()).data)
        assert all(m.startswith(b"ann:") for m in seen)
        assert c.stats()["gossip_rejected_invalid"] == 0  # it never even reached c
        assert all(m.data.startswith(b"ann:") for m in _drain(queues[b.peer_id]))


def _drain(q: asyncio.Queue[GossipMessage]) -> list[GossipMessage]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def _pair(a: Host, b: Host) -> tuple[asyncio.Queue[GossipMessage], asyncio.Queue[GossipMessage]]:
    qa, qb = a.subscribe(TOPIC), b.subscribe(TOPIC)
    await b.connect(a.listen_addrs()[0])
    await wait_for(lambda: a.peer_id in b.gossip_peers(TOPIC) and b.peer_id in a.gossip_peers(TOPIC))
    await mesh_ready(a, {b.peer_id: qb})
    return qa, qb


async def test_validator_exception_rejects() -> None:
    async with hosts(2) as (a, b):
        _, qb = await _pair(a, b)

        def buggy(from_peer: str, data: bytes) -> bool:
            if data == b"ann:boom":
                raise RuntimeError("daemon validator bug")
            return True

        b.set_topic_validator(TOPIC, buggy)
        await a.publish(TOPIC, b"ann:boom")
        await wait_for(lambda: b.stats()["gossip_validator_errors"] == 1)
        await a.publish(TOPIC, b"ann:fine")
        assert (await asyncio.wait_for(qb.get(), 10)).data == b"ann:fine"  # b survived
        assert b.stats()["gossip_rejected_invalid"] == 1


async def test_libp2p_raising_validator_kills_the_host() -> None:
    """Documents the py-libp2p 0.8.1 bug p2p/_gossip.py works around (if this fails, libp2p fixed it)."""
    async with hosts(2) as (a, b):
        await _pair(a, b)

        def boom(forwarder: object, msg: object) -> bool:
            raise RuntimeError("raw libp2p validator")

        pubsub = b._node._pubsub
        assert pubsub is not None and pubsub.strict_signing  # and strict signing is on
        b._bridge.call_soon_in_trio(pubsub.set_topic_validator, TOPIC, boom, False)
        await wait_for(lambda: TOPIC in pubsub.topic_validators)
        await a.publish(TOPIC, b"ann:x")
        await wait_for(lambda: not b._bridge.is_open, timeout_s=10)  # b's whole libp2p stack went down
