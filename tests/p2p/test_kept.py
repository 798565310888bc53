"""Kept request streams (p2p/_kept.py, and their server side in p2p/_reqserve.py) between real hosts
on 127.0.0.1: one stream carries request after request; a stream the server ends is replaced without losing
or repeating a request; the server's bounds and idle timeout hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

import p2p
from p2p import Host, HostConfig, Identity, RequestLimits

pytestmark = pytest.mark.timeout(30)

KEPT = "/meshtrain/test-kept/1"
ONCE = "/meshtrain/test-once/1"


class Counting:
    """A handler that answers each request with its number, and fails on b"fail"."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def handler(self, peer_id: str, data: bytes) -> bytes:
        self.seen.append(data)
        if data == b"fail":
            raise ValueError("asked to fail")
        return b"%d" % len(self.seen)


@pytest.fixture
async def pair() -> AsyncIterator[Callable[..., Awaitable[tuple[Host, Host, Counting]]]]:
    async with AsyncExitStack() as stack:

        async def make(limits: RequestLimits | None = None) -> tuple[Host, Host, Counting]:
            config = HostConfig(requests=limits) if limits is not None else None
            server = await stack.enter_async_context(Host(Identity.generate(), config=config))
            client = await stack.enter_async_context(Host(Identity.generate()))
            await client.connect(server.listen_addrs()[0])
            counting = Counting()
            server.set_request_handler(KEPT, counting.handler, keep_streams=True)
            server.set_request_handler(ONCE, counting.handler)
            return server, client, counting

        yield make


async def ask(client: Host, server: Host, protocol: str, data: bytes) -> bytes:
    return await client.request(server.peer_id, protocol, data, timeout_s=5, keep_stream=True)


async def test_one_stream_carries_request_after_request_and_a_handler_error_does_not_end_it(pair) -> None:  # type: ignore[no-untyped-def]
    server, client, _ = await pair()
    assert [await ask(client, server, KEPT, b"x%d" % i) for i in range(5)] == [b"1", b"2", b"3", b"4", b"5"]
    with pytest.raises(p2p.RemoteError, match="asked to fail"):
        await ask(client, server, KEPT, b"fail")
    assert await ask(client, server, KEPT, b"after") == b"7"
    assert client.stats()["kept_streams_opened"] == 1
    assert server.stats()["kept_streams_open"] == 1
    assert server.stats()["requests_received"] == 7
    # Concurrent requests to one peer take turns on the stream, each answered once.
    answers = await asyncio.gather(*(ask(client, server, KEPT, b"c") for _ in range(4)))
    assert sorted(answers) == [b"10", b"11", b"8", b"9"] and client.stats()["kept_streams_opened"] == 1


async def test_a_stream_the_server_ends_is_replaced_and_no_request_is_lost_or_repeated(pair) -> None:  # type: ignore[no-untyped-def]
    # ONCE is not kept by the server (nor would be any stream past its bounds): it answers and closes.
    server, client, counting = await pair()
    assert [await ask(client, server, ONCE, b"%d" % i) for i in range(4)] == [b"1", b"2", b"3", b"4"]
    assert counting.seen == [b"0", b"1", b"2", b"3"]
    assert client.stats()["kept_streams_opened"] == 4 and server.stats()["kept_streams_open"] == 0


async def test_the_servers_bound_of_kept_streams_per_peer_holds(pair) -> None:  # type: ignore[no-untyped-def]
    server, client, counting = await pair(RequestLimits(max_kept_streams_per_peer=0))
    assert [await ask(client, server, KEPT, b"%d" % i) for i in range(3)] == [b"1", b"2", b"3"]
    assert client.stats()["kept_streams_opened"] == 3 and len(counting.seen) == 3


async def test_an_idle_kept_stream_is_closed_by_the_server_and_the_next_request_opens_another(pair) -> None:  # type: ignore[no-untyped-def]
    server, client, counting = await pair(RequestLimits(kept_idle_s=0.2))
    assert await ask(client, server, KEPT, b"a") == b"1"
    async with asyncio.timeout(5):
        while server.stats()["kept_streams_open"]:
            await asyncio.sleep(0.02)
    assert await ask(client, server, KEPT, b"b") == b"2"
    assert counting.seen == [b"a", b"b"] and client.stats()["kept_streams_opened"] == 2


def test_kept_stream_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="max_kept_streams"):
        RequestLimits(max_kept_streams=-1)
    with pytest.raises(ValueError, match="timeouts"):
        RequestLimits(kept_idle_s=0)
