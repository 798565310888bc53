"""Sans-IO framing for request/response over one libp2p stream.

Byte layout (both directions use the same frame format):

    +--------+----------------------+-------------------+
    | kind   | length               | payload           |
    | 1 byte | 4 bytes, big-endian  | `length` bytes    |
    +--------+----------------------+-------------------+

    kind 0x01 REQUEST        client -> server, payload = request bytes
    kind 0x02 RESPONSE       server -> client, payload = response bytes
    kind 0x03 ERROR          server -> client, payload = utf-8 "<ExceptionType>\\n<message>"

One stream carries exactly one REQUEST followed by exactly one RESPONSE or ERROR; then both sides close.
There is no stream reuse, so no request ids are needed: yamux streams are cheap (one frame to open).

Why our own framing rather than libp2p's varint-prefixed helpers or its `request_response` module: we need
an explicit size bound *before* buffering (a peer must not make us allocate 4 GiB by announcing it), a
distinct error frame so a handler failure is not confused with a dropped connection, and a decoder that can be
tested without sockets (h11 style). A u32 length bounds a frame at 4 GiB; the receiver's bound
(``max_message_bytes``: per protocol for requests, per call for responses, see `p2p/_reqresp.py`) is far
smaller and is checked on the header, before any payload is buffered.

`FrameDecoder` is fed arbitrary byte chunks (as the transport delivers them) and yields complete frames. A
frame keeps its payload as the list of pieces the transport delivered (a ``bytes`` piece that lies wholly
inside the frame is kept as is, not copied): `Frame.payload` joins them once, and bulk readers use
`Frame.pieces` directly (hash them one by one, ``pwritev`` them) so a chunk is never joined at all.

Bulk data (genesis files, snapshots) does not travel in one frame: it moves as a blob (`p2p/_blobs.py`),
chunk by chunk, so the frame bounds stay in the tens of MiB.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from p2p._errors import MessageTooLarge, ProtocolViolation

__all__ = [
    "ERROR_MESSAGE_MAX_CHARS",
    "HEADER",
    "MAX_FRAME_BYTES",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "decode_error_payload",
    "encode_error_payload",
    "encode_frame",
]

HEADER = struct.Struct(">BI")  # kind u8, payload length u32
MAX_FRAME_BYTES = 2**32 - 1  # what the u32 length can say; receivers always bound it far lower
ERROR_MESSAGE_MAX_CHARS = 1024  # a remote error message is diagnostics, not data: bound what we ship


class FrameKind(enum.IntEnum):
    REQUEST = 0x01
    RESPONSE = 0x02
    ERROR = 0x03


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    pieces: tuple[bytes, ...]  # the payload, as delivered

    @property
    def payload(self) -> bytes:
        """The payload as one bytes object (joined on every access: read it once)."""
        return self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.pieces)


def encode_header(kind: FrameKind, length: int, *, max_message_bytes: int) -> bytes:
    """The 5-byte header for a frame of ``length`` payload bytes. Raises MessageTooLarge over the bound."""
    if length > max_message_bytes:
        raise MessageTooLarge(f"{kind.name} of {length} bytes exceeds max_message_bytes={max_message_bytes}")
    return HEADER.pack(kind, length)


def encode_frame(kind: FrameKind, payload: bytes, *, max_message_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Header + payload as one bytes object (for small frames; big ones send header and payload apart)."""
    return encode_header(kind, len(payload), max_message_bytes=max_message_bytes) + payload


def encode_error_payload(error_type: str, message: str) -> bytes:
    """The ERROR frame payload: exception class name, newline, truncated message."""
    return f"{error_type}\n{message[:ERROR_MESSAGE_MAX_CHARS]}".encode("utf-8", errors="replace")


def decode_error_payload(payload: bytes) -> tuple[str, str]:
    """Inverse of `encode_error_payload`; tolerant of garbage (it is only diagnostics)."""
    text = payload.decode("utf-8", errors="replace")
    error_type, _, message = text.partition("\n")
    return error_type or "UnknownError", message


class FrameDecoder:
    """Incremental decoder: `feed()` bytes, then `next_frame()` until it returns None.

    Args:
        max_message_bytes: largest payload accepted; a bigger header raises MessageTooLarge immediately.
        expected: the frame kinds this side may receive; any other kind raises ProtocolViolation.
    """

    def __init__(self, *, max_message_bytes: int, expected: frozenset[FrameKind]) -> None:
        self._max = max_message_bytes
        self._expected = expected
        self._header = bytearray()
        self._kind: FrameKind | None = None
        self._length = 0
        self._chunks: list[bytes] = []
        self._have = 0
        self._pending: list[Frame] = []

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the current frame (a read-size hint for the transport)."""
        if self._kind is None:
            return HEADER.size - len(self._header)
        return self._length - self._have

    @property
    def in_frame(self) -> bool:
        """True when a frame has been started but not completed (EOF now would be a truncation)."""
        return bool(self._header) or self._kind is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._kind is None:
                take = HEADER.size - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) < HEADER.size:
                    return
                kind_byte, length = HEADER.unpack(self._header)
                self._header.clear()
                try:
                    kind = FrameKind(kind_byte)
                except ValueError:
                    raise ProtocolViolation(f"unknown frame kind 0x{kind_byte:02x}") from None
                if kind not in self._expected:
                    raise ProtocolViolation(f"unexpected frame kind {kind.name}")
                if length > self._max:
                    raise MessageTooLarge(f"peer announced {length} bytes > max_message_bytes={self._max}")
                self._kind, self._length, self._have = kind, length, 0
            else:
                take = min(len(view), self._length - self._have)
                whole = take == len(data) and type(data) is bytes  # the transport's own bytes: keep them
                self._chunks.append(data if whole else bytes(view[:take]))
                self._have += take
                view = view[take:]
            if self._kind is not None and self._have == self._length:
                self._pending.append(Frame(self._kind, tuple(self._chunks)))
                self._kind, self._chunks, self._have, self._length = None, [], 0, 0

    def next_frame(self) -> Frame | None:
        return self._pending.pop(0) if self._pending else None
