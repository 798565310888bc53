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


def test_truncation_state() -> None:
    decoder = FrameDecoder(max_message_bytes=100, expected=RESPONSES)
    assert not decoder.in_frame
    wire = encode_frame(FrameKind.RESPONSE, b"abcdef")
    decoder.feed(wire[:3])
    assert decoder.in_frame and decoder.next_frame() is None
    decoder.feed(wire[3:7])
    assert decoder.in_frame and decoder.next_frame() is None
    decoder.feed(wire[7:])
    assert decoder.next_frame() == Frame(FrameKind.RESPONSE, (b"ab", b"cdef"))
    assert not decoder.in_frame


def test_a_read_past_the_frame_is_parsed_one_frame_at_a_time() -> None:
    """Readers feed whole reads that run into the next frames; a read of 10,000 tiny frames must not turn
    into 10,000 Frame objects at once, and the bytes past a frame are kept for the next one."""
    wire = b"".join(encode_frame(FrameKind.RESPONSE, i.to_bytes(2, "big")) for i in range(10_000))
    decoder = FrameDecoder(max_message_bytes=10, expected=RESPONSES)
    decoder.feed(wire)
    assert decoder._ready is not None and len(decoder._unparsed) == 1  # one frame parsed, the rest raw
    got = []
    while (frame := decoder.next_frame()) is not None:
        got.append(int.from_bytes(frame.payload, "big"))
    assert got == list(range(10_000)) and not decoder.in_frame


def test_a_bound_raised_between_frames_applies_to_the_next() -> None:
    """The blob fetcher reads a small manifest frame, then raises the bound to its chunk size on the same
    decoder, which may already hold the start of the first chunk."""
    decoder = FrameDecoder(max_message_bytes=4, expected=RESPONSES)
    decoder.feed(encode_frame(FrameKind.RESPONSE, b"mani") + encode_frame(FrameKind.RESPONSE, b"x" * 50))
    assert decoder.next_frame() == Frame(FrameKind.RESPONSE, (b"mani",))
    decoder.max_message_bytes = 64
    frame = decoder.next_frame()
    assert frame is not None and frame.payload == b"x" * 50


def test_pieces_are_kept_as_delivered_not_copied() -> None:
    """Bulk readers hash and write a chunk piece by piece; a piece wholly inside a frame is not copied, one
    straddling its end is a view of the transport's bytes."""
    payload = [b"x" * 1000, b"y" * 3000, b"z" * 96]
    decoder = FrameDecoder(max_message_bytes=1 << 20, expected=RESPONSES)
    decoder.feed(HEADER.pack(FrameKind.RESPONSE, 4096))
    for piece in payload:
        decoder.feed(piece)
    frame = decoder.next_frame()
    assert frame is not None and frame.size == 4096 and frame.payload == b"".join(payload)
    assert all(kept is sent for kept, sent in zip(frame.pieces, payload, strict=True))
    decoder.feed(HEADER.pack(FrameKind.RESPONSE, 3) + b"abcdef")  # a frame and the first bytes of another
    frame = decoder.next_frame()
    assert frame is not None and isinstance(frame.pieces[0], memoryview) and frame.payload == b"abc"
    assert type(frame.payload) is bytes
    empty = decode_all(encode_frame(FrameKind.RESPONSE, b""), chunk=5)[0]
    assert empty.pieces == () and empty.payload == b"" and empty.size == 0


def test_error_payload_is_truncated_and_tolerant() -> None:
    payload = encode_error_payload("E", "m" * 10_000)
    assert len(payload) < 2000
    assert decode_error_payload(b"\xff\xfe") == ("\ufffd\ufffd", "")
    assert decode_error_payload(b"") == ("UnknownError", "")
