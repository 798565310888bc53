"""training: DiLoCo peers, tasks, and the flat-vector bridge to crdt.

Public API:

* tasks: load_task / Task, check_task_options, describe_task_options, check_task / Problem,
  task_skeleton; StdlibLMTask
  (the stdlib corpus, batches and byte-level evaluation, to subclass with another model);
* options: build_config (a TOML table into a Config dataclass, errors naming the key), coerce,
  describe_options / OptionInfo;
* data assignment: data_seed (each peer streams the whole training set in its own order);
* the trainer: DilocoConfig (DilocoConfig.for_task merges a task's tuned defaults), PeerTrainer,
  RoundResult, StalenessPolicy, resolve_device;
* flat vectors: flatten_params / load_flat_params / fragment_ranges / num_params;
* errors: TrainingError, ConfigError, TaskNotFoundError.

Pure pieces of the round (build_inner_optimizer, lr_factor, inner_loop, outer_update, compress) are
exported for tests and benchmarks.
"""

import importlib
from typing import Any

#: Public name -> the submodule defining it. Imported on first use (PEP 562), so a process that only
#: unpickles a RoundResult (the daemon) or reads config never imports torch (2 B/param of daemon memory
#: at 100M parameters, bench/probe_memory.py).
_WHERE = {
    "data_seed": "_assignment",
    "Problem": "_check",
    "check_task": "_check",
    "CODECS": "_config",
    "INNER_OPTIMIZERS": "_config",
    "DilocoConfig": "_config",
    "resolve_device": "_config",
    "PeerTrainer": "_diloco",
    "RoundResult": "_result",
    "ConfigError": "_errors",
    "TaskNotFoundError": "_errors",
    "TrainingError": "_errors",
    "build_inner_optimizer": "_inner",
    "inner_loop": "_inner",
    "lr_factor": "_inner",
    "OptionInfo": "_options",
    "build_config": "_options",
    "coerce": "_options",
    "describe_options": "_options",
    "Compressed": "_outer",
    "compress": "_outer",
    "outer_update": "_outer",
    "flatten_params": "_params",
    "fragment_ranges": "_params",
    "load_flat_params": "_params",
    "num_params": "_params",
    "task_skeleton": "_skeleton",
    "StalenessPolicy": "_staleness",
    "StdlibLMTask": "_stdlib_lm",
    "Task": "_task",
    "check_task_options": "_task",
    "describe_task_options": "_task",
    "load_task": "_task",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"training.{_WHERE[name]}"), name)


__all__ = [
    "CODECS",
    "INNER_OPTIMIZERS",
    "Compressed",
    "ConfigError",
    "DilocoConfig",
    "OptionInfo",
    "PeerTrainer",
    "Problem",
    "RoundResult",
    "StalenessPolicy",
    "StdlibLMTask",
    "Task",
    "TaskNotFoundError",
    "TrainingError",
    "build_config",
    "build_inner_optimizer",
    "check_task",
    "check_task_options",
    "coerce",
    "compress",
    "data_seed",
    "describe_options",
    "describe_task_options",
    "flatten_params",
    "fragment_ranges",
    "inner_loop",
    "load_flat_params",
    "load_task",
    "lr_factor",
    "num_params",
    "outer_update",
    "resolve_device",
    "task_skeleton",
]
