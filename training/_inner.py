"""The inner loop of a DiLoCo round: the optimizer, its learning-rate schedule, H local steps.

Theory of operation
-------------------
Each round runs H = inner_steps optimizer steps from the global parameters. A step averages the
gradients of `grad_accum` micro-batches (loss / grad_accum per backward), clips their global norm, and
steps at lr = initial_lr x lr_factor(global inner step), where lr_factor is the warm-up + cosine
schedule of training/_config.py. `initial_lr` is stored in each param group when the optimizer is
built (torch's own scheduler convention), so the optimizer's state_dict carries it across restarts
and a task's own optimizer is scheduled the same way, group by group.

Grouping rule (nanoGPT): weight decay on tensors with dim >= 2 (matrices, embeddings), never on
biases and norm gains. On CUDA AdamW runs fused: one kernel per step and no foreach temporaries
(torch's CUDA default, foreach, allocates intermediates the size of all parameters).

Rejected: torch.optim.lr_scheduler (LambdaLR keeps its own step counter in a second state_dict that
must be saved and restored in lockstep with ours; a pure function of the persisted step cannot drift).
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from training._config import DilocoConfig
from training._errors import TrainingError


def lr_factor(step: int, config: DilocoConfig) -> float:
    """Multiplier of inner_lr at global inner step `step` (0-based): linear warm-up, cosine to the floor."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if not config.total_steps:
        return 1.0
    if step >= config.total_steps:
        return config.min_lr_ratio
    progress = (step - config.warmup_steps) / (config.total_steps - config.warmup_steps)  # in [0, 1)
    return config.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - config.min_lr_ratio)


def build_inner_optimizer(
    model: torch.nn.Module, config: DilocoConfig, *, task: Any = None
) -> torch.optim.Optimizer:
    """The task's `build_optimizer(model, config)` if it has one, else config.inner_optimizer.

    Raises:
        TrainingError: the task's build_optimizer returned something that is not a torch Optimizer.
    """
    if task is not None and hasattr(task, "build_optimizer"):
        optimizer = task.build_optimizer(model, config)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TrainingError(
                f"task {task.name!r}: build_optimizer returned {type(optimizer).__name__}, "
                "not a torch.optim.Optimizer"
            )
    else:
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.inner_weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if config.inner_optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=config.inner_lr, momentum=config.inner_momentum)
        else:
            fused = all(p.device.type == "cuda" for p in params) or None
            optimizer = torch.optim.AdamW(groups, lr=config.inner_lr, betas=config.inner_betas, fused=fused)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def inner_loop(
    model: torch.nn.Module,
    task: Any,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    *,
    steps: int,
    grad_clip: float,
    grad_accum: int = 1,
    lr_factors: Sequence[float] | None = None,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> float:
    """Run `steps` optimizer steps of `task.loss`, each over `grad_accum` micro-batches; return the mean
    micro-batch loss. `lr_factors[i]` scales every group's initial_lr at step i (None: no schedule).

    Raises:
        TrainingError: the task's batch stream ended (it must be infinite).
    """
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    for i in range(steps):
        if lr_factors is not None:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factors[i]
        for _ in range(grad_accum):
            batch = next(batches, None)
            if batch is None:
                raise TrainingError(f"task {task.name!r}: batches() ended; the stream must be infinite")
            with autocast or contextlib.nullcontext():
                loss = task.loss(model, batch)
            (loss / grad_accum).backward()
            total += loss.detach().float()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients until the next backward
    return total.item() / (steps * grad_accum)  # the round's only CPU-GPU sync point
