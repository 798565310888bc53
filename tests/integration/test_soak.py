"""Soak: a 4-node cluster trains while random nodes are SIGKILLed and restarted, 100 times by default.

The kill loop does not wait for a victim to come back, nor for the survivors to train several rounds:
as soon as the run has gained one contribution since the last kill, a random node that answers is
killed and restarted at once. Up to all four nodes are down or starting at a time (a restart takes ~10 s
on 2 loaded cores; waiting for two answering nodes gave 80 kills in 420 s), so kills land in every
phase: mid-round, mid-sync, while other nodes replay their logs, right after a start, and on the last
node standing. Then training pauses everywhere and the test waits for one state hash over every contribution
any node ever reported (the union of all version vectors seen: contributions lost must be zero).

Marked slow: ``make test-slow`` (CI runs it too). Kills go on until ``MESHTRAIN_SOAK_KILLS`` (default
100) or until ``MESHTRAIN_SOAK_S`` seconds (default 450) have passed, whichever comes first: the kill rate
follows the machine's speed (a restart is a process start and a torch import), and speed is measured, not
asserted. What is asserted: at least ``MESHTRAIN_SOAK_MIN_KILLS`` (default 30) kills happened, so a run
that could not kill is not a pass, and nothing was lost. On 2026-12-01, 2 shared cores: ``soak: 100 kills
in 414 s, contributions 653, contributions lost 0, hashes agree True`` (7 min 27 s in all); a CI machine
on 2026-12-02 managed 68 kills in 450 s (restarts took 20-25 s there).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.cli.cluster import Cluster, converged

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

KILLS = int(os.environ.get("MESHTRAIN_SOAK_KILLS", "100"))
SOAK_S = float(os.environ.get("MESHTRAIN_SOAK_S", "450"))  # 100 kills took 414 s (2026-12-01)
MIN_KILLS = int(os.environ.get("MESHTRAIN_SOAK_MIN_KILLS", "30"))
NODES = 4
DEADLINE_S = 300.0


def test_soak_random_kills_lose_nothing(cluster_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(20261201)
    group = Cluster(cluster_dir)
    group.up(NODES, task="digits", training={"max_rounds": 0, "eval_every": 1000}, diloco={"inner_steps": 5})
    seen: dict[str, int] = {}  # the union of every version vector any live node reported

    def record(statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for status in statuses:
            for peer, seq in status.get("version_vector", {}).items():
                seen[peer] = max(seen.get(peer, 0), seq)
        return statuses

    def ready_for_a_kill(statuses: list[dict[str, Any]], after: int) -> bool:
        record(statuses)
        return any("error" not in s for s in statuses) and sum(seen.values()) > after

    kills = 0
    started = time.monotonic()
    while kills < KILLS and time.monotonic() - started < SOAK_S:
        contributed = sum(seen.values())
        statuses = group.wait_until(
            lambda s, after=contributed: ready_for_a_kill(s, after),
            timeout_s=DEADLINE_S,
            what="a node up and a new contribution since the last kill",
        )
        victim = rng.choice([s["index"] for s in statuses if "error" not in s])
        group.stop(victim, sig=signal.SIGKILL)
        group.start(victim)
        kills += 1
    kill_s = time.monotonic() - started

    group.wait_until(lambda s: all("error" not in x for x in record(s)), timeout_s=DEADLINE_S, what="all up")
    for index in range(NODES):
        group.client(index).post("/v1/train/pause")
    group.wait_until(
        lambda s: all(x.get("training") == "paused" for x in record(s)), timeout_s=DEADLINE_S, what="paused"
    )
    final = group.wait_until(
        lambda s: converged(record(s)), timeout_s=DEADLINE_S, what="one state hash on every node"
    )
    lost = sum(max(0, seq - final[0]["version_vector"].get(peer, 0)) for peer, seq in seen.items())
    rounds = sum(seen.values())
    with capsys.disabled():  # the kill rate is this test's measurement: shown on a pass too (CI's log)
        print(
            f"\nsoak: {kills} kills in {kill_s:.0f} s, contributions {rounds}, contributions lost {lost}, "
            f"hashes agree {len({s['state_hash'] for s in final}) == 1}"
        )
    assert kills >= min(MIN_KILLS, KILLS), f"only {kills} kills in {kill_s:.0f} s"
    assert lost == 0
    assert all(s["version_vector"] == seen for s in final)
    assert len({s["state_hash"] for s in final}) == 1
