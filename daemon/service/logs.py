"""Structured (logfmt) log lines, journald-aware, and an in-memory ring of recent lines for the API.

Every log call in meshtrain already writes ``"what happened key=value key=value"`` with %-style args. The
formatter turns that into one logfmt line::

    ts=2025-06-01T12:00:00.123Z level=info logger=daemon.node msg="model state loaded" genesis=ab12 ...

so ``grep``, ``journalctl -o cat`` and log shippers (Loki, Vector: logfmt parsers) all read it.

Under systemd (``$JOURNAL_STREAM`` names our stderr) the line starts with the syslog priority ``<6>``
instead of a timestamp: journald records its own time and turns the prefix into the entry's priority, so
``journalctl -p warning`` works. Colour is used only when stderr is a terminal; journald, files and pipes
get plain text.

``RingBufferHandler`` keeps the last few thousand formatted lines in memory for ``GET /v1/logs`` and
``meshtrain logs``: the daemon's recent account of itself without access to its stderr or the journal.
Rejected: reading the journal back (needs systemd and permissions) or a log file (the daemon does not
own where its stderr goes).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
import time

__all__ = ["KeyValueFormatter", "RingBufferHandler", "configure_logging"]

RING_CAPACITY = 5000  # lines; ~1 MB at 200 B/line, hours of INFO logging at a few lines per round
NOISY_LOGGERS = ("libp2p", "multiaddr", "async_service", "aioquic")  # chatty at INFO, useless to users
SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}  # sd-daemon(3)
COLOURS = {"DEBUG": "\x1b[2m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m"}
RESET = "\x1b[0m"

_PAIR = re.compile(r'(?:^|\s)[A-Za-z_][\w.]*=(?:"[^"]*"|\S*)')


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\t\n'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class KeyValueFormatter(logging.Formatter):
    """logfmt lines; the leading free text of a message becomes ``msg``, its key=value pairs are kept."""

    def __init__(self, *, journald: bool = False, colour: bool = False) -> None:
        super().__init__()
        self.journald = journald
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        first = _PAIR.search(message)
        text, pairs = (message, "") if first is None else (message[: first.start()], message[first.start() :])
        level = record.levelname.lower()
        if self.colour:
            level = f"{COLOURS.get(record.levelname, '')}{level}{RESET}"
        parts = [] if self.journald else [f"ts={_timestamp(record.created)}"]
        parts += [f"level={level}", f"logger={record.name}"]
        if text.strip():
            parts.append(f"msg={_quote(text.strip())}")
        line = " ".join(parts) + (" " + pairs.strip() if pairs.strip() else "")
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        if self.journald:
            line = f"<{SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class RingBufferHandler(logging.Handler):
    """Keeps the last ``capacity`` formatted lines (plain logfmt with timestamps) in memory."""

    def __init__(self, capacity: int = RING_CAPACITY) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()  # records come from the loop, the trio thread and executor threads
        self.setFormatter(KeyValueFormatter())

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


def configure_logging(level: str = "INFO") -> None:
    """One logfmt line per event on stderr: priority-prefixed under journald, coloured only on a tty."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        KeyValueFormatter(
            journald=_stderr_is_journal(), colour=sys.stderr.isatty() and "NO_COLOR" not in os.environ
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
