"""The Task interface and `load_task`: what DiLoCo needs to know about a model and its data.

A Task is a model factory plus a deterministic data stream plus a loss and a held-out evaluation.
Everything else (optimizers, devices, syncing) is the trainer's business, so a task file is just
"model + data" and stays nanoGPT-short.

Names. A task name resolves to a factory:

* a built-in: "digits" (fast test task) or "stdlib-lm" (the default), aliases of
  "training._digits:DigitsTask" and "training._stdlib_lm:StdlibLMTask";
* "package.module:Factory", imported from sys.path;
* "path/to/file.py:Factory", loaded from that file (relative to the current directory), so a user's
  own model needs no package and no PYTHONPATH.

Options. If the factory has a nested dataclass `Config` (the built-ins and `task_skeleton` do), the
options (the `[task]` table) are checked and converted into it by `build_config`, errors naming
"task.<key>", and the factory is called as `Factory(config)`; `describe_task_options` lists its fields.
Any other callable is called as `factory(**options)` and validates them itself.

Data. `batches(shard, num_shards, *, seed, batch_size)` is an infinite, deterministic stream: the same
arguments give the same batches. Outside a test harness every peer passes shard 0 of 1 (the whole
training set) and its own seed (`training.data_seed(peer id)`), so each peer must see a different
order for a different seed; explicit shards (a lab cluster) must give different data per shard. The
stream may accept `start: int` (skip that many batches in O(1)); the trainer passes it when the
signature has it, and otherwise skips by consuming the iterator.

Optional members the trainer uses when present: `default_diloco() -> dict` (tuned [diloco] defaults,
under the user's) and `build_optimizer(model, config) -> torch.optim.Optimizer` (replaces the
configured inner optimizer; the warm-up/cosine schedule still scales each group's initial lr).

Rejected: entry points (`importlib.metadata`) for plug-ins: they require packaging the model before
trying it, and a name in a config file is as explicit.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from training._errors import ConfigError, TaskNotFoundError
from training._options import OptionInfo, build_config, describe_options

BUILTIN_TASKS: dict[str, str] = {
    "digits": "training._digits:DigitsTask",
    "stdlib-lm": "training._stdlib_lm:StdlibLMTask",
}
TASK_SECTION = "task"  # the config table that holds a task's options; error messages name its keys


@runtime_checkable
class Task(Protocol):
    """What PeerTrainer needs from a task (see module docstring)."""

    name: str

    def build_model(self) -> torch.nn.Module:
        """A fresh model; same architecture and parameter order on every peer (init may be random)."""
        ...

    def batches(self, shard: int, num_shards: int, *, seed: int, batch_size: int) -> Iterator[Any]:
        """Infinite, deterministic stream of CPU batches of the shard's training data (0 of 1: all)."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss; moves the batch to the model's device itself."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics, at least "val_loss"."""
        ...


def resolve_factory(name: str) -> Callable[..., Any]:
    """The factory a task name refers to (see module docstring), imported but not called.

    Raises:
        TaskNotFoundError: unknown name, a module or file that fails to import, a missing attribute.
    """
    spec = BUILTIN_TASKS.get(name, name)
    if ":" not in spec:
        raise TaskNotFoundError(
            f"unknown task {name!r}; built-ins: {sorted(BUILTIN_TASKS)}, "
            "or 'package.module:Factory', or 'path/to/file.py:Factory'"
        )
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            module = _load_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # a plug-in's SyntaxError or NameError is "cannot load" too, with its cause
        raise TaskNotFoundError(f"task plug-in {name!r}: cannot import {module_name!r}: {e!r}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise TaskNotFoundError(f"task plug-in {name!r}: {module_name!r} has no {attr!r}") from e


def _load_file(path: Path) -> Any:
    """Import a plug-in file once per absolute path, under a name that cannot shadow a real module."""
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    digest = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
    module_name = f"meshtrain_task_{digest}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py path always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def task_config_class(factory: Callable[..., Any]) -> type | None:
    """The factory's nested dataclass `Config`, or None (then it takes **options as it likes)."""
    config_cls = getattr(factory, "Config", None)
    return config_cls if isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls) else None


def load_task(name: str, **options: Any) -> Task:
    """Build a task by name with its options (the `[task]` table; see module docstring).

    Raises:
        TaskNotFoundError: see `resolve_factory`; or the factory returned something that is not a Task.
        ConfigError: an option the task's Config doesn't know, can't convert or rejects (names the key).
    """
    factory = resolve_factory(name)
    config_cls = task_config_class(factory)
    if config_cls is not None:
        task = factory(build_config(config_cls, options, section=TASK_SECTION))
    else:
        task = factory(**options)
    if not isinstance(task, Task):
        raise TaskNotFoundError(f"task {name!r}: factory returned {type(task).__name__}, not a Task")
    return task


def check_task_options(name: str, options: dict[str, Any]) -> bool:
    """Validate ``options`` against the task's `Config` without building the task (no model, no data).
    Returns False when the factory has no `Config` (then only the task itself can judge them).

    Raises:
        TaskNotFoundError: see `resolve_factory`.
        ConfigError: an option the Config doesn't know, can't convert or rejects (names the key).
    """
    config_cls = task_config_class(resolve_factory(name))
    if config_cls is None:
        return False
    build_config(config_cls, options, section=TASK_SECTION)
    return True


def describe_task_options(name: str) -> list[OptionInfo]:
    """(key, type, default, doc) rows of the task's options; [] for a factory without a `Config`.

    Raises:
        TaskNotFoundError: see `resolve_factory`.
    """
    config_cls = task_config_class(resolve_factory(name))
    return describe_options(config_cls) if config_cls is not None else []


def task_config_error(field: str, why: str, value: Any) -> ConfigError:
    """The error a task Config's `__post_init__` raises: "task.<field> <why> (got <value>)"."""
    return ConfigError(f"{TASK_SECTION}.{field} {why} (got {value!r})")
