"""The training package's exception tree.

    TrainingError
    ├── ConfigError (also ValueError)      a Config field is out of range; the message names the field
    └── TaskNotFoundError (also LookupError) load_task got an unknown name or a plug-in that won't import

Shape mismatches between a flat vector and a model raise ConfigError too: both mean "the caller handed
us something built for a different model/config", and the daemon treats them the same way (refuse to
start the training child rather than train on garbage).
"""


class TrainingError(Exception):
    """Base class for every error raised on purpose by `training`."""


class ConfigError(TrainingError, ValueError):
    """A configuration value (or a vector's shape) doesn't fit; the message names the field to fix."""


class TaskNotFoundError(TrainingError, LookupError):
    """`load_task` could not resolve the task name or plug-in factory."""
