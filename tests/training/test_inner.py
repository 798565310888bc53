import itertools
import math

import numpy as np
import pytest
import torch

import training
from training import DilocoConfig
from training._digits import DigitsTask


def _cfg(**kw: object) -> DilocoConfig:
    return DilocoConfig(**({"inner_steps": 3, "batch_size": 16, "device": "cpu"} | kw))  # type: ignore[arg-type]


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    c = _cfg(inner_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    f = [training.lr_factor(s, c) for s in range(200)]
    assert f[0] == pytest.approx(0.1) and f[9] == f[10] == 1.0
    assert f[60] == pytest.approx(0.55)  # half way through the cosine
    assert f[110] == f[199] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert training.lr_factor(10**6, _cfg(warmup_steps=5)) == 1.0  # no total_steps: constant after warm-up


def test_schedule_resumes_across_a_restart(digits: training.Task) -> None:
    cfg = _cfg(warmup_steps=4, total_steps=12, inner_lr=1e-2)
    a = training.PeerTrainer(digits, cfg)
    theta = training.flatten_params(digits.build_model())
    lrs = []
    for _ in range(2):
        a.run_round(theta, fragment=0)
        lrs.append(a.optimizer.param_groups[0]["lr"])
    assert a.inner_step == 6 and lrs == [pytest.approx(1e-2 * training.lr_factor(s, cfg)) for s in (2, 5)]
    b = training.PeerTrainer(digits, cfg)
    b.load_state_dict(a.state_dict())
    ra, rb = a.run_round(theta, fragment=0), b.run_round(theta, fragment=0)
    assert b.inner_step == 9 and ra.payload == rb.payload
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * training.lr_factor(8, cfg))
    assert b.optimizer.param_groups[0]["lr"] < 1e-2  # decaying by now


def test_gradient_accumulation_equals_one_big_batch(digits: training.Task) -> None:
    """2 micro-batches of 16 == 1 batch of 32: digits' first epoch deals the same rows either way."""
    common = {"inner_optimizer": "sgd", "inner_momentum": 0.0, "grad_clip": 0.0, "inner_lr": 0.1}
    small = training.PeerTrainer(digits, _cfg(batch_size=16, grad_accum=2, **common))
    big = training.PeerTrainer(digits, _cfg(batch_size=32, **common))
    theta = training.flatten_params(digits.build_model())
    rs, rb = small.run_round(theta, fragment=0), big.run_round(theta, fragment=0)
    np.testing.assert_allclose(
        training.flatten_params(small.model), training.flatten_params(big.model), rtol=0, atol=1e-6
    )
    assert rs.train_loss == pytest.approx(rb.train_loss, rel=1e-5)
    assert small.batches_consumed == 6 and big.batches_consumed == 3
    assert not np.allclose(training.flatten_params(small.model), theta)  # it trained


def test_sgd_with_momentum_by_name(digits: training.Task) -> None:
    sgd = _cfg(inner_optimizer="sgd", inner_momentum=0.8)
    opt = training.build_inner_optimizer(digits.build_model(), sgd)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["momentum"] for g in opt.param_groups] == [0.8, 0.8]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # never on biases
    adamw = training.build_inner_optimizer(digits.build_model(), _cfg(inner_betas=(0.9, 0.95)))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)


class _OwnOptimizer(DigitsTask):
    def build_optimizer(self, model: torch.nn.Module, config: DilocoConfig) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=2 * config.inner_lr)


class _NotAnOptimizer(DigitsTask):
    def build_optimizer(self, model: torch.nn.Module, config: DilocoConfig) -> object:
        return "adam"


def test_task_supplies_its_own_optimizer_and_is_scheduled() -> None:
    cfg = _cfg(inner_lr=0.05, warmup_steps=10)
    peer = training.PeerTrainer(_OwnOptimizer(), cfg)
    assert isinstance(peer.optimizer, torch.optim.SGD) and peer.optimizer.param_groups[0]["initial_lr"] == 0.1
    peer.run_round(training.flatten_params(peer.model), fragment=0)
    assert peer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 3 / 10)  # step 2 of the warm-up
    with pytest.raises(training.TrainingError, match="build_optimizer returned str"):
        training.PeerTrainer(_NotAnOptimizer(), cfg)


def test_a_finite_stream_is_a_training_error(digits: training.Task) -> None:
    model = digits.build_model()
    opt = training.build_inner_optimizer(model, _cfg())
    short = itertools.islice(digits.batches(0, 1, seed=0, batch_size=8), 2)
    with pytest.raises(training.TrainingError, match="batches\\(\\) ended"):
        training.inner_loop(model, digits, opt, short, steps=3, grad_clip=1.0)
    assert math.isfinite(training.inner_loop(model, digits, opt, digits.batches(0, 1, seed=0, batch_size=8),
                                             steps=1, grad_clip=1.0))
