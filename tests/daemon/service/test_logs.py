"""daemon.service.logs: logfmt lines, journald priorities, the ring buffer of recent lines."""

from __future__ import annotations

import logging

from daemon.service.logs import KeyValueFormatter, RingBufferHandler


def _record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("daemon.node", level, __file__, 1, msg, args, None)


def test_logfmt_splits_text_from_pairs() -> None:
    line = KeyValueFormatter().format(_record("model state loaded genesis=%s contributions=%d", "ab12", 3))
    assert line.startswith("ts=")
    assert line.endswith(
        'level=info logger=daemon.node msg="model state loaded" genesis=ab12 contributions=3'
    )


def test_logfmt_message_made_only_of_pairs_has_no_msg() -> None:
    line = KeyValueFormatter().format(_record("round=%d train_loss=%.2f", 3, 0.5))
    assert line.endswith("logger=daemon.node round=3 train_loss=0.50")


def test_journald_lines_carry_the_priority_and_no_timestamp_and_no_colour() -> None:
    line = KeyValueFormatter(journald=True).format(_record("peer gone peer=x", level=logging.WARNING))
    assert line == '<4>level=warning logger=daemon.node msg="peer gone" peer=x'
    assert "\x1b" not in line


def test_ring_buffer_keeps_the_last_lines() -> None:
    ring = RingBufferHandler(capacity=3)
    for i in range(5):
        ring.handle(_record("tick i=%d", i))
    assert [line.rsplit(" ", 1)[-1] for line in ring.tail(10)] == ["i=2", "i=3", "i=4"]
    assert len(ring.tail(1)) == 1 and ring.tail(0) == []
