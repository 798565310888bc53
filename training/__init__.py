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

from training._assignment import data_seed
from training._check import Problem, check_task
from training._config import CODECS, INNER_OPTIMIZERS, DilocoConfig, resolve_device
from training._diloco import PeerTrainer, RoundResult
from training._errors import ConfigError, TaskNotFoundError, TrainingError
from training._inner import build_inner_optimizer, inner_loop, lr_factor
from training._options import OptionInfo, build_config, coerce, describe_options
from training._outer import Compressed, compress, outer_update
from training._params import flatten_params, fragment_ranges, load_flat_params, num_params
from training._skeleton import task_skeleton
from training._staleness import StalenessPolicy
from training._stdlib_lm import StdlibLMTask
from training._task import Task, check_task_options, describe_task_options, load_task

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
