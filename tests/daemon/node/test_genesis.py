"""daemon.node.genesis: what a founder writes, and which genesis a joiner refuses and why."""

from __future__ import annotations

import numpy as np
from node_testlib import SIGNER, signer

import crdt
import p2p
from daemon.config import Config
from daemon.node.genesis import found_genesis, refusal

FRAGMENTS = ((0, 8), (8, 16))
PARAMS = np.linspace(-1, 1, 16, dtype=np.float32)
MEMBER = signer(3)


def test_a_founder_writes_the_run_its_options_and_its_checkpoint_policy() -> None:
    member_id = p2p.peer_id_from_public_key(MEMBER.public_key)
    config = Config.from_dict({
        "node": {"run": "r", "allow_peers": [member_id], "checkpoint_quorum": 2, "clip_norm": 0.3},
        "task": {"n_layer": 2},
    })
    genesis = found_genesis(config, SIGNER.public_key, PARAMS, FRAGMENTS)
    policy = crdt.CheckpointPolicy.from_genesis(genesis)
    assert policy is not None and policy.quorum == 2
    assert policy.signers == {SIGNER.public_key, MEMBER.public_key}  # a private run's members sign too
    assert genesis.meta["clip_norm"] == "0.3" and genesis.meta["task_options"] == '{"n_layer":2}'
    assert refusal(genesis, config, FRAGMENTS) is None


def test_a_joiner_names_what_does_not_fit() -> None:
    config = Config.from_dict({"node": {"run": "r"}})
    genesis = found_genesis(config, SIGNER.public_key, PARAMS, FRAGMENTS)
    cases = {
        "not the pinned": config.with_overrides("node", genesis="00" * 32),
        "belongs to run 'r'": config.with_overrides("node", run="other"),
        "trains task": config.with_overrides("training", task="digits"),
        "[task] options": config.with_overrides("task", width=3),
    }
    for fragment, joiner in cases.items():
        reason = refusal(genesis, joiner, FRAGMENTS)
        assert reason is not None and fragment in reason, (fragment, reason)
    assert "fragments" in (refusal(genesis, config, ((0, 16),)) or "")
