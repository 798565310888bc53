from pathlib import Path

import pytest

import training

BROKEN = '''
import itertools
import torch
from torch import nn
from training._digits import DigitsTask

class GlobalRng(DigitsTask):
    def batches(self, shard, num_shards, *, seed, batch_size):
        while True:
            rows = torch.randint(0, 1000, (batch_size,))
            yield self._x[rows], self._y[rows]

class IgnoresSeed(DigitsTask):
    def batches(self, shard, num_shards, *, seed, batch_size, start=0):
        return super().batches(shard, num_shards, seed=0, batch_size=batch_size, start=start)

class IgnoresShard(DigitsTask):
    def batches(self, shard, num_shards, *, seed, batch_size, start=0):
        return super().batches(0, 1, seed=seed, batch_size=batch_size, start=start)

class BadStart(DigitsTask):
    def batches(self, shard, num_shards, *, seed, batch_size, start=0):
        return super().batches(shard, num_shards, seed=seed, batch_size=batch_size)

class Finite(DigitsTask):
    def batches(self, shard, num_shards, *, seed, batch_size):
        return itertools.islice(super().batches(shard, num_shards, seed=seed, batch_size=batch_size), 2)

class Shapes(DigitsTask):
    calls = 0
    def build_model(self):
        Shapes.calls += 1
        return nn.Sequential(nn.Linear(64, 8 + Shapes.calls), nn.Linear(8 + Shapes.calls, 10))

class Norm(DigitsTask):
    def build_model(self):
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))

class Unused(DigitsTask):
    def build_model(self):
        model = super().build_model()
        model.register_parameter("spare", nn.Parameter(torch.zeros(3)))
        return model

class VectorLoss(DigitsTask):
    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

class Detached(DigitsTask):
    def loss(self, model, batch):
        return super().loss(model, batch).detach()

class Explodes(DigitsTask):
    def loss(self, model, batch):
        return super().loss(model, batch) * float("inf")

class NoValLoss(DigitsTask):
    def evaluate(self, model):
        return {"accuracy": 1.0}

class TensorMetric(DigitsTask):
    def evaluate(self, model):
        return {"val_loss": torch.tensor(1.0)}

class Crashes(DigitsTask):
    def evaluate(self, model):
        raise RuntimeError("no validation set")
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "broken_tasks.py"
    path.write_text(BROKEN)
    return path


def test_builtin_tasks_pass() -> None:
    assert training.check_task("digits") == []
    tiny = {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, "max_corpus_bytes": 300_000}
    assert training.check_task("stdlib-lm", {**tiny, "val_permille": 200}) == []


@pytest.mark.parametrize(
    ("cls", "check", "words"),
    [
        ("GlobalRng", "batches", "two calls with the same arguments gave different batches"),
        ("IgnoresSeed", "batches", "seeds 0 and 1 give the same batches"),
        ("IgnoresShard", "batches", "shards 0 and 1 of 2 give the same batches"),
        ("BadStart", "batches", "does not begin with the stream's third batch"),
        ("Finite", "batches", "the stream ended after 2 batches"),
        ("Shapes", "build_model", "two calls to build_model gave different parameters: #0"),
        ("Norm", "train", "training changed a buffer"),
        ("Unused", "loss", "1 parameter(s) get no gradient"),
        ("VectorLoss", "loss", "not a 0-dim tensor"),
        ("Detached", "loss", "the loss has no gradient"),
        ("Explodes", "loss", "the loss of a fresh model is inf"),
        ("NoValLoss", "evaluate", "evaluate returned {'accuracy': 1.0}"),
        ("TensorMetric", "evaluate", "metrics that are not finite numbers"),
        ("Crashes", "evaluate", "RuntimeError: no validation set (at "),
    ],
)
def test_each_mistake_is_reported_in_words(plugin: Path, cls: str, check: str, words: str) -> None:
    problems = training.check_task(f"{plugin}:{cls}")
    assert [p.check for p in problems] == [check], problems
    assert words in problems[0].what and problems[0].fix
    assert str(problems[0]).startswith(f"[{check}] ")


def test_load_problems(plugin: Path) -> None:
    (unknown,) = training.check_task("digits", {"hiden": 3})
    assert unknown.check == "load" and "task.hiden" in unknown.what
    (missing,) = training.check_task(f"{plugin}:Nope")
    assert missing.check == "load" and "has no 'Nope'" in missing.what
    (diloco,) = training.check_task("digits", diloco={"inner_lr": -1.0})
    assert diloco.check == "load" and "diloco.inner_lr" in diloco.what
