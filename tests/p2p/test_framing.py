"""Sans-IO tests of the request/response framing: no sockets, no threads."""

from __future__ import annotations

import random

import pytest

from p2p import MessageTooLarge, ProtocolViolation
from p2p._framing import (
    HEADER,
    Frame,
    FrameDecoder,
    FrameKind,
    decode_error_payload,
    encode_error_payload,
    encode_frame,
)

RESPONSES = frozenset({FrameKind.RESPONSE, FrameKind.ERROR})


def decode_all(data: bytes, *, chunk: int, max_bytes: int = 1 << 20) -> list[Frame]:
    decoder = FrameDecoder(max_message_bytes=max_bytes, expected=RESPONSES)
    frames = []
    for off in range(0, len(data), chunk):
        decoder.feed(data[off : off + chunk])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert not decoder.in_frame
    return frames


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 1000, 1 << 20])
def test_round_trip_any_chunking(chunk: int) -> None:
    rng = random.Random(1)
    payloads = [b"", b"x", rng.randbytes(10_000), rng.randbytes(3)]
    wire = b"".join(encode_frame(FrameKind.RESPONSE, p) for p in payloads)
    wire += encode_frame(FrameKind.ERROR, encode_error_payload("ValueError", "boom"))
    frames = decode_all(wire, chunk=chunk)
    assert [f.payload for f in frames[:-1]] == payloads
    assert frames[-1].kind is FrameKind.ERROR
    assert decode_error_payload(frames[-1].payload) == ("ValueError", "boom")


def test_oversized_header_rejected_before_payload_is_buffered() -> None:
    decoder = FrameDecoder(max_message_bytes=100, expected=RESPONSES)
    with pytest.raises(MessageTooLarge):
        decoder.feed(HEADER.pack(FrameKind.RESPONSE, 101))  # header alone: no payload was sent


def test_encoder_refuses_oversized_payload() -> None:
    with pytest.raises(MessageTooLarge):
        encode_frame(FrameKind.REQUEST, b"x" * 11, max_message_bytes=10)


def test_unknown_and_unexpected_kinds() -> None:
    with pytest.raises(ProtocolViolation, match="unknown frame kind"):
        FrameDecoder(max_message_bytes=10, expected=RESPONSES).feed(b"\x7f\x00\x00\x00\x00")
    with pytest.raises(ProtocolViolation, match="unexpected frame kind REQUEST"):
        FrameDecoder(max_message_bytes=10, expected=RESPONSES).feed(encode_frame(FrameKind.REQUEST, b""))


def test_bytes_wanted_and_truncation_state() -> None:
    decoder = FrameDecoder(max_message_bytes=100, expected=RESPONSES)
    assert decoder.bytes_wanted == HEADER.size and not decoder.in_frame
    wire = encode_frame(FrameKind.RESPONSE, b"abcdef")
    decoder.feed(wire[:3])
    assert decoder.in_frame and decoder.bytes_wanted == 2
    decoder.feed(wire[3:7])
    assert decoder.bytes_wanted == 4 and decoder.next_frame() is None
    decoder.feed(wire[7:])
    assert decoder.next_frame() == Frame(FrameKind.RESPONSE, (b"ab", b"cdef"))


def test_pieces_are_kept_as_delivered_not_copied() -> None:
    """Bulk readers hash and write a chunk piece by piece; a piece wholly inside a frame is not copied."""
    payload = [b"x" * 1000, b"y" * 3000, b"z" * 96]
    decoder = FrameDecoder(max_message_bytes=1 << 20, expected=RESPONSES)
    decoder.feed(HEADER.pack(FrameKind.RESPONSE, 4096))
    for piece in payload:
        decoder.feed(piece)
    frame = decoder.next_frame()
    assert frame is not None and frame.size == 4096 and frame.payload == b"".join(payload)
    assert all(kept is sent for kept, sent in zip(frame.pieces, payload, strict=True))
    empty = decode_all(encode_frame(FrameKind.RESPONSE, b""), chunk=5)[0]
    assert empty.pieces == () and empty.payload == b"" and empty.size == 0


def test_error_payload_is_truncated_and_tolerant() -> None:
    payload = encode_error_payload("E", "m" * 10_000)
    assert len(payload) < 2000
    assert decode_error_payload(b"\xff\xfe") == ("\ufffd\ufffd", "")
    assert decode_error_payload(b"") == ("UnknownError", "")
