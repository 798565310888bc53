"""A model too big for one request frame joins and late-joins: real daemons, a ~97M-parameter model whose
genesis (387 MB) and snapshot (~310 MB) are both above 256 MiB, moved as blobs (daemon/node/offers.py).

The default task, wide and shallow (one block of width 2816, 8-byte contexts, one sample per step), so
compute stays cheap while the files are big; dense-f32 updates over 8 fragments fill the whole
accumulator in 8 rounds, so the snapshot is as big as a real one (a sparse run's compresses to little).
Only the founder trains; the joiner merges and serves. The late joiner comes once the founder has
compacted, so only a snapshot can bring it up to date; it is killed (SIGKILL) in the middle of that
download and restarted, and must resume from its part file rather than start over.
"""

from __future__ import annotations

import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from daemon.cli.cluster import Cluster, converged
from daemon.home import Home

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MIB = 1 << 20
ROUNDS = 8
WIDE = {"n_layer": 1, "n_embd": 2816, "n_head": 4, "block_size": 8}  # ~97M parameters
DILOCO = {"inner_steps": 2, "batch_size": 1, "codec": "dense-f32", "num_fragments": ROUNDS}
CAP_BYTES_PER_S = 40 * MIB  # each server's, once training is over: the download lasts seconds
DEADLINE_S = 900.0


def _configure(group: Cluster, index: int, **sections: dict[str, Any]) -> None:
    home = Home(Path(group.node(index).home))
    config = tomllib.loads(home.config_file.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    home.config_file.write_text(tomli_w.dumps(config))


def _transfer(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return status.get("join", {}).get(f"{kind}_transfer") or {}


def _fraction(transfer: dict[str, Any]) -> float:
    return transfer.get("bytes_done", 0) / max(transfer.get("bytes_total", 0), 1)


def test_a_model_above_the_frame_cap_joins_and_a_killed_late_joiner_resumes(cluster_dir: Path) -> None:
    group = Cluster(cluster_dir)
    group.create(3, task="stdlib-lm", training={"max_rounds": ROUNDS, "eval_every": 100}, diloco=DILOCO,
                 sync={"snapshot_every": 4, "max_batch": 1, "request_timeout_s": 120.0})
    for index in range(3):
        _configure(group, index, task=WIDE)
    for index in (1, 2):  # they download the genesis, as when the founder used init_from weights
        _configure(group, index, training={"enabled": False}, node={"rebuild_genesis": False})
    group.start(0)
    group.start(1)
    first = group.wait_until(
        lambda s: all(x.get("contributions") == ROUNDS for x in s[:2])
        and min(x["retained_contributions"] for x in s[:2]) < ROUNDS,
        timeout_s=DEADLINE_S, what="the founder to train, the joiner to follow, and one of them to compact",
    )
    genesis = _transfer(first[1], "genesis")
    assert genesis["state"] == "done" and genesis["bytes_total"] > 256 * MIB, genesis

    for index in (0, 1):
        group.client(index).post("/v1/limits", {"bandwidth_bytes_per_s": CAP_BYTES_PER_S})
    group.start(2)
    midway = group.wait_until(
        lambda s: _fraction(_transfer(s[2], "snapshot")) >= 0.2,
        timeout_s=DEADLINE_S, what="the late joiner to be a fifth into the snapshot",
    )
    group.stop(2, sig=signal.SIGKILL)
    before = _transfer(midway[2], "snapshot")
    assert before["bytes_done"] < before["bytes_total"], "the download finished before the kill"
    assert before["bytes_total"] > 256 * MIB, before

    group.start(2)
    statuses = group.wait_until(
        lambda s: converged(s, contributions=ROUNDS), timeout_s=DEADLINE_S, what="all three to converge"
    )
    assert len({s["state_hash"] for s in statuses}) == 1
    late = statuses[2]
    assert late["counters"]["snapshots_installed"] == 1
    after = _transfer(late, "snapshot")
    assert after["state"] == "done" and after["blob"] == before["blob"]
    assert after["bytes_resumed"] >= before["bytes_done"], (before, after)  # not fetched again
    assert late["join"]["genesis_transfer"] is None  # installed before the kill, kept in the store
