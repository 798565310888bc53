"""This node's per-round history across restarts: ``<home>/history.jsonl``, appended and bounded.

Theory of operation
-------------------
The node keeps the records of its rounds in memory (``node.history()``, one :class:`RoundRecord` per
round, from this start only). :class:`RoundLog` appends what that list gains to a JSON-lines file in the
home dir, each line tagged with the daemon's start time (``session``), and at start-up reads back what
earlier sessions wrote, so the dashboard's loss curve goes on across restarts and shows where they were.

* **When.** :meth:`RoundLog.run` syncs every ``FLUSH_EVERY_S``, and the service syncs once more after
  the node stops (``final``): a crash loses at most that period. The newest record waits until it carries
  its evaluation (the node fills ``val_loss`` in after the round) or the next round begins, so a line,
  once written, is never rewritten.
* **Bounded.** The file is rewritten with its newest ``keep`` lines once it holds ``TRIM_FACTOR`` times
  that (amortized O(1) per round, at most ~6 MB on disk); reading it back keeps the newest ``keep``
  lines in memory. A torn last line (a crash mid-write) or any line that is not a record is skipped, and
  the next write starts on a fresh line.
* **A full disk** makes a sync fail; it is logged once, retried every period, and its recovery logged;
  the node goes on (this is telemetry, not the model state).

Rejected: a hook inside the node's training loop (``daemon/node`` belongs to the node; a callback per
round is the change the node should grow, see the report) and SQLite (a dependency and a schema for an
append-only list the dashboard reads whole).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon.status import RoundRecord, to_json

__all__ = ["HISTORY_FILE", "RoundLog"]

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
HISTORY_KEEP = 10_000  # rounds kept (= daemon.node.rounds.HISTORY_LIMIT in memory); ~300 B a line
TRIM_FACTOR = 2  # rewrite once the file holds this many times HISTORY_KEEP lines
FLUSH_EVERY_S = 5.0  # what a crash may lose; a round takes seconds to minutes


class RoundLog:
    """The rounds of earlier sessions (read at start) and an appender for this session's."""

    def __init__(self, path: Path, *, session: float, keep: int = HISTORY_KEEP) -> None:
        self.path = path
        self.session = session
        """This daemon's start time (unix seconds): tags its lines, tells sessions apart."""
        self.keep = keep
        self.earlier: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        """Records of earlier sessions, oldest first."""
        self._lines = 0  # lines in the file
        self._written = 0  # highest round of this session in the file
        self._failing = False
        self._torn = False  # the file ends inside a line: start the next write on a fresh one
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    self._lines += 1
                    self._torn = not line.endswith("\n")
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("round"), int):
                        self.earlier.append(record)
        except FileNotFoundError:
            pass

    def rounds(self, current: Sequence[RoundRecord]) -> list[dict[str, Any]]:
        """Earlier sessions' records, then this session's ``current`` ones (tagged), at most ``keep``."""
        mine = [self._line(record) for record in current[-self.keep :]]
        room = self.keep - len(mine)
        return (list(self.earlier)[-room:] if room else []) + mine

    def _line(self, record: RoundRecord) -> dict[str, Any]:
        return {"session": self.session, **to_json(record)}

    def sync(self, current: Sequence[RoundRecord], *, final: bool = False) -> int:
        """Append this session's records not written yet; returns how many. The newest waits for its
        evaluation unless ``final``.

        Raises:
            OSError: the file could not be written (nothing counts as written then).
        """
        new = [r for r in current if r.round > self._written]
        if new and not final and new[-1].val_loss is None:
            new.pop()
        if not new:
            return 0
        text = "".join(json.dumps(self._line(r), separators=(",", ":")) + "\n" for r in new)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write("\n" + text if self._torn else text)
        self._torn = False
        self._written = new[-1].round
        self._lines += len(new)
        if self._lines > TRIM_FACTOR * self.keep:
            self._trim()
        return len(new)

    def _trim(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as lines:
            newest = collections.deque(lines, maxlen=self.keep)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(newest), encoding="utf-8")
        os.replace(tmp, self.path)
        self._lines = len(newest)

    async def run(self, history: Callable[[], Sequence[RoundRecord]]) -> None:
        """Sync ``history()`` every ``FLUSH_EVERY_S`` until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            self.sync_logged(history())

    def sync_logged(self, current: Sequence[RoundRecord], *, final: bool = False) -> None:
        """:meth:`sync`, logging the first failure of a streak and the recovery instead of raising."""
        try:
            self.sync(current, final=final)
        except OSError as exc:
            if not self._failing:
                log.warning("round history not written; retrying path=%s error=%s", self.path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("round history written again path=%s", self.path)
        self._failing = False
