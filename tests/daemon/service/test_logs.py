"""daemon.service.logs: logfmt and JSON lines split on the template, quoting and escaping of every value
(a hostile peer's text included), journald priorities, the node's fields on every line, the ring."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from daemon.service.logs import (
    LogFormatter,
    RingBufferHandler,
    bind_node,
    configure_logging,
    logfmt_value,
    split_record,
)


def _record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("daemon.node", level, __file__, 1, msg, args, None)


def _unquote(value: str) -> str:
    """A logfmt reader's view of one value (the escapes LogFormatter writes)."""
    if not value.startswith('"'):
        return value
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    return re.sub(
        r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)",
        lambda m: simple.get(m[1]) or chr(int(m[1][1:], 16)),
        value[1:-1],
    )


def _pairs(line: str) -> dict[str, str]:
    return {k: _unquote(v) for k, v in re.findall(r'(\w[\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)', line)}


def test_logfmt_splits_text_from_pairs() -> None:
    line = LogFormatter().format(_record("model state loaded genesis=%s contributions=%d", "ab12", 3))
    assert re.match(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line)
    assert line.endswith(
        'level=info logger=daemon.node msg="model state loaded" genesis=ab12 contributions=3'
    )


def test_a_value_is_everything_its_placeholders_format_to() -> None:
    """The old formatter split the formatted text on spaces: shippers kept `error=[Errno` only."""
    formatter = LogFormatter()
    error = ConnectionRefusedError(111, "Connect call failed")
    line = formatter.format(_record("pull failed peer=%s error=%s", "12D3KooA", error))
    assert _pairs(line)["error"] == "[Errno 111] Connect call failed"
    line = formatter.format(_record("ready listen=%s", "/ip4/1.2.3.4/tcp/1 /ip4/5.6.7.8/tcp/1"))
    assert _pairs(line)["listen"] == "/ip4/1.2.3.4/tcp/1 /ip4/5.6.7.8/tcp/1"
    line = formatter.format(_record("rejected input peer=%s reason=%s: %s", "p", "bad_payload", "norm 12.3"))
    assert _pairs(line)["reason"] == "bad_payload: norm 12.3" and _pairs(line)["msg"] == "rejected input"


def test_split_record_keeps_literals_and_numbers_and_refuses_a_mismatch() -> None:
    assert split_record("round=%d train_loss=%.2f x=lit", (3, 0.5)) == (
        "",
        {"round": 3, "train_loss": 0.5, "x": "lit"},
    )
    assert split_record("100% done", ()) == ("100% done", {})  # no args: no % formatting, as logging does
    assert split_record("state=%s", (float("nan"),)) == ("", {"state": "nan"})  # JSON has no NaN
    with pytest.raises(TypeError):
        split_record("a=%s b=%s", (1,))


def test_a_bad_call_still_logs_its_text_and_args() -> None:
    line = LogFormatter().format(_record("bad %s %s", 1))
    assert 'msg="bad %s %s"' in line and "args=(1,)" in line


def test_journald_lines_carry_the_priority_and_no_timestamp_and_no_colour() -> None:
    line = LogFormatter(journald=True, colour=True).format(_record("peer gone peer=x", level=logging.WARNING))
    assert line == '<4>level=warning logger=daemon.node msg="peer gone" peer=x'


def test_colour_only_paints_the_level() -> None:
    line = LogFormatter(colour=True).format(_record("hello peer=%s", "\x1b[2J"))
    assert "level=\x1b[32minfo\x1b[0m" in line and line.count("\x1b") == 2  # the peer's ESC is escaped


HOSTILE = 'x\n<0>ts=2026 level=emerg msg=forged\r\x1b]0;pwned\x07\x1b[2J\x7f\x9b31m\u202eevil\u2028z "q" \\'


@pytest.mark.parametrize("journald", [False, True])
def test_a_peer_cannot_forge_lines_or_send_terminal_escapes(journald: bool) -> None:
    line = LogFormatter(journald=journald).format(_record("pull failed peer=p error=%s", HOSTILE))
    assert "\n" not in line and "\r" not in line and line.isprintable()
    assert line.startswith("<6>level=info" if journald else "ts=")
    fields = _pairs(line)
    assert fields["error"] == HOSTILE and fields["level"] == "info"  # the forged level stays inside
    assert list(fields) == [*([] if journald else ["ts"]), "level", "logger", "msg", "peer", "error"]
    data = json.loads(LogFormatter(fmt="json").format(_record("pull failed error=%s", HOSTILE)))
    assert data["error"] == HOSTILE


@given(st.text())
def test_any_value_round_trips_on_one_printable_line(value: str) -> None:
    rendered = logfmt_value(value)
    assert rendered.isprintable() and _unquote(rendered) == value
    line = LogFormatter(fmt="json").format(_record("m v=%s", value))
    assert line.isascii() and line.isprintable() and json.loads(line)["v"] == value


def test_json_lines_have_typed_fields_and_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("daemon.x", logging.ERROR, __file__, 1, "failed round=%d", (3,), None)
        record.exc_info = sys.exc_info()
    data = json.loads(LogFormatter(fmt="json").format(record))
    assert list(data)[:4] == ["ts", "level", "logger", "msg"]
    assert data["level"] == "error" and data["round"] == 3 and data["msg"] == "failed"
    assert "ValueError: boom" in data["exception"]
    line = LogFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in _pairs(line)["exception"]


def test_json_format_is_a_config_key_and_unknown_formats_are_refused() -> None:
    from daemon.config import Config, ConfigError

    assert Config.from_dict({"log": {"format": "json"}}).log.format == "json"
    with pytest.raises(ConfigError, match=r"log\.format"):
        Config.from_dict({"log": {"format": "xml"}})
    with pytest.raises(ValueError, match="log format"):
        LogFormatter(fmt="xml")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger's handlers and level, restored after a test that calls configure_logging."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        structlog.reset_defaults()


@pytest.mark.usefixtures("root_logging")
def test_every_line_names_the_node_and_run_once_bound(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", fmt="json")
    ring = RingBufferHandler()
    logging.getLogger().addHandler(ring)
    log = logging.getLogger("daemon.node")
    log.info("before")
    bind_node(peer_id="12D3KooWnode", run="main")
    log.info("round=%d", 1)
    structlog.get_logger("daemon.service").info("native event", peers=2)  # structlog's own API
    log.debug("not shown")
    first, second, native = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert "node" not in first
    assert second["node"] == "12D3KooWnode" and second["run"] == "main" and second["round"] == 1
    assert native["msg"] == "native event" and native["peers"] == 2 and native["node"] == "12D3KooWnode"
    assert ring.tail(1)[0].endswith("peers=2 node=12D3KooWnode run=main")  # the ring is logfmt


def test_ring_buffer_keeps_the_last_lines() -> None:
    ring = RingBufferHandler(capacity=3)
    for i in range(5):
        ring.handle(_record("tick i=%d", i))
    assert [line.rsplit(" ", 1)[-1] for line in ring.tail(10)] == ["i=2", "i=3", "i=4"]
    assert len(ring.tail(1)) == 1 and ring.tail(0) == []
