"""`check_task`: try a task the way the daemon will use it, and say in plain words what would break.

Theory of operation
-------------------
A plug-in's mistakes show up late and far away in a mesh: a model whose parameter order differs
between two builds merges garbage into every peer's state; a `batches` that ignores its seed makes
every peer train on the same examples; a BatchNorm's running statistics silently never sync. The
checks below run in one process in a few seconds (`meshtrain task check` wraps them) and each failure
becomes a Problem: which check, what is wrong, how to fix it. Checks stop early only when later ones
cannot run (no task, no model); otherwise every problem is reported at once.

The checks, in order: the task loads with its options; `build_model` twice gives the same parameter
names, shapes, dtypes and order; `batches` is deterministic, differs across seeds and across shards,
and honours `start`; `loss` is a finite 0-dim tensor with a gradient for every parameter; a few real
inner steps of PeerTrainer run (through the configured optimizer, schedule and codec) without
changing any buffer; `evaluate` returns a dict of finite numbers with "val_loss".

Rejected: checking that two peers converge (minutes, not seconds; tests/examples do it per task).
"""

import dataclasses
import inspect
import itertools
import math
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training._config import DilocoConfig
from training._diloco import PeerTrainer
from training._errors import ConfigError, TaskNotFoundError, TrainingError
from training._params import flatten_params
from training._task import Task, load_task

CHECK_STEPS = 2  # inner steps of the training check: enough to step the optimizer twice
CHECK_BATCHES = 3  # batches compared per stream
LIBRARY_DIRS = tuple(str(Path(f).parent) for f in (torch.__file__, np.__file__, __file__))  # not plug-ins


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """One thing wrong with a task, in words a plug-in author can act on."""

    check: str
    """Which check found it: load, build_model, batches, loss, train or evaluate."""
    what: str
    """What is wrong."""
    fix: str
    """How to fix it."""

    def __str__(self) -> str:
        return f"[{self.check}] {self.what}\n    fix: {self.fix}"


