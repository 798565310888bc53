"""Workarounds for py-libp2p 0.8.1's bulk-transfer hot spots (installed when `p2p._node` is imported).

Measured on 2026-12-01 (bench/bench_p2p.py's "bare py-libp2p stream" row: two processes, one stream,
64 MiB in 1 MiB writes, TCP + Noise + Yamux on loopback, 2 shared cores): stock 0.8.1 moved 130-160 MB/s,
with these workarounds 620-1000 MB/s. A cProfile of the stock receiver showed the time going to per-message
work rather than to bytes: for every 64 KiB of payload, two Noise messages, each costing two ``recv``
syscalls and a trio checkpoint each. The three hot spots, and what we do about each:

1. **One recv syscall per read call.** ``TrioTCPStream.read(n)`` is one ``receive_some(n)``, and the Noise
   reader asks for 2 bytes (the length prefix), then the message body: two syscalls and two trio
   scheduling rounds per 64 KiB message. We read up to `READ_BUFFER_BYTES` at once and serve later reads
   from that buffer (a memoryview and an offset: each byte is copied out once).
2. **Yamux frames of 64 KiB.** Yamux cuts every write into frames of at most ``MAX_MESSAGE_SIZE`` (64 KiB)
   and each frame takes the connection's write lock, one Noise encryption call chain and one socket write.
   We allow frames of up to `YAMUX_FRAME_BYTES` (1 MiB). Sound: a frame never exceeds the peer's receive
   window (yamux sends at most its send window, which starts at the spec's 256 KiB), and that is the only
   bound the yamux spec, go-yamux, js-yamux and py-libp2p itself (16 MiB) enforce on received frames.
   Stock peers interoperate (tests/p2p/test_speedups.py runs one in a subprocess).
3. **One socket write per Noise message, and yamux's 64 KiB frames split in two Noise messages** (a Noise
   message carries at most 65519 bytes of plaintext; 65536 + 12 does not fit, so every frame went out as
   65519 + 17 bytes). We encrypt a whole yamux frame's Noise messages and hand them to the socket in one
   write. Each message is still a separate, standard Noise transport message: only the syscalls change.

And one correctness bug that bigger frames make likelier: **a cancelled stream write can cut a yamux frame
in half.** ``Yamux._write_frame`` awaits the socket inside the caller's cancel scope; a request that times out
or a session that is torn down while the socket is full leaves a partial frame on the wire, and every later
frame of the connection is parsed from the wrong offset (the peer drops the whole connection, every stream
on it). We write each frame shielded from cancellation, bounded by `FRAME_WRITE_TIMEOUT_S`; a frame that
cannot be written in that time closes the connection rather than desynchronizing it. The stock version
also formatted a debug log line for every frame; ours does not.

Each patch replaces one function or one module constant, keeps its signature, and is checked by a test that
shows the stock behaviour first. ``MESHTRAIN_P2P_SPEEDUPS=0`` leaves py-libp2p untouched (an escape hatch
for a future libp2p, and how the tests and the bench measure stock behaviour). Revisit on every upgrade.

Rejected alternatives: vendoring or forking libp2p's yamux/noise (house rule); a bigger Noise message
(the 2-byte length prefix is the spec); QUIC (4-5 MB/s and silent truncation in 0.8.1, see the notes).
"""

from __future__ import annotations

import logging
import os

import libp2p.io.trio as _lp_trio
import libp2p.security.noise.io as _lp_noise_io
import libp2p.stream_muxer.yamux.yamux as _lp_yamux
import trio
from libp2p.io.exceptions import ConnectionClosedError

__all__ = [
    "FRAME_WRITE_TIMEOUT_S",
    "READ_BUFFER_BYTES",
    "YAMUX_FRAME_BYTES",
    "enabled",
    "install",
    "uninstall",
]

log = logging.getLogger(__name__)

READ_BUFFER_BYTES = 256 * 1024  # one recv per 256 KiB; 1 MiB measured no faster (2026-12-01)
# Yamux counts its 12-byte header in MAX_MESSAGE_SIZE: 1 MiB of payload per frame, so a 1 MiB write is one
# frame; 4 MiB measured no faster (2026-12-01), and the send window bounds a frame anyway.
YAMUX_FRAME_BYTES = 1024 * 1024 + _lp_yamux.HEADER_SIZE
FRAME_WRITE_TIMEOUT_S = 30.0  # 1 MiB not drained in 30 s (35 KB/s): the connection is dead, close it
ENV_SWITCH = "MESHTRAIN_P2P_SPEEDUPS"

