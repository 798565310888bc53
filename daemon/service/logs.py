"""Structured log lines (logfmt or JSON) through structlog, journald-aware, and a ring of recent lines.

Theory of operation
-------------------
Every log call in meshtrain is a stdlib call with a %-style template, ``"what happened key=%s key=%d"``.
structlog's ``ProcessorFormatter`` sits on the root logger's handlers and turns each record into an event
dict, then into one line. The record is split on its *template*, not on the formatted text: each
``key=`` of the template owns the placeholders up to the next key, so the value is exactly what those
arguments format to, spaces and all (``error=[Errno 111] Connect call failed``, ``listen=/ip4/a /ip4/b``,
``reason=bad_payload: norm 12.3``), and the free text before the first key becomes ``msg``. A value that
is one numeric placeholder stays a number (JSON ``"round": 3``). Native structlog calls
(``structlog.get_logger().info("x", key=value)``) go through the same processors.

Two renderings (``[log] format``):

* ``logfmt`` (default): ``ts=2026-12-01T12:00:00.123Z level=info logger=daemon.node msg="model state
  loaded" genesis=ab12 node=12D3Koo… run=main``. A value is quoted when it is empty or holds a space,
  ``=``, ``"`` or ``\\``; inside quotes ``\\``, ``"`` and every non-printable character (newlines, ESC,
  DEL, C1 controls, bidi overrides) are escaped (``\\n``, ``\\x1b``, ``\\u202e``).
* ``json``: one JSON object per line, ASCII only (``ensure_ascii``), so it escapes the same characters.

Values from remote peers (their error text, their multiaddrs) reach these lines; escaping is what keeps
one peer from starting a forged line (at any journald priority) or sending terminal escapes to an
operator's ``journalctl``. ``tests/daemon/service/test_logs.py`` tries both.

Under systemd (``$JOURNAL_STREAM`` names our stderr) the line starts with the syslog priority ``<4>``
and carries no timestamp: journald records its own time and turns the prefix into the entry's priority,
so ``journalctl -p warning`` works. Colour (of the level only) is used only when stderr is a terminal.

The node's peer id and run are added to every line once the service has built the node
(:func:`bind_node`). They live on the formatters, not in ``contextvars``: records also come from the
libp2p trio thread and executor threads, which do not inherit the asyncio task's context.

``RingBufferHandler`` keeps the last few thousand lines in memory, always logfmt with timestamps, for
``GET /v1/logs``, ``meshtrain logs`` and the dashboard. Rejected: reading the journal back (needs
systemd and permissions) or a log file (the daemon does not own where its stderr goes).

Rejected: splitting the formatted message with a regex (what this was: a value with a space lost all but
its first word in Loki and Vector, and a peer's text could add fields), rewriting the ~80 call sites as
structlog calls (churn; the template already names every field), python-json-logger (JSON only; logfmt
is what people grep).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog
from structlog.stdlib import ProcessorFormatter

from daemon.config import LOG_FORMATS

__all__ = ["LogFormatter", "RingBufferHandler", "bind_node", "configure_logging"]

RING_CAPACITY = 5000  # lines; ~1.5 MB at 300 B/line, hours of INFO logging at a few lines per round
NOISY_LOGGERS = ("libp2p", "multiaddr", "async_service", "aioquic")  # chatty at INFO, useless to users
SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}  # sd-daemon(3)
COLOURS = {"debug": "\x1b[2m", "info": "\x1b[32m", "warning": "\x1b[33m", "error": "\x1b[31m"}
RESET = "\x1b[0m"
LEADING_KEYS = ("ts", "level", "logger", "msg")  # in this order, first on every line
NODE_KEYS = ("node", "run")  # bound by bind_node, last on every line

# ---------------------------------------------------------------------------------------------------
# Splitting a %-style record on its template

_KEY = re.compile(r"(?<!\S)([A-Za-z_][\w.]*)=")
_SPEC = re.compile(  # one printf-style conversion, as str.__mod__ reads it
    r"%(?P<map>\([^)]*\))?[#0 +\-]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?[hlL]?"
    r"(?P<conv>[diouxXeEfFgGcrsa%])"
)
_INT_CONVERSIONS = "diu"
_FLOAT_CONVERSIONS = "eEfFgG"


def _arity(template: str) -> int | None:
    """How many arguments ``template % args`` consumes; None for mapping-style ``%(name)s``."""
    count = 0
    for spec in _SPEC.finditer(template):
        if spec["map"]:
            return None
        if spec["conv"] != "%":
            count += 1 + (spec["width"] == "*") + (spec["prec"] == "*")
    return count


def _typed(template: str, args: tuple[Any, ...], text: str) -> Any:
    """A value that is one numeric placeholder, as a number (finite only); any other value as text."""
    spec = _SPEC.fullmatch(template)
    if spec is None or len(args) != 1 or isinstance(args[0], bool) or not isinstance(args[0], int | float):
        return text
    conv = spec["conv"]
    try:
        if conv in _INT_CONVERSIONS or (conv == "s" and isinstance(args[0], int)):
            return int(text)
        if conv in _FLOAT_CONVERSIONS or conv == "s":
            number = float(text)
            return number if math.isfinite(number) else text
    except ValueError:  # an int subclass with its own __str__ (an IntEnum), say
        pass
    return text


def split_record(template: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """The free text and the key=value pairs of ``template % args``.

    Each ``key=`` of the template owns the text (and the placeholders) up to the next key. Raises
    TypeError or ValueError where ``template % args`` would (the caller falls back to the whole text).
    """
    keys = list(_KEY.finditer(template))
    cuts = [0, *(k.start() for k in keys), len(template)]
    pieces = [template[: cuts[1]]] + [template[k.end() : cuts[i + 2]] for i, k in enumerate(keys)]
    arities = [_arity(piece) for piece in pieces]
    if not args:
        arities = [0] * len(pieces)  # logging applies no % without args: "100%" stays literal
    elif None in arities or sum(a or 0 for a in arities) != len(args):
        raise TypeError("the template's placeholders do not match its arguments")
    values: list[Any] = []
    used = 0
    for piece, arity in zip(pieces, arities, strict=True):
        chunk = args[used : used + (arity or 0)]
        used += arity or 0
        piece = piece.strip()  # the spaces between pairs, not those inside an argument
        values.append(_typed(piece, chunk, piece % chunk) if args else piece)
    return str(values[0]), {k[1]: v for k, v in zip(keys, values[1:], strict=True)}


# ---------------------------------------------------------------------------------------------------
# Processors


class _Fields:
    """The structlog processor that puts each event in the line's shape: ts, level, logger, msg, the
    event's own fields, an exception, then the node's bound fields."""

    def __init__(self) -> None:
        self.bound: dict[str, str] = {}

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        record: logging.LogRecord = event.pop("_record")
        foreign = not event.pop("_from_structlog", False)
        template = event.pop("event", "")
        args = event.pop("positional_args", ()) if foreign else ()
        text, pairs = _split_foreign(str(template), args) if foreign else (str(template), {})
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if text:
            out["msg"] = text
        out.update(pairs)
        out.update((k, v) for k, v in event.items() if k not in ("stack_info", "level"))
        for key, value in self.bound.items():
            out.setdefault(key, value)
        return out


def _split_foreign(template: str, args: tuple[Any, ...] | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A stdlib record's text and pairs; never raises (a bad call still logs, as logging would)."""
    if not isinstance(args, Mapping):
        try:
            return split_record(template, tuple(args))
        except (TypeError, ValueError):
            pass
    try:
        return template % args, {}  # "%(name)s" with a dict: no pairs to find, the text is whole
    except (TypeError, ValueError, KeyError):
        return template, {"args": repr(args)}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


