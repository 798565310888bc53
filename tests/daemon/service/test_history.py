"""daemon.service.history: this node's rounds survive restarts in history.jsonl, bounded, torn lines and
full disks included."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from daemon.service import history
from daemon.service.history import RoundLog
from daemon.status import RoundRecord


def _round(n: int, *, val_loss: float | None = None) -> RoundRecord:
    return RoundRecord(
        round=n, time_s=float(n), train_loss=1.0 / n, update_norm=0.1, density=0.01, payload_bytes=100,
        contributions=n, bytes_sent=10 * n, bytes_received=10 * n, staleness=0, weight=1.0,
        residual_norm=0.0, round_s=1.0, val_loss=val_loss,
    )  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_newest_round_waits_for_its_evaluation(tmp_path: Path) -> None:
    log = RoundLog(tmp_path / "history.jsonl", session=100.0)
    rounds = [_round(1), _round(2)]
    assert log.sync(rounds) == 1  # round 2 may still get its val_loss
    rounds[1].val_loss = 0.5
    assert log.sync(rounds) == 1 and log.sync(rounds) == 0
    rounds.append(_round(3))
    assert log.sync(rounds, final=True) == 1  # shutting down: write what there is
    assert [(r["round"], r["val_loss"], r["session"]) for r in _lines(log.path)] == [
        (1, None, 100.0),
        (2, 0.5, 100.0),
        (3, None, 100.0),
    ]


def test_a_restarted_daemon_shows_earlier_sessions_first(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    RoundLog(path, session=100.0).sync([_round(1), _round(2)], final=True)
    with open(path, "a") as out:
        out.write('{"round": 3, "sess')  # torn by a crash mid-write
    later = RoundLog(path, session=200.0)
    shown = later.rounds([_round(3), _round(4)])
    assert [(r["round"], r["session"]) for r in shown] == [(1, 100.0), (2, 100.0), (3, 200.0), (4, 200.0)]
    later.sync([_round(3), _round(4)], final=True)
    assert [r["round"] for r in RoundLog(path, session=300.0).rounds([])] == [1, 2, 3, 4]


def test_the_file_and_the_view_stay_bounded(tmp_path: Path) -> None:
    log = RoundLog(tmp_path / "history.jsonl", session=1.0, keep=5)
    rounds = [_round(n) for n in range(1, 12)]
    for n in range(1, 12):
        log.sync(rounds[:n], final=True)
        assert len(log.path.read_text().splitlines()) <= 2 * 5
    assert [r["round"] for r in RoundLog(log.path, session=2.0, keep=5).rounds([])] == [7, 8, 9, 10, 11]
    assert [r["round"] for r in RoundLog(log.path, session=2.0, keep=5).rounds(rounds[:3])] == [
        10,
        11,
        1,
        2,
        3,
    ]
    assert len(log.rounds(rounds)) == 5


def test_a_write_failure_is_logged_once_retried_and_its_recovery_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = RoundLog(tmp_path / "missing" / "history.jsonl", session=1.0)
    caplog.set_level(logging.INFO, logger="daemon.service.history")
    log.sync_logged([_round(1)], final=True)
    log.sync_logged([_round(1)], final=True)
    assert [r.message.split(" path=")[0] for r in caplog.records] == ["round history not written; retrying"]
    (tmp_path / "missing").mkdir()
    log.sync_logged([_round(1)], final=True)
    assert caplog.records[-1].message.startswith("round history written again")
    assert [r["round"] for r in _lines(log.path)] == [1]


async def test_run_appends_what_the_history_gains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "FLUSH_EVERY_S", 0.0)
    log = RoundLog(tmp_path / "history.jsonl", session=1.0)
    rounds = [_round(1, val_loss=0.9)]
    task = asyncio.create_task(log.run(lambda: rounds))
    try:
        async with asyncio.timeout(10):
            while not log.path.exists():
                await asyncio.sleep(0)
        rounds.append(_round(2, val_loss=0.8))
        async with asyncio.timeout(10):
            while len(_lines(log.path)) < 2:
                await asyncio.sleep(0)
    finally:
        task.cancel()
    assert [r["round"] for r in _lines(log.path)] == [1, 2]
