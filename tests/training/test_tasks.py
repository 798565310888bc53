import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
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


PLUGIN = '''
import dataclasses
from training._digits import DigitsTask

class Wide(DigitsTask):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(DigitsTask.Config):
        depth: int = 1
        """Unused; shows a plug-in Config extending a built-in one."""

    name = "wide"
'''


def test_plugin_from_a_file_path_gets_typed_options(tmp_path: Path) -> None:
    path = tmp_path / "my task.py"
    path.write_text(PLUGIN)
    task = training.load_task(f"{path}:Wide", hidden=8, val_fraction=1 / 4, depth=2)
    assert task.name == "wide" and task.config.depth == 2 and task.config.hidden == 8  # type: ignore[attr-defined]
    assert training.load_task(f"{path}:Wide").config.depth == 1  # type: ignore[attr-defined]
    rows = {r.key: r for r in training.describe_task_options(f"{path}:Wide")}
    assert rows["depth"].doc.startswith("Unused") and rows["hidden"].type == "int"
    with pytest.raises(training.ConfigError, match=r"task\.depth must be an integer"):
        training.load_task(f"{path}:Wide", depth="2")
    with pytest.raises(training.ConfigError, match=r"task\.hidden must be >= 1 \(got 0\)"):
        training.load_task(f"{path}:Wide", hidden=0)
    (tmp_path / "broken.py").write_text("def oops(:\n")
    with pytest.raises(training.TaskNotFoundError, match=r"cannot import.*SyntaxError"):
        training.load_task(f"{tmp_path / 'broken.py'}:Task")
    with pytest.raises(training.TaskNotFoundError, match="no such file"):
        training.load_task(f"{tmp_path / 'absent.py'}:Task")


def test_function_factories_get_raw_options_and_describe_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raw_factory_task.py").write_text(
        "import training\ndef make(**options):\n    return training.load_task('digits', **options)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert training.describe_task_options("raw_factory_task:make") == []
    assert training.load_task("raw_factory_task:make", hidden=4).config.hidden == 4  # type: ignore[attr-defined]
    sys.modules.pop("raw_factory_task", None)


def test_digits_are_read_as_sklearn_gives_them_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits as sklearn_load_digits

    from training._digits import load_digits

    reference = sklearn_load_digits()
    for located in (True, False):  # the bundled file, then the fallback through sklearn itself
        if not located:
            monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
        pixels, labels = load_digits()
        assert pixels.dtype == np.float64 and labels.dtype == np.int64
        np.testing.assert_array_equal(pixels, reference.data)
        np.testing.assert_array_equal(labels, reference.target)
    code = "import sys, training; training.load_task('digits'); print('sklearn' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
