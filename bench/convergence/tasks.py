"""The benchmark presets' task configs as task plug-ins ("bench.convergence.tasks:long"), so real daemons
(cluster mode) train exactly the model the in-process contenders train."""

from typing import Any

import training


def _preset(name: str) -> training.Task:
    from bench.convergence.run import PRESETS, TASK

    return training.load_task(TASK, **PRESETS[name]["task_options"])


def long(**options: Any) -> training.Task:
    return _preset("long")


def full(**options: Any) -> training.Task:
    return _preset("full")


def large(**options: Any) -> training.Task:
    return _preset("large")


def tiny(**options: Any) -> training.Task:
    return _preset("tiny")
