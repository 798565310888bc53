"""Request bounds (p2p/_reqresp.py) against hostile in-test hosts on 127.0.0.1: requests in flight per peer
and in total, request and response sizes, the slowloris read deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError

import p2p
from p2p import Host, HostConfig, Identity, RequestLimits
from p2p._framing import HEADER, FrameKind
from p2p._node import parse_peer_id

pytestmark = pytest.mark.timeout(30)

SLOW = "/meshtrain/test-slow/1"
ECHO = "/meshtrain/test-echo/1"


class Gate:
    """A handler that parks the hostile peer's requests until released, and counts how many run at once."""

    def __init__(self, hostile: set[str]) -> None:
        self.hostile = hostile
        self.release = asyncio.Event()
        self.running = 0
        self.max_running = 0

    async def handler(self, peer_id: str, data: bytes) -> bytes:
        if peer_id not in self.hostile:
            return b"served:" + data
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return b"late"


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def hosts() -> AsyncIterator[Callable[..., Awaitable[Host]]]:
    async with AsyncExitStack() as stack:

        async def make(config: HostConfig | None = None) -> Host:
            return await stack.enter_async_context(Host(Identity.generate(), config=config))

        yield make


async def flood(attacker: Host, victim: Host, n: int) -> list[asyncio.Task[bytes]]:
    return [asyncio.create_task(attacker.request(victim.peer_id, SLOW, b"x", timeout_s=20)) for _ in range(n)]


async def test_one_peer_cannot_exceed_its_in_flight_bound_and_an_honest_peer_is_served(hosts) -> None:  # type: ignore[no-untyped-def]
    server = await hosts(HostConfig(requests=RequestLimits(max_in_flight_per_peer=3, max_in_flight=16)))
    attacker, honest = await hosts(), await hosts()
    for client in (attacker, honest):
        await client.connect(server.listen_addrs()[0])
    gate = Gate({attacker.peer_id})
    server.set_request_handler(SLOW, gate.handler)

    tasks = await flood(attacker, server, 20)
    await wait_for(lambda: sum(t.done() for t in tasks) == 17)  # refused at once, while 3 are parked
    refused = [t for t in tasks if t.done()]
    assert all(isinstance(t.exception(), p2p.Busy) for t in refused)
    assert gate.running == 3 and gate.max_running == 3
    assert await honest.request(server.peer_id, SLOW, b"hi", timeout_s=5) == b"served:hi"
    assert server.stats()["requests_refused_busy"] == 17

    gate.release.set()
    assert [await t for t in tasks if t not in refused] == [b"late"] * 3
    assert await attacker.request(server.peer_id, SLOW, b"again", timeout_s=5) == b"late"  # slots freed
    assert gate.max_running == 3


async def test_the_total_bound_holds_across_peers(hosts) -> None:  # type: ignore[no-untyped-def]
    server = await hosts(HostConfig(requests=RequestLimits(max_in_flight_per_peer=4, max_in_flight=5)))
    a, b, c = await hosts(), await hosts(), await hosts()
    for client in (a, b, c):
        await client.connect(server.listen_addrs()[0])
    gate = Gate({a.peer_id, b.peer_id, c.peer_id})
    server.set_request_handler(SLOW, gate.handler)

    from_a = await flood(a, server, 4)
    await wait_for(lambda: gate.running == 4)
    from_b = await flood(b, server, 4)
    await wait_for(lambda: sum(t.done() for t in from_b) == 3)
    assert gate.running == 5 and gate.max_running == 5
    with pytest.raises(p2p.Busy):
        await c.request(server.peer_id, SLOW, b"x", timeout_s=5)
    gate.release.set()
    done = await asyncio.gather(*from_a, *from_b, return_exceptions=True)
    assert done.count(b"late") == 5 and sum(isinstance(r, p2p.Busy) for r in done) == 3
    assert gate.max_running == 5


async def test_request_size_is_bounded_per_protocol_and_response_size_per_call(hosts) -> None:  # type: ignore[no-untyped-def]
    server = await hosts(HostConfig(requests=RequestLimits(max_request_bytes=4096)))
    client = await hosts()
    await client.connect(server.listen_addrs()[0])

    async def echo(peer_id: str, data: bytes) -> bytes:
        return data

    server.set_request_handler(ECHO, echo)
    server.set_request_handler(SLOW, echo, max_request_bytes=100)
    assert len(await client.request(server.peer_id, ECHO, b"x" * 4096, timeout_s=5)) == 4096
    with pytest.raises(p2p.RemoteError) as info:  # the server's default bound, checked on the header
        await client.request(server.peer_id, ECHO, b"x" * 4097, timeout_s=5)
    assert info.value.error_type == "MessageTooLarge"
    with pytest.raises(p2p.RemoteError) as info:  # this protocol's own, smaller bound
        await client.request(server.peer_id, SLOW, b"x" * 101, timeout_s=5)
    assert info.value.error_type == "MessageTooLarge"
    with pytest.raises(p2p.MessageTooLarge):  # the client refuses a response over its bound
        await client.request(server.peer_id, ECHO, b"x" * 2000, timeout_s=5, max_response_bytes=1999)
    # A refusal on the header comes back at once, even while the client is still pushing 8 MiB at a server
    # that stopped reading (the client reads while it writes).
    with pytest.raises(p2p.RemoteError) as info:
        await client.request(server.peer_id, ECHO, b"x" * (8 * 1024 * 1024), timeout_s=5)
    assert info.value.error_type == "MessageTooLarge"
    assert server.stats()["requests_received"] == 2  # the refused ones never reached a handler
    assert await client.request(server.peer_id, ECHO, b"still fine", timeout_s=5) == b"still fine"


async def test_a_slowloris_request_loses_its_slot_after_the_read_deadline(hosts) -> None:  # type: ignore[no-untyped-def]
    limits = RequestLimits(max_in_flight_per_peer=1, request_read_timeout_s=0.5)
    server, attacker = await hosts(HostConfig(requests=limits)), await hosts()
    await attacker.connect(server.listen_addrs()[0])
    server.set_request_handler(ECHO, Gate(set()).handler)

    async def announce_and_stall() -> None:  # trio thread: a header promising 100 bytes, then nothing
        stream = await attacker._node.host.new_stream(parse_peer_id(server.peer_id), [TProtocol(ECHO)])
        await stream.write(HEADER.pack(FrameKind.REQUEST, 100) + b"only this")
        with trio.move_on_after(10), contextlib.suppress(StreamError):
            await stream.read(1)  # the server resets the stream at its deadline

    stall = asyncio.create_task(attacker._bridge.run(announce_and_stall))
    await wait_for(lambda: server._node.requests.in_flight.count == 1)
    with pytest.raises(p2p.Busy):  # the stalled request holds the peer's only slot...
        await attacker.request(server.peer_id, ECHO, b"x", timeout_s=5)
    await wait_for(lambda: server._node.requests.in_flight.count == 0)  # ...until the deadline
    assert server.stats()["requests_timed_out"] == 1
    assert await attacker.request(server.peer_id, ECHO, b"ok", timeout_s=5) == b"served:ok"
    await stall


def test_limits_are_validated() -> None:
    for bad in (
        {"max_request_bytes": 0},
        {"max_response_bytes": 2**32},
        {"max_in_flight_per_peer": 0},
        {"max_in_flight": 0},
        {"handler_timeout_s": 0},
    ):
        with pytest.raises(ValueError):
            RequestLimits(**bad)  # type: ignore[arg-type]
