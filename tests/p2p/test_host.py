"""Smoke tests with real libp2p hosts on 127.0.0.1, all in this process (each Host has its own trio thread).

Every test is bounded by a timeout so a stuck trio thread fails the test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import pytest

import p2p
from p2p import GossipMessage, Host, Identity

pytestmark = pytest.mark.timeout(30)

ECHO = "/meshtrain/test-echo/1"


async def echo_reversed(peer_id: str, data: bytes) -> bytes:
    return data[::-1]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Host, Host]]:
    async with Host(Identity.generate()) as a, Host(Identity.generate()) as b:
        b.set_request_handler(ECHO, echo_reversed)
        yield a, b


async def test_connect_and_request(pair: tuple[Host, Host]) -> None:
    a, b = pair
    assert a.listen_addrs()[0].endswith(f"/p2p/{a.peer_id}")
    assert await a.connect(b.listen_addrs()[0]) == b.peer_id
    assert b.peer_id in a.connected_peers()
    assert await a.request(b.peer_id, ECHO, b"hello", timeout_s=5) == b"olleh"
    assert await a.request(b.peer_id, ECHO, b"", timeout_s=5) == b""
    stats = a.stats()
    assert stats["bytes_sent"] == 5 and stats["bytes_received"] == 5 and stats["requests_sent"] == 2
    assert b.stats()["requests_received"] == 2


async def test_16_mb_payload(pair: tuple[Host, Host]) -> None:
    a, b = pair
    b.set_request_handler(ECHO, echo_reversed, max_request_bytes=16 * 1024 * 1024)  # default: 4 MiB
    await a.connect(b.listen_addrs()[0])
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    response = await a.request(b.peer_id, ECHO, payload, timeout_s=20)
    assert response == payload[::-1]
    assert a.stats()["bytes_sent"] == len(payload) == b.stats()["bytes_received"]


async def test_handler_error_is_remote_error(pair: tuple[Host, Host]) -> None:
    a, b = pair

    async def failing(peer_id: str, data: bytes) -> bytes:
        raise KeyError("no such contribution")

    b.set_request_handler("/meshtrain/test-fail/1", failing)
    await a.connect(b.listen_addrs()[0])
    with pytest.raises(p2p.RemoteError) as info:
        await a.request(b.peer_id, "/meshtrain/test-fail/1", b"x", timeout_s=5)
    assert info.value.error_type == "KeyError" and "no such contribution" in info.value.remote_message
    # the host survives a failing handler
    assert await a.request(b.peer_id, ECHO, b"ab", timeout_s=5) == b"ba"


async def test_timeout_and_cancellation_reach_the_handler(pair: tuple[Host, Host]) -> None:
    a, b = pair
    cancelled = asyncio.Event()

    async def slow(peer_id: str, data: bytes) -> bytes:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    b.set_request_handler("/meshtrain/test-slow/1", slow)
    await a.connect(b.listen_addrs()[0])
    t0 = time.monotonic()
    with pytest.raises(p2p.RequestTimeout):
        await a.request(b.peer_id, "/meshtrain/test-slow/1", b"x", timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0
    assert a.stats()["requests_failed"] == 1
    # cancelling the asyncio caller cancels the trio request; the remote stream reset cancels the handler
    task = asyncio.create_task(a.request(b.peer_id, "/meshtrain/test-slow/1", b"x", timeout_s=30))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await a.request(b.peer_id, ECHO, b"ok", timeout_s=5) == b"ko"


async def test_unreachable_and_unsupported(pair: tuple[Host, Host]) -> None:
    a, b = pair
    await a.connect(b.listen_addrs()[0])
    with pytest.raises(p2p.ProtocolNotSupported):
        await a.request(b.peer_id, "/meshtrain/nobody-serves-this/1", b"x", timeout_s=5)
    stranger = Identity.generate().peer_id  # no address known, no connection
    with pytest.raises(p2p.PeerUnreachable):
        await a.request(stranger, ECHO, b"x", timeout_s=5)
    with pytest.raises(p2p.PeerUnreachable):  # a closed port on loopback
        await a.connect(f"/ip4/127.0.0.1/tcp/1/p2p/{stranger}")
    with pytest.raises(ValueError):
        await a.connect("/ip4/127.0.0.1/tcp/1")  # no /p2p/ component
    with pytest.raises(p2p.MessageTooLarge):
        await a.publish("t", b"x" * (a.config.gossip_max_bytes + 1))


async def test_message_size_bound() -> None:
    config = p2p.HostConfig(requests=p2p.RequestLimits(max_request_bytes=1000, max_response_bytes=1000))
    async with Host(Identity.generate(), config=config) as a, Host(Identity.generate(), config=config) as b:
        b.set_request_handler(ECHO, echo_reversed)
        await a.connect(b.listen_addrs()[0])
        with pytest.raises(p2p.RemoteError) as info:  # the server's bound, checked on the header
            await a.request(b.peer_id, ECHO, b"x" * 1001, timeout_s=5)
        assert info.value.error_type == "MessageTooLarge"
        b.set_request_handler(ECHO, echo_reversed, max_request_bytes=2000)
        with pytest.raises(p2p.MessageTooLarge):  # the client's bound on the response
            await a.request(b.peer_id, ECHO, b"x" * 1001, timeout_s=5)
        assert await a.request(b.peer_id, ECHO, b"x" * 1001, timeout_s=5, max_response_bytes=1001)
    with pytest.raises(ValueError):
        b.set_request_handler(ECHO, echo_reversed, max_request_bytes=0)


async def wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_gossip_three_hosts_in_a_line() -> None:
    topic = "meshtrain/test/announce"
    async with Host(Identity.generate()) as a, Host(Identity.generate()) as b, Host(Identity.generate()) as c:
        queues = {h.peer_id: h.subscribe(topic) for h in (a, b, c)}
        await b.connect(a.listen_addrs()[0])
        await c.connect(b.listen_addrs()[0])  # a and c are not connected: b must relay
        await wait_for(lambda: a.peer_id in b.gossip_peers(topic) and c.peer_id in b.gossip_peers(topic))
        await wait_for(lambda: b.peer_id in a.gossip_peers(topic) and b.peer_id in c.gossip_peers(topic))
        # The mesh is grafted on the next heartbeat (1 s); publish until the far end sees the first one.
        got: GossipMessage | None = None
        async with asyncio.timeout(10):
            while got is None:
                await a.publish(topic, b"probe")
                with contextlib.suppress(TimeoutError):
                    got = await asyncio.wait_for(queues[c.peer_id].get(), 0.3)
        assert got == GossipMessage(from_peer=a.peer_id, data=b"probe")
        for i in range(50):
            await a.publish(topic, f"m{i}".encode())
        received: list[bytes] = []
        async with asyncio.timeout(10):
            while b"m49" not in received:
                received.append((await queues[c.peer_id].get()).data)
        assert [m for m in received if m.startswith(b"m")] == [f"m{i}".encode() for i in range(50)]
        assert queues[a.peer_id].empty()  # our own publishes are not delivered back to us
        assert c.stats()["gossip_received"] >= 51 and a.stats()["gossip_published"] >= 51


async def test_lifecycle_threads_and_closed_errors() -> None:
    before = threading.active_count()
    hosts = [Host(Identity.generate()) for _ in range(4)]
    for h in hosts:
        await h.start()
    assert threading.active_count() >= before + 4
    t0 = time.monotonic()
    for h in hosts:
        await h.aclose()
        await h.aclose()  # idempotent
    assert time.monotonic() - t0 < 5.0
    assert threading.active_count() == before
    with pytest.raises(p2p.HostClosed):
        await hosts[0].request(hosts[1].peer_id, ECHO, b"x", timeout_s=1)
    assert hosts[0].connected_peers() == []


async def test_close_fails_in_flight_request() -> None:
    a, b = Host(Identity.generate()), Host(Identity.generate())
    await a.start()
    await b.start()
    try:
        never = asyncio.Event()

        async def hang(peer_id: str, data: bytes) -> bytes:
            await never.wait()
            return b""

        b.set_request_handler("/meshtrain/test-hang/1", hang)
        await a.connect(b.listen_addrs()[0])
        task = asyncio.create_task(a.request(b.peer_id, "/meshtrain/test-hang/1", b"x", timeout_s=30))
        await asyncio.sleep(0.2)
        await a.aclose()
        with pytest.raises((p2p.HostClosed, p2p.PeerUnreachable)):
            await task
    finally:
        await a.aclose()
        await b.aclose()


async def test_port_in_use_is_a_p2p_error() -> None:
    async with Host(Identity.generate()) as a:
        port = a.listen_addrs()[0].split("/")[4]
        clash = Host(Identity.generate(), listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"])
        with pytest.raises(p2p.P2PError):
            await clash.start()
        await clash.aclose()
