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
frame keeps its payload as the list of pieces the transport delivered, never copied: a ``bytes`` piece that
lies wholly inside the frame is kept as is, one that straddles a frame boundary as a memoryview slice of it.
`Frame.payload` joins them once, and bulk readers use `Frame.pieces` directly (hash them one by one,
``pwritev`` them) so a chunk is never joined at all.

Readers feed whole transport reads, which may run past the end of a frame into the next ones (fewer, bigger
reads: every read costs a yamux window update, a Noise message and a syscall). The decoder parses *one*
frame at a time and keeps the rest unparsed until `next_frame` asks for the next: a read full of tiny
frames costs what its bytes cost, not one `Frame` object per 5 bytes of wire.

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
    "Pieces",
    "decode_error_payload",
    "encode_error_payload",
    "encode_frame",
]

HEADER = struct.Struct(">BI")  # kind u8, payload length u32
MAX_FRAME_BYTES = 2**32 - 1  # what the u32 length can say; receivers always bound it far lower
ERROR_MESSAGE_MAX_CHARS = 1024  # a remote error message is diagnostics, not data: bound what we ship


Pieces = tuple[bytes | memoryview, ...]  # a payload as the transport delivered it


class FrameKind(enum.IntEnum):
    REQUEST = 0x01
    RESPONSE = 0x02
    ERROR = 0x03


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    pieces: Pieces  # the payload, as delivered (see the module docstring)

    @property
    def payload(self) -> bytes:
        """The payload as one bytes object (joined on every access: read it once)."""
        if len(self.pieces) == 1 and type(self.pieces[0]) is bytes:
            return self.pieces[0]
        return b"".join(self.pieces)

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
        self.max_message_bytes = max_message_bytes  # checked on each header; may change between frames
        self._expected = expected
        self._header = bytearray()
        self._kind: FrameKind | None = None
        self._length = 0
        self._chunks: list[bytes | memoryview] = []
        self._have = 0
        self._ready: Frame | None = None  # the one frame parsed and not yet handed out
        self._unparsed: list[bytes | memoryview] = []  # input after `_ready`, parsed by `next_frame`

    @property
    def in_frame(self) -> bool:
        """True when a frame has been started but not completed (EOF now would be a truncation)."""
        return bool(self._header) or self._kind is not None or bool(self._unparsed)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take one transport read. Raises MessageTooLarge / ProtocolViolation on a bad header."""
        if data:
            self._unparsed.append(data if type(data) is bytes else bytes(data))  # kept: must not change
        self._parse()

    def next_frame(self) -> Frame | None:
        self._parse()
        frame, self._ready = self._ready, None
        return frame

    def _parse(self) -> None:
        """Parse unparsed input until one frame is ready (the rest stays unparsed)."""
        while self._ready is None and self._unparsed:
            data = self._unparsed.pop(0)
            rest = self._parse_one(data)
            if rest:
                self._unparsed.insert(0, rest)

    def _parse_one(self, data: bytes | memoryview) -> memoryview:
        """Parse ``data`` up to the end of the current frame; return what lies beyond it."""
        view = memoryview(data)
        while view and self._ready is None:
            if self._kind is None:
                take = HEADER.size - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) < HEADER.size:
                    break
                self._start_frame()
            else:
                take = min(len(view), self._length - self._have)
                whole = take == len(data)  # the transport's own bytes, wholly in this frame: keep them
                self._chunks.append(data if whole else view[:take])
                self._have += take
                view = view[take:]
            if self._kind is not None and self._have == self._length:
                self._ready = Frame(self._kind, tuple(self._chunks))
                self._kind, self._chunks, self._have, self._length = None, [], 0, 0
        return view

    def _start_frame(self) -> None:
        kind_byte, length = HEADER.unpack(self._header)
        self._header.clear()
        try:
            kind = FrameKind(kind_byte)
        except ValueError:
            raise ProtocolViolation(f"unknown frame kind 0x{kind_byte:02x}") from None
        if kind not in self._expected:
            raise ProtocolViolation(f"unexpected frame kind {kind.name}")
        if length > (limit := self.max_message_bytes):
            raise MessageTooLarge(f"peer announced {length} bytes > max_message_bytes={limit}")
        self._kind, self._length, self._have = kind, length, 0
