"""training: DiLoCo peers, tasks, and the flat-vector bridge to crdt.

Public API (see the contracts doc): load_task / Task, flatten_params / load_flat_params /
fragment_ranges, DilocoConfig (DilocoConfig.for_task merges a task's tuned defaults), PeerTrainer,
RoundResult, StalenessPolicy, and the error tree (TrainingError, ConfigError, TaskNotFoundError).
Pure pieces of the round (build_inner_optimizer, inner_loop,
outer_update, compress) are exported for tests and benchmarks.
"""

from training._diloco import (
    CODECS,
    Compressed,
    DilocoConfig,
    PeerTrainer,
    RoundResult,
    build_inner_optimizer,
    compress,
    inner_loop,
    outer_update,
    resolve_device,
)
from training._errors import ConfigError, TaskNotFoundError, TrainingError
from training._params import flatten_params, fragment_ranges, load_flat_params, num_params
from training._staleness import StalenessPolicy
from training._task import Task, load_task

__all__ = [
    "CODECS",
    "Compressed",
    "ConfigError",
    "DilocoConfig",
    "PeerTrainer",
    "RoundResult",
    "StalenessPolicy",
    "Task",
    "TaskNotFoundError",
    "TrainingError",
    "build_inner_optimizer",
    "compress",
    "flatten_params",
    "fragment_ranges",
    "inner_loop",
    "load_flat_params",
    "load_task",
    "num_params",
    "outer_update",
    "resolve_device",
]
