"""The Task interface and `load_task`: what DiLoCo needs to know about a model and its data.

A Task is a model factory plus a deterministic, shardable data stream plus a loss and a held-out
evaluation. Everything else (optimizers, devices, syncing) is the trainer's business, so a task file is
just "model + data" and stays nanoGPT-short.

Built-in names: "digits" (fast test task) and "stdlib-lm" (the default). Plug-ins are named
"package.module:factory"; `factory(**options)` must return an object satisfying `Task`.
Options are the fields of the task's `Config`; unknown options raise ConfigError.

Resumption: `batches` may accept an optional keyword `start: int` (skip that many batches in O(1));
the trainer passes it when the signature has it, and otherwise skips by consuming the iterator.
"""

import dataclasses
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from training._errors import ConfigError, TaskNotFoundError


@runtime_checkable
class Task(Protocol):
    """What PeerTrainer needs from a task (see module docstring)."""

    name: str

    def build_model(self) -> torch.nn.Module:
        """A fresh model; same architecture and parameter order on every peer (init may be random)."""
        ...

    def batches(self, shard: int, num_shards: int, *, seed: int, batch_size: int) -> Iterator[Any]:
        """Infinite, deterministic stream of CPU batches from this shard's training data."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss; moves the batch to the model's device itself."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics, at least "val_loss"."""
        ...


C = TypeVar("C")


def build_config(config_cls: type[C], options: dict[str, Any]) -> C:
    """`config_cls(**options)`, with unknown/missing keys reported as ConfigError naming the task."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"{config_cls.__qualname__}: unknown option(s) {unknown}; known: {sorted(names)}")
    return config_cls(**options)


def _digits(**options: Any) -> Task:
    from training._digits import DigitsTask  # lazy: `import training` stays cheap

    return DigitsTask(build_config(DigitsTask.Config, options))


def _stdlib_lm(**options: Any) -> Task:
    from training._stdlib_lm import StdlibLMTask

    return StdlibLMTask(build_config(StdlibLMTask.Config, options))


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {"digits": _digits, "stdlib-lm": _stdlib_lm}


def load_task(name: str, **options: Any) -> Task:
    """Build a task by name ("digits", "stdlib-lm") or plug-in spec ("package.module:factory").

    Raises:
        TaskNotFoundError: unknown name, module that fails to import, or missing factory attribute.
        ConfigError: an option the task's Config doesn't know or rejects.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise TaskNotFoundError(f"task plug-in {name!r}: cannot import {module_name!r}: {e}") from e
        try:
            factory = getattr(module, attr)
        except AttributeError as e:
            raise TaskNotFoundError(f"task plug-in {name!r}: {module_name!r} has no {attr!r}") from e
    else:
        if name not in BUILTIN_TASKS:
            raise TaskNotFoundError(
                f"unknown task {name!r}; built-ins: {sorted(BUILTIN_TASKS)}, or use 'package.module:factory'"
            )
        factory = BUILTIN_TASKS[name]
    task = factory(**options)
    if not isinstance(task, Task):
        raise TaskNotFoundError(f"task {name!r}: factory returned {type(task).__name__}, not a Task")
    return task
