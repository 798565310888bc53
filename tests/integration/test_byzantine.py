"""A Byzantine member: node 4 of 5 negates its honest update, scales it by 10 and signs it with its own key.

Every receiver accepts such a record (a valid signature, a valid payload, a norm under
``Limits.max_norm``), exactly as from a real malicious member. The founder's ``[node] clip_norm``, fixed by
the genesis for every replica, clips every contribution's norm.

Two layers, because the accuracy under attack depends on scheduling:

* In lockstep (one process, seeded, every peer trains each round from the same merged state and the
  five signed contributions go into one ``crdt.ModelState``) the outcome is deterministic, so the accuracy
  bars are tests: clipping keeps the model learning, and without it the attack wins.
* Five real daemons (``[training] byzantine = "flip10"``, a test-only knob) show the system parts: one
  state hash everywhere, the genesis's ``clip_norm`` in every status, every honest node naming the attacker
  in ``suspects``. Their accuracy is not asserted. With clip_norm 0.3 and 24 rounds it was 0.74-0.85 in 11
  recorded runs, 0.62 and 0.27 under a loaded ``make test``: a busy machine makes rounds stale, and
  the staleness weight shrinks stale honest updates, but the attacker's, ten times too large, is still
  clipped to the full ``clip_norm``. Clipping cannot see staleness (SECURITY.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import crdt
import training
from daemon.cli.cluster import Cluster, converged
from daemon.home import Home
from daemon.node.byzantine import byzantine_round

pytestmark = pytest.mark.timeout(400)

NODES = 5
ATTACKER = NODES - 1
CLIP_NORM = 0.3  # ~2x the honest first-round norm; the attacker's 10x updates are cut to it
DILOCO = {"inner_steps": 20, "outer_momentum": 0.0, "topk_density": 0.1}  # fast, stable update norms
DEADLINE_S = 300.0
ROUNDS = 10  # enough for every honest node to name the attacker (>= SUSPECT_MIN_UPDATES each)


def _lockstep_accuracy(clip_norm: float | None, rounds: int) -> float:
    """Val accuracy after ``rounds`` lockstep rounds of five seeded PeerTrainers, node 4 attacking."""
    task = training.load_task("digits")
    config = training.DilocoConfig(**DILOCO, expected_peers=NODES, torch_threads=1)
    trainers = [training.PeerTrainer(task, config, shard=i, num_shards=NODES) for i in range(NODES)]
    genesis = crdt.Genesis(training.flatten_params(task.build_model()), trainers[0].fragments, {})
    state = crdt.ModelState(genesis, limits=crdt.Limits(clip_norm=clip_norm))
    signers = [crdt.Signer.from_seed(bytes([i + 1]) * 32) for i in range(NODES)]
    for seq in range(1, rounds + 1):
        theta = state.materialize()
        for i, (signer, trainer) in enumerate(zip(signers, trainers, strict=True)):
            result = trainer.run_round(theta, fragment=0)
            if i == ATTACKER:
                result = byzantine_round("flip10", result, genesis.fragment_length(0))
            state.apply(
                crdt.make_contribution(
                    signer,
                    genesis_id=genesis.id,
                    seq=seq,
                    fragment=0,
                    codec=result.codec,
                    payload=result.payload,
                    weight=result.weight,
                    base_version=b"\x00" * 32,
                )
            )
    return trainers[0].evaluate(state.materialize())["val_accuracy"]


def test_in_lockstep_clipping_keeps_the_model_learning_and_without_it_the_attack_wins() -> None:
    clipped = _lockstep_accuracy(CLIP_NORM, rounds=24)
    unclipped = _lockstep_accuracy(None, rounds=10)
    assert clipped > 0.7, clipped  # honest peers alone: ~0.84 after 8 rounds
    assert unclipped < 0.3, unclipped  # chance is 0.1


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
    statuses, attacker = _run(cluster_dir, rounds=ROUNDS, clip_norm=CLIP_NORM)
    assert len({s["state_hash"] for s in statuses}) == 1  # clipping is deterministic: one state
    for status in statuses:
        assert status["clip_norm"] == CLIP_NORM, "the genesis fixes clipping for every replica"
        assert status["eval"]["state_hash"] == status["state_hash"]
        assert 0.0 <= status["eval"]["val_accuracy"] <= 1.0  # evaluated; the bar is the lockstep test's
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
