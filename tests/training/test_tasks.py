import itertools
import sys
from pathlib import Path

import pytest
import torch

import training


def test_digits_batches_deterministic_and_resumable(digits: training.Task) -> None:
    a = list(itertools.islice(digits.batches(1, 3, seed=5, batch_size=16), 40))
    b = list(itertools.islice(digits.batches(1, 3, seed=5, batch_size=16), 40))
    resumed = list(itertools.islice(digits.batches(1, 3, seed=5, batch_size=16, start=37), 3))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a[37:], resumed, strict=True))
    assert a[0][0].shape == (16, 64) and a[0][1].shape == (16,)


def test_digits_shards_are_disjoint(digits: training.Task) -> None:
    parts = [set(digits.shard_indices(s, 3).tolist()) for s in range(3)]  # type: ignore[attr-defined]
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and sum(map(len, parts)) > 1400


def test_unknown_task_and_option() -> None:
    with pytest.raises(training.TaskNotFoundError, match="built-ins"):
        training.load_task("nope")
    with pytest.raises(training.ConfigError, match="unknown option"):
        training.load_task("digits", hiden=3)
    with pytest.raises(training.ConfigError, match="hidden"):
        training.load_task("digits", hidden=0)


def test_plugin_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_plugin_task.py").write_text(
        "import training\n"
        "def make(**options):\n"
        "    return training.load_task('digits', **options)\n"
        "def not_a_task(**options):\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = training.load_task("my_plugin_task:make", hidden=8)
    assert task.name == "digits"
    assert training.num_params(task.build_model()) == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(training.TaskNotFoundError, match="has no"):
        training.load_task("my_plugin_task:missing")
    with pytest.raises(training.TaskNotFoundError, match="not a Task"):
        training.load_task("my_plugin_task:not_a_task")
    with pytest.raises(training.TaskNotFoundError, match="cannot import"):
        training.load_task("no_such_module_xyz:make")
    sys.modules.pop("my_plugin_task", None)
