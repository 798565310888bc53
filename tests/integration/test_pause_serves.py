"""A paused node stops computing but keeps serving: it still receives contributions and holds its own.

Two real daemons. Each is paused as soon as it has loaded its state (it finishes a round in flight; node 0
is paused before node 1 starts: pausing both once both were up let a fast founder finish all its rounds
while a loaded machine was still starting node 1's training process), then node 0 alone resumes and trains
to max_rounds. Node 1 must receive every one of node 0's new rounds while paused (its sync keeps running),
node 0 must hold node 1's rounds, both must agree on the state hash, and node 1's own round count must not
move until it is resumed. Once both are done, `train start` makes node 0 train exactly the rounds asked
for.
"""

from __future__ import annotations

from pathlib import Path

from daemon.cli.cluster import Cluster, converged

ROUNDS = 6
MORE = 2  # rounds of `train start` once both are done
DEADLINE_S = 180.0


def test_paused_node_keeps_serving_peers(cluster_dir: Path) -> None:
    group = Cluster(cluster_dir)
    group.create(2, task="digits", training={"max_rounds": ROUNDS, "eval_every": 100})
    for index in (0, 1):
        group.start(index)
        group.wait_until(lambda s, i=index: s[i].get("state_hash") is not None, timeout_s=DEADLINE_S,
                         what=f"node {index} to load its state")
        group.client(index).post("/v1/train/pause")
    statuses = group.wait_until(
        lambda s: all(x["training"] == "paused" for x in s), timeout_s=DEADLINE_S, what="both nodes to pause"
    )
    node0_at_pause, paused_rounds = statuses[0]["round"], statuses[1]["round"]
    assert node0_at_pause < ROUNDS  # so node 1 has rounds of node 0 to receive while paused

    group.client(0).post("/v1/train/resume")
    total = ROUNDS + paused_rounds
    first, second = group.wait_until(
        lambda s: s[0]["training"] == "done" and converged(s, contributions=total),
        timeout_s=DEADLINE_S,
        what="node 0 to finish and both nodes to hold every contribution while node 1 is paused",
    )
    assert second["training"] == "paused" and second["round"] == paused_rounds
    assert second["version_vector"][first["peer_id"]] == ROUNDS  # received while paused
    assert first["version_vector"].get(second["peer_id"], 0) == paused_rounds

    group.client(1).post("/v1/train/resume")
    group.wait_until(
        lambda s: converged(s, contributions=2 * ROUNDS) and all(x["training"] == "done" for x in s),
        timeout_s=DEADLINE_S,
        what="node 1 to resume and both to finish",
    )

    # A finished node trains again on request, exactly the rounds asked for.
    reply = group.client(0).post("/v1/train/start", {"rounds": MORE})
    assert reply == {"training": "start", "until_round": ROUNDS + MORE}
    first, second = group.wait_until(
        lambda s: s[0]["round"] == ROUNDS + MORE and s[0]["training"] == "done"
        and converged(s, contributions=2 * ROUNDS + MORE),
        timeout_s=DEADLINE_S,
        what="node 0 to train the started rounds",
    )
    assert second["round"] == ROUNDS and second["training"] == "done"