_STOCK_YAMUX_FRAME_BYTES = _lp_yamux.MAX_MESSAGE_SIZE
_stock_noise_write = _lp_noise_io.NoiseTransportReadWriter.write_msg
_stock_tcp_read = _lp_trio.TrioTCPStream.read
_stock_write_frame = _lp_yamux.Yamux._write_frame


def enabled() -> bool:
    """Whether the workarounds are active in this process."""
    return _lp_trio.TrioTCPStream.read is _buffered_read


# ---------------------------------------------------------------------------------------------- 1. reads


async def _buffered_read(self: _lp_trio.TrioTCPStream, n: int | None = None) -> bytes:
    """`TrioTCPStream.read`, served from a per-connection buffer refilled `READ_BUFFER_BYTES` at a time."""
    async with self.read_lock:
        if n == 0:
            return b""
        view: memoryview | None = getattr(self, "_meshtrain_buffer", None)
        if not view:
            try:
                data = await self.stream.receive_some(max(n or 0, READ_BUFFER_BYTES))
            except trio.BrokenResourceError as error:  # as stock: the peer reset the connection
                raise ConnectionClosedError(
                    f"TCP connection reset by remote peer: {error}", transport="tcp"
                ) from error
            except trio.ClosedResourceError:  # as stock: we closed it; EOF for the layers above
                return b""
            if n is None or len(data) <= n:
                return data
            view = memoryview(data)
        take = len(view) if n is None else min(n, len(view))
        out = bytes(view[:take])
        self._meshtrain_buffer = view[take:]  # type: ignore[attr-defined]
        return out


# ---------------------------------------------------------------------------------------------- 2+3. writes


async def _batched_noise_write(
    self: _lp_noise_io.NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False
) -> None:
    """`NoiseTransportReadWriter.write_msg`: the same Noise messages, handed to the socket in one write."""
    if prefix_encoded:  # handshake-only feature; never used in the transport phase
        await _stock_noise_write(self, msg, prefix_encoded)
        return
    limit = _lp_noise_io.MAX_PLAINTEXT_LENGTH
    parts: list[bytes] = []
    for offset in range(0, max(len(msg), 1), limit):
        encrypted = self.encrypt(msg[offset : offset + limit])
        parts.append(len(encrypted).to_bytes(_lp_noise_io.SIZE_NOISE_MESSAGE_LEN, "big"))
        parts.append(encrypted)
    await self.read_writer.read_write_closer.write(b"".join(parts))


async def _whole_frame_write(self: _lp_yamux.Yamux, data: bytes) -> None:
    """`Yamux._write_frame`: a frame goes out whole or the connection is closed, never cut in half."""
    async with self._write_lock:  # waiting for the lock may be cancelled: nothing was written yet
        with trio.CancelScope(shield=True):
            with trio.move_on_after(FRAME_WRITE_TIMEOUT_S) as deadline:
                await self.secured_conn.write(data)
            if deadline.cancelled_caught:
                with trio.move_on_after(1.0):
                    await self.secured_conn.close()
                raise ConnectionClosedError(
                    "yamux frame not written in time: connection closed", transport="tcp"
                )
    await trio.lowlevel.checkpoint()


# ---------------------------------------------------------------------------------------------- switch


def install() -> None:
    """Apply the workarounds (idempotent). Skipped when ``MESHTRAIN_P2P_SPEEDUPS=0``."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("py-libp2p throughput workarounds disabled by %s=0", ENV_SWITCH)
        return
    _lp_trio.TrioTCPStream.read = _buffered_read  # type: ignore[method-assign]
    _lp_noise_io.NoiseTransportReadWriter.write_msg = _batched_noise_write  # type: ignore[method-assign]
    _lp_yamux.Yamux._write_frame = _whole_frame_write  # type: ignore[method-assign]
    _lp_yamux.MAX_MESSAGE_SIZE = YAMUX_FRAME_BYTES


def uninstall() -> None:
    """Restore stock py-libp2p (tests use it to show the stock behaviour)."""
    _lp_trio.TrioTCPStream.read = _stock_tcp_read  # type: ignore[method-assign]
    _lp_noise_io.NoiseTransportReadWriter.write_msg = _stock_noise_write  # type: ignore[method-assign]
    _lp_yamux.Yamux._write_frame = _stock_write_frame  # type: ignore[method-assign]
    _lp_yamux.MAX_MESSAGE_SIZE = _STOCK_YAMUX_FRAME_BYTES


install()
