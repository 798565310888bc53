"""p2p/_libp2p.py's yamux window-update workaround, shown against py-libp2p 0.8.1's stock behaviour
(the gossip and NAT workarounds of that module are tested in test_gossip.py and test_nat.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from p2p import Host, Identity, _libp2p
from p2p._node import parse_peer_id

pytestmark = pytest.mark.timeout(60)

ECHO = TProtocol("/meshtrain/test-window/1")
MESSAGES, SIZE = 200, 300  # small request-sized writes: 60 KB, under half the 256 KiB initial window
BULK = 4 * 1024 * 1024


async def _window_updates(writes: Callable[[], list[bytes]]) -> tuple[int, bytes]:
    """Stream ``writes()`` from one host to another, read it back in whatever reads arrive; returns the
    WINDOW_UPDATE frames the reader sent and the digest of what it read."""
    sent: list[int] = []
    stock_send = YamuxStream.send_window_update

    async def counting(self: YamuxStream, increment: int, skip_lock: bool = False) -> None:
        sent.append(increment)
        await stock_send(self, increment, skip_lock)

    got = hashlib.sha256()
    done = trio.Event()

    async def serve(stream) -> None:  # type: ignore[no-untyped-def]  # trio thread: plain libp2p
        try:
            while True:
                got.update(await stream.read(1 << 20))
        except StreamEOF:
            pass
        done.set()

    YamuxStream.send_window_update = counting  # type: ignore[method-assign]
    try:
        async with Host(Identity.generate()) as reader, Host(Identity.generate()) as writer:
            await reader._bridge.run(_set_handler, reader, serve)
            peer = await writer.connect(reader.listen_addrs()[0])
            await writer._bridge.run(_write_all, writer, peer, writes())
            await reader._bridge.run(done.wait)
    finally:
        YamuxStream.send_window_update = stock_send  # type: ignore[method-assign]
    return len(sent), got.digest()


async def _set_handler(host: Host, handler) -> None:  # type: ignore[no-untyped-def]
    host._node.host.set_stream_handler(ECHO, handler)


async def _write_all(host: Host, peer: str, chunks: list[bytes]) -> None:
    stream = await host._node.host.new_stream(parse_peer_id(peer), [ECHO])
    for chunk in chunks:
        await stream.write(chunk)
        await trio.sleep(0)  # let each write go out on its own, as separate requests would
    await stream.close()


def _small() -> list[bytes]:
    return [bytes([i % 251]) * SIZE for i in range(MESSAGES)]


async def test_stock_yamux_updates_the_window_after_every_small_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents the py-libp2p 0.8.1 behaviour (if this fails, libp2p batches and the workaround can go)."""
    monkeypatch.setattr(YamuxStream, "_auto_tune_and_send_window_update", _libp2p._stock_window_update)
    updates, _ = await _window_updates(_small)
    assert updates >= MESSAGES // 4  # about one per read; reads coalesce only what arrived together


async def test_small_reads_are_released_per_32_kib_and_bulk_reads_at_once() -> None:
    updates, digest = await _window_updates(_small)
    assert digest == hashlib.sha256(b"".join(_small())).digest()
    assert updates <= MESSAGES * SIZE // _libp2p.WINDOW_RELEASE_MIN_BYTES  # 1 for 60 KB, not ~140
    bulk = [hashlib.sha256(b"%d" % i).digest() * 2048 for i in range(BULK // 65536)]  # 64 KiB writes
    updates, digest = await _window_updates(lambda: bulk)
    assert digest == hashlib.sha256(b"".join(bulk)).digest()  # no stall, nothing lost
    assert updates >= BULK // (256 * 1024)  # released as read: the sender's window never runs dry
