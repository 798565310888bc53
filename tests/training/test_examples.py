"""The plug-ins under examples/ pass check_task and train, in-process, to a measured validation loss.

Lockstep DiLoCo rounds of two PeerTrainers, each streaming the whole training set in its own order
(seeded by data_seed, as the daemon does), their decoded payloads added to θ as crdt would. The bars
are the losses measured on 2026-12-01 plus a margin (the runs are seeded; the margin covers float
reduction order across machines and thread counts)."""

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import crdt
import training

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HF = f"{EXAMPLES / 'hf_causal_lm' / 'hf_causal_lm.py'}:HFCausalLM"
CNN = f"{EXAMPLES / 'digits_cnn' / 'digits_cnn.py'}:DigitsCNN"
SMALL_LM = {"n_layer": 2, "n_embd": 64, "block_size": 64, "max_corpus_bytes": 1_000_000, "eval_bytes": 8192}


def _needs_transformers() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[examples]'")


def _train(spec: str, options: dict[str, Any], diloco: dict[str, Any], rounds: int) -> dict[str, float]:
    task = training.load_task(spec, **options)
    cfg = training.DilocoConfig.for_task(task, {"device": "cpu", "expected_peers": 2, **diloco})
    seeds = [training.data_seed(bytes([i])) for i in range(2)]
    peers = [training.PeerTrainer(task, dataclasses.replace(cfg, seed=s)) for s in seeds]
    theta = training.flatten_params(task.build_model())
    for _ in range(rounds):
        results = [p.run_round(theta, fragment=0) for p in peers]
        theta = theta.copy()
        for r in results:
            idx, vals = crdt.decode_payload(r.codec, theta.size, r.payload)
            theta[idx] += r.weight * vals
    return peers[0].evaluate(theta)


def test_examples_load_by_path_and_cannot_shadow_a_package() -> None:
    task = training.load_task(CNN)
    module = type(task).__module__
    assert module.startswith("meshtrain_task_") and sys.modules[module].__file__ == CNN.rpartition(":")[0]
    assert not (EXAMPLES / "__init__.py").exists()  # not a package: libp2p's wheel installs `examples`


def test_digits_cnn_checks_and_trains() -> None:
    assert training.check_task(CNN) == []
    metrics = _train(CNN, {}, {}, rounds=8)
    assert metrics["val_loss"] < 0.2 and metrics["val_accuracy"] > 0.93, metrics  # measured 0.109, 0.969


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_causal_lm_checks(arch: str) -> None:
    _needs_transformers()
    assert training.check_task(HF, {**SMALL_LM, "arch": arch}) == []
    with pytest.raises(training.ConfigError, match=r"task\.arch must be one of"):
        training.load_task(HF, arch="bert")


def test_hf_llama_trains() -> None:
    _needs_transformers()
    torch.manual_seed(0)
    metrics = _train(HF, SMALL_LM, {"inner_steps": 20}, rounds=8)
    assert metrics["val_loss"] < 2.5, metrics  # measured 2.366 (uniform over bytes: 5.545)
    assert np.isclose(metrics["val_bpb"], metrics["val_loss"] / np.log(2))


@pytest.mark.slow
def test_hf_gpt2_trains() -> None:
    _needs_transformers()
    metrics = _train(HF, {**SMALL_LM, "arch": "gpt2"}, {"inner_steps": 20}, rounds=8)
    assert metrics["val_loss"] < 2.8, metrics  # measured 2.653