def _err(e: BaseException) -> str:
    """'Type: message (at file:line)', at the innermost frame outside torch, numpy and training:
    where the plug-in went wrong."""
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(LIBRARY_DIRS)
    ]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _same(a: Any, b: Any) -> bool:
    """Structural equality of batches: tensors and arrays by dtype, shape and values."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def check_task(
    name: str, options: Mapping[str, Any] | None = None, *, diloco: Mapping[str, Any] | None = None
) -> list[Problem]:
    """Load task `name` with `options` (the [task] table) and check it; [] means no problem found.

    `diloco` overrides the [diloco] settings of the training check (the task's defaults otherwise;
    inner_steps is CHECK_STEPS unless given).
    """
    try:
        task = load_task(name, **dict(options or {}))
    except (TaskNotFoundError, ConfigError) as e:
        return [Problem(check="load", what=str(e), fix="fix the task name or the option it names")]
    except Exception as e:
        return [Problem(check="load", what=f"the task factory raised {_err(e)}", fix="fix the factory")]
    try:
        config = DilocoConfig.for_task(task, {"inner_steps": CHECK_STEPS, **dict(diloco or {})})
    except Exception as e:
        return [Problem(check="load", what=f"DiLoCo settings: {_err(e)}", fix="fix default_diloco()")]
    problems = _check_models(task)
    if problems:
        return problems
    problems += _check_batches(task, config.batch_size)
    if not problems:
        problems += _check_loss(task, config.batch_size)
    if not problems:
        problems += _check_training(task, config)
    return problems


def _check_models(task: Task) -> list[Problem]:
    try:
        a, b = task.build_model(), task.build_model()
    except Exception as e:
        return [Problem(check="build_model", what=f"build_model raised {_err(e)}", fix="fix build_model")]
    if not isinstance(a, torch.nn.Module):
        return [Problem(check="build_model", what=f"build_model returned {type(a).__name__}",
                        fix="return a torch.nn.Module")]
    layout = [[(n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()] for m in (a, b)]
    if not layout[0]:
        return [Problem(check="build_model", what="the model has no parameters", fix="give it some")]
    if layout[0] != layout[1]:
        i = next((i for i, (x, y) in enumerate(zip(*layout, strict=False)) if x != y), min(map(len, layout)))
        first, second = (lay[i] if i < len(lay) else "nothing" for lay in layout)
        return [Problem(
            check="build_model",
            what=f"two calls to build_model gave different parameters: #{i} is {first} then {second}",
            fix="build the same architecture every time (peers exchange one flat vector in parameter "
            "order): no randomness or environment lookups in the architecture",
        )]
    if any(not dtype.is_floating_point for _, _, dtype in layout[0]):
        return [Problem(check="build_model", what="the model has non-floating-point parameters",
                        fix="register integer state as a buffer, not a parameter")]
    return []


def _stream(task: Task, shard: int, num_shards: int, seed: int, batch_size: int, **kw: Any) -> list[Any]:
    stream = task.batches(shard, num_shards, seed=seed, batch_size=batch_size, **kw)
    return list(itertools.islice(stream, CHECK_BATCHES))


def _check_batches(task: Task, batch_size: int) -> list[Problem]:
    try:
        first, again = (_stream(task, 0, 1, 0, batch_size) for _ in range(2))
        other_seed = _stream(task, 0, 1, 1, batch_size)
        shards = [_stream(task, s, 2, 0, batch_size) for s in range(2)]
    except Exception as e:
        return [Problem(check="batches", what=f"batches raised {_err(e)}", fix="fix batches")]
    problems = []
    if len(first) < CHECK_BATCHES:
        problems.append(Problem(check="batches", what=f"the stream ended after {len(first)} batches",
                                fix="make batches infinite: loop over epochs"))
    if not _same(first, again):
        problems.append(Problem(
            check="batches", what="two calls with the same arguments gave different batches",
            fix="derive every random choice from (seed, shard, position), e.g. "
            "np.random.default_rng([seed, shard, epoch]); never use the global RNG",
        ))
    elif _same(first, other_seed):
        problems.append(Problem(
            check="batches", what="seeds 0 and 1 give the same batches: every peer streams the whole "
            "training set, so all of them would train on the same examples in the same order",
            fix="shuffle with the seed, e.g. np.random.default_rng([seed, shard, epoch]).permutation(...)",
        ))
    if _same(shards[0], shards[1]):
        problems.append(Problem(
            check="batches", what="shards 0 and 1 of 2 give the same batches",
            fix="give each shard its own part of the training set, e.g. rows[shard::num_shards]",
        ))
    if "start" in inspect.signature(task.batches).parameters and not problems:
        try:
            resumed = _stream(task, 0, 1, 0, batch_size, start=2)[:1]
        except Exception as e:
            return [Problem(check="batches", what=f"batches(start=2) raised {_err(e)}", fix="fix start")]
        if not _same(resumed, first[2:3]):
            problems.append(Problem(
                check="batches", what="batches(..., start=2) does not begin with the stream's third batch",
                fix="make batch i depend only on (seed, shard, i) and begin at i = start "
                "(or drop the start parameter: the trainer then replays the stream)",
            ))
    return problems


def _check_loss(task: Task, batch_size: int) -> list[Problem]:
    model = task.build_model()
    try:
        loss = task.loss(model, _stream(task, 0, 1, 0, batch_size)[0])
    except Exception as e:
        return [Problem(check="loss", what=f"loss raised {_err(e)}", fix="fix loss")]
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        return [Problem(check="loss", what=f"loss returned {shape}, not a 0-dim tensor",
                        fix="return one scalar tensor, e.g. F.cross_entropy(...) or .mean()")]
    if not loss.requires_grad:
        return [Problem(check="loss", what="the loss has no gradient (requires_grad is False)",
                        fix="compute it from model(...) without .detach(), .item() or torch.no_grad()")]
    if not math.isfinite(loss.item()):
        return [Problem(check="loss", what=f"the loss of a fresh model is {loss.item()}",
                        fix="check the initialization and the loss (log of 0? division by 0?)")]
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    if unused:
        return [Problem(
            check="loss", what=f"{len(unused)} parameter(s) get no gradient: {', '.join(unused[:5])}",
            fix="use them in forward or remove them: every parameter is synced every round",
        )]
    return []


def _check_training(task: Task, config: DilocoConfig) -> list[Problem]:
    try:
        trainer = PeerTrainer(task, config)
        theta = flatten_params(trainer.model)
        buffers = [b.detach().clone() for b in trainer.model.buffers()]
        trainer.run_round(theta, fragment=0)
    except TrainingError as e:
        return [Problem(check="train", what=str(e), fix="lower diloco.inner_lr or check the loss")]
    except Exception as e:
        return [Problem(check="train", what=f"a training round raised {_err(e)}", fix="see the error")]
    problems = []
    if any(not _same(b, a.detach()) for b, a in zip(buffers, trainer.model.buffers(), strict=True)):
        problems.append(Problem(
            check="train", what="training changed a buffer (BatchNorm running statistics?); only "
            "parameters are synced, so every peer would keep its own",
            fix="use LayerNorm or GroupNorm, or keep buffers constant",
        ))
    try:
        metrics = trainer.evaluate(theta)
    except Exception as e:
        return [*problems, Problem(check="evaluate", what=f"evaluate raised {_err(e)}", fix="fix evaluate")]
    if not isinstance(metrics, dict) or "val_loss" not in metrics:
        return [*problems, Problem(check="evaluate", what=f"evaluate returned {metrics!r}",
                                   fix='return a dict with at least "val_loss"')]
    bad = {k: v for k, v in metrics.items() if type(v) not in (int, float) or not math.isfinite(v)}
    if bad:
        problems.append(Problem(check="evaluate", what=f"metrics that are not finite numbers: {bad!r}",
                                fix="return Python floats (tensor.item()), never NaN or inf"))
    return problems