# ---------------------------------------------------------------------------------------------------
# Renderers

_KEY_JUNK = re.compile(r"[^\w.\-]")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def logfmt_value(value: Any) -> str:
    """One logfmt value: bare when it is safe so, else quoted with every risky character escaped."""
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return '"' + "".join(_escape_char(c) for c in text) + '"'


class _Logfmt:
    def __init__(self, *, colour: bool) -> None:
        self.colour = colour

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        parts = []
        for key, value in event.items():
            rendered = logfmt_value(value)
            if key == "level" and self.colour:
                rendered = f"{COLOURS.get(rendered, '')}{rendered}{RESET}"
            parts.append(f"{_KEY_JUNK.sub('_', key) or '_'}={rendered}")
        return " ".join(parts)


def _json(logger: Any, method: str, event: dict[str, Any]) -> str:
    clean = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in event.items()}
    return json.dumps(clean, ensure_ascii=True, default=str)  # ASCII: escapes every control character


class LogFormatter(ProcessorFormatter):
    """One line per record, logfmt or JSON; ``journald`` replaces the timestamp by a syslog priority."""

    def __init__(self, *, fmt: str = "logfmt", journald: bool = False, colour: bool = False) -> None:
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
        self.fields = _Fields()
        self.journald = journald
        renderer = _json if fmt == "json" else _Logfmt(colour=colour and not journald)
        # format_exc_info turns exc_info (a stdlib record's, or exc_info=True) into an "exception" field.
        steps: list[Any] = [structlog.processors.format_exc_info, self.fields, renderer]
        if journald:
            steps.insert(2, _drop_ts)
        super().__init__(processors=steps, use_get_message=False, pass_foreign_args=True)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"<{SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}" if self.journald else line


def _drop_ts(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop("ts", None)
    return event


# ---------------------------------------------------------------------------------------------------
# Handlers and set-up


class RingBufferHandler(logging.Handler):
    """Keeps the last ``capacity`` lines (logfmt with timestamps, whatever stderr gets) in memory."""

    def __init__(self, capacity: int = RING_CAPACITY) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()  # records come from the loop, the trio thread and executor threads
        self.setFormatter(LogFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(line)

    def tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines, oldest first."""
        with self._guard:
            if lines <= 0:
                return []
            return list(self._lines)[-lines:]


def configure_logging(level: str = "INFO", *, fmt: str = "logfmt") -> None:
    """One line per event on stderr (replacing an earlier call's handler): priority-prefixed under
    journald, coloured only on a tty. Native structlog loggers are routed through the same handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        LogFormatter(
            fmt=fmt,
            journald=_stderr_is_journal(),
            colour=sys.stderr.isatty() and "NO_COLOR" not in os.environ,
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def bind_node(*, peer_id: str, run: str) -> None:
    """Add ``node=<peer id> run=<run>`` to every later line of every meshtrain handler on the root
    logger (stderr and the ring)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, LogFormatter):
            handler.formatter.fields.bound.update(zip(NODE_KEYS, (peer_id, run), strict=True))


def _stderr_is_journal() -> bool:
    """systemd sets $JOURNAL_STREAM to "dev:inode" of the journal stream it connected to our stderr."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"
