"""A Byzantine member in a real 5-daemon run (SECURITY.md, "Byzantine updates").

Node 4 is the attacker (``[training] byzantine = "flip10"``, a test-only knob): every round it negates
its honest update and scales it by 10, then signs it with its own key, so every receiver accepts it (a
valid signature, a valid payload, a norm under ``Limits.max_norm``), exactly as from a real malicious
member. Node 0 founds the run with ``[node] clip_norm``, which the genesis fixes for every replica.

Measured on the 2-core dev box (digits, inner_steps 20, outer_momentum 0, top-k 10 %): honest peers send
update norms of 0.13 to 0.9 per round, and honest peers alone reach 0.84 val accuracy in 8 rounds. With
clip_norm 0.3 the attacked run reached 0.74-0.85 after 24 rounds in 11 recorded runs (rounds interleave
differently each run), but 0.62 in a plain `make test`, and another `make test` fell below the former
bar of 0.7. Without clipping the same attack leaves the
model at chance (0.09 after 10 rounds; ``test_without_clipping_the_attack_wins``, marked slow). The bar is
therefore 0.4: four times chance, far above what the unclipped attack allows, and well below the worst
run seen. It bounds the damage; it is not honest-only quality (SECURITY.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.cluster import Cluster, converged
from daemon.home import Home

pytestmark = pytest.mark.timeout(400)

NODES = 5
ATTACKER = NODES - 1
CLIP_NORM = 0.3  # ~2x the honest first-round norm; the attacker's 10x updates are cut to it
DILOCO = {"inner_steps": 20, "outer_momentum": 0.0, "topk_density": 0.1}  # fast, stable update norms
DEADLINE_S = 300.0
TARGET_ACCURACY = 0.4  # see the module docstring for the measured spread


def _run(cluster_dir: Path, *, rounds: int, clip_norm: float) -> tuple[list[dict[str, Any]], str]:
    """Train ``rounds`` per node with node 4 attacking; return the converged statuses and its peer id."""
    import tomllib

    import tomli_w

    group = Cluster(cluster_dir)
    infos = group.create(
        NODES, task="digits", training={"max_rounds": rounds, "eval_every": rounds}, diloco=DILOCO
    )
    if clip_norm:
        founder = Home(Path(infos[0].home)).config_file
        config = tomllib.loads(founder.read_text())
        config["node"]["clip_norm"] = clip_norm
        founder.write_text(tomli_w.dumps(config))
    group.set_training_option(ATTACKER, byzantine="flip10")
    for info in infos:
        group.start(info.index)
    total = NODES * rounds
    statuses = group.wait_until(
        lambda s: (
            converged(s, contributions=total) and all(x["eval"].get("contributions") == total for x in s)
        ),
        timeout_s=DEADLINE_S,
        what="every node to hold every contribution and evaluate the merged model",
    )
    return statuses, infos[ATTACKER].peer_id


def test_clipping_survives_a_sign_flipping_attacker_and_status_names_it(cluster_dir: Path) -> None:
    statuses, attacker = _run(cluster_dir, rounds=24, clip_norm=CLIP_NORM)
    assert len({s["state_hash"] for s in statuses}) == 1  # clipping is deterministic: one state
    for status in statuses:
        assert status["clip_norm"] == CLIP_NORM, "the genesis fixes clipping for every replica"
        assert status["eval"]["state_hash"] == status["state_hash"]
        assert status["eval"]["val_accuracy"] > TARGET_ACCURACY, status["eval"]
        if status["peer_id"] != attacker:  # every honest node names the attacker, and only it
            assert status["suspects"] == [attacker], (status["index"], status["suspects"])


@pytest.mark.slow
def test_without_clipping_the_attack_wins(cluster_dir: Path) -> None:
    statuses, attacker = _run(cluster_dir, rounds=10, clip_norm=0.0)
    assert len({s["state_hash"] for s in statuses}) == 1
    for status in statuses:
        assert status["clip_norm"] is None
        assert status["eval"]["val_accuracy"] < 0.5, status["eval"]  # honest alone: ~0.84 in 8 rounds
        if status["peer_id"] != attacker:
            assert attacker in status["suspects"]
