"""Walking skeleton, end to end: two real daemons train one model together over libp2p.

The second node bootstraps from the first, fetches the run's genesis by content, and both train a few
DiLoCo rounds on the digits task. They must end with the same state hash over the same contributions,
and the merged model must classify digits well above chance (10 %). A node stopped with SIGTERM tells
its peer it is leaving.
"""

from __future__ import annotations

from pathlib import Path

from daemon.cli.cluster import Cluster, converged

ROUNDS = 4
DEADLINE_S = 240.0


def test_two_daemons_train_and_converge(cluster_dir: Path) -> None:
    group = Cluster(cluster_dir)
    group.up(2, task="digits", training={"max_rounds": ROUNDS, "eval_every": 2})

    statuses = group.wait_until(
        lambda s: converged(s, contributions=2 * ROUNDS)
        and all(x["eval"].get("contributions") == 2 * ROUNDS for x in s)
        and all(x["peer_info"] for x in s),
        timeout_s=DEADLINE_S,
        what="both nodes to hold all contributions and evaluate the merged model",
    )

    first, second = statuses
    assert first["peers"] == [second["peer_id"]] and second["peers"] == [first["peer_id"]]
    assert first["genesis"] == second["genesis"]
    assert first["round"] == second["round"] == ROUNDS
    assert first["state_hash"] == second["state_hash"]
    assert first["bytes_sent"] > 0 and second["bytes_received"] > 0
    # Each hears the other's heartbeat: its round, task and capabilities.
    assert first["peer_info"][second["peer_id"]]["task"] == "digits"
    assert second["peer_info"][first["peer_id"]]["device"] == "cpu"
    for status in statuses:
        assert set(status["version_vector"]) == {first["peer_id"], second["peer_id"]}
        assert status["eval"]["state_hash"] == status["state_hash"]
        assert status["eval"]["val_accuracy"] > 0.6, status["eval"]

    # SIGTERM: the leaving node says so in a last heartbeat before it closes its connections.
    group.stop(1)
    group.wait_until(
        lambda s: s[0]["peer_info"][second["peer_id"]]["training"] == "leaving" and not s[0]["peers"],
        timeout_s=30,
        what="node 0 to hear node 1 leave",
    )
