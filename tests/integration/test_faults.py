"""Fault tests: real daemon processes, real libp2p on loopback, broken on purpose.

Each test drives a local cluster through the same harness users get (``meshtrain cluster``) and waits on
status with deadlines. What every test checks in the end is the CRDT promise: all nodes hold one state
hash over the same contributions, and nothing any node had accepted is lost.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from daemon.cli.cluster import Cluster, converged

DEADLINE_S = 240.0
FAST = {"inner_steps": 10}  # digits rounds of ~0.1 s: the tests exercise faults, not learning


def _union(vectors: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for vv in vectors:
        for peer, seq in vv.items():
            out[peer] = max(out.get(peer, 0), seq)
    return out


def _dominates(vv: dict[str, int], other: dict[str, int]) -> bool:
    return all(vv.get(peer, 0) >= seq for peer, seq in other.items())


def _all_done(rounds: int, nodes: int):
    def check(statuses: list[dict[str, Any]]) -> bool:
        return converged(statuses, contributions=rounds * nodes)

    return check


def test_four_nodes_converge_and_survive_a_sigkill(cluster_dir: Path) -> None:
    rounds = 10
    group = Cluster(cluster_dir)
    group.up(4, task="digits", training={"max_rounds": rounds}, diloco=FAST)

    # Kill node 1 in the middle of its training.
    group.wait_until(lambda s: s[1].get("round", 0) >= 3, timeout_s=DEADLINE_S, what="node 1 at round 3")
    before = group.status()
    accepted_before = _union([s["version_vector"] for s in before if "error" not in s])
    group.stop(1, sig=signal.SIGKILL)
    survivors = group.wait_until(
        lambda s: "error" in s[1] and all(x.get("contributions", 0) > 0 for i, x in enumerate(s) if i != 1),
        timeout_s=DEADLINE_S,
        what="the others to keep going",
    )
    assert "error" in survivors[1]

    group.start(1)
    statuses = group.wait_until(
        _all_done(rounds, 4), timeout_s=DEADLINE_S, what="all 4 nodes to converge after the restart"
    )
    assert len({s["state_hash"] for s in statuses}) == 1
    for status in statuses:
        assert status["round"] == rounds
        assert _dominates(status["version_vector"], accepted_before), "a contribution was lost"
        assert status["counters"]["rejected"] == 0
    # The restarted node kept its identity and its log: the same slot, no second writer.
    assert statuses[1]["peer_id"] == before[1]["peer_id"]


def test_partition_heals_into_one_state(cluster_dir: Path) -> None:
    group = Cluster(cluster_dir)
    group.up(4, task="digits", training={"max_rounds": 0}, diloco=FAST)
    group.partition([[0, 1], [2, 3]])
    # Records are pushed as they are made, so at the partition each half may hold all of the other's:
    # apart means rounds trained after it.
    cut = {s["index"]: s["round"] for s in group.status()}
    group.wait_until(
        lambda s: all(x["round"] >= cut[x["index"]] + 3 for x in s), timeout_s=DEADLINE_S,
        what="both halves to train apart",
    )
    statuses = group.status()
    for a, b in ((0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (3, 1)):
        seen = statuses[a]["version_vector"].get(statuses[b]["peer_id"], 0)
        assert seen < statuses[b]["round"], f"node {a} saw node {b}'s progress across the partition"
    assert statuses[0]["state_hash"] != statuses[2]["state_hash"]

    for index in range(4):  # stop training so the final state is fixed, then heal
        group.client(index).post("/v1/train/pause")
    paused = group.wait_until(
        lambda s: all(x["training"] == "paused" for x in s), timeout_s=DEADLINE_S, what="training to pause"
    )
    total = sum(s["round"] for s in paused)
    group.heal()
    healed = group.wait_until(
        lambda s: converged(s, contributions=total), timeout_s=DEADLINE_S, what="the halves to converge"
    )
    assert len({s["state_hash"] for s in healed}) == 1


def test_late_joiner_catches_up_from_a_snapshot(cluster_dir: Path) -> None:
    rounds = 8
    group = Cluster(cluster_dir)
    group.create(
        4, task="digits", training={"max_rounds": rounds}, diloco=FAST, sync={"snapshot_every": 4}
    )
    for index in range(3):
        group.start(index)
    # A node compacts up to what the founder's checkpoints attest; the last ones reach an idle node
    # through gossip or, failing that, with a sync answer (a CI run saw one node miss them all).
    group.wait_until(
        lambda s: all(
            x.get("contributions") == 3 * rounds and x["retained_contributions"] < x["contributions"]
            for x in s[:3]
        ),
        timeout_s=DEADLINE_S,
        what="three nodes to finish and compact",
    )

    group.start(3)
    statuses = group.wait_until(
        _all_done(rounds, 4), timeout_s=DEADLINE_S, what="the late joiner to catch up and train"
    )
    late = statuses[3]
    assert late["counters"]["snapshots_installed"] >= 1, "caught up by replaying history, not a snapshot"
    assert late["round"] == rounds


def test_survivor_trains_alone_and_the_others_rejoin(cluster_dir: Path) -> None:
    rounds = 12
    group = Cluster(cluster_dir)
    # Node 3 is throttled to a tenth of the others' speed: it must not hold them back. Training starts
    # once all four are connected: started with the daemons, the fast nodes' ~0.03 s rounds all ran
    # while the last joiner was still starting, so where node 3 stood when they finished measured the
    # spread of start-up times (a joiner seconds late let it reach round 7 of 12), not its throttle.
    group.create(4, task="digits", training={"enabled": False}, diloco=FAST)
    group.set_training_option(3, slowdown=10.0)
    for index in range(4):
        group.start(index)
    group.wait_connected()
    for index in range(4):
        group.client(index).post("/v1/train/start", {"rounds": rounds})
    fast_done = group.wait_until(
        lambda s: all(x["round"] == rounds for x in s[:3]),
        timeout_s=DEADLINE_S,
        what="the three fast nodes to finish",
    )
    assert fast_done[3]["round"] < rounds / 2, f"the throttled node was not slower: {fast_done[3]['round']}"

    for index in (0, 1, 2):
        group.stop(index, sig=signal.SIGKILL)
    group.wait_until(
        lambda s: s[3].get("round") == rounds, timeout_s=DEADLINE_S, what="the survivor to finish alone"
    )
    for index in (0, 1, 2):
        group.start(index)
    statuses = group.wait_until(
        _all_done(rounds, 4), timeout_s=DEADLINE_S, what="the restarted nodes to rejoin and converge"
    )
    assert len({s["state_hash"] for s in statuses}) == 1
