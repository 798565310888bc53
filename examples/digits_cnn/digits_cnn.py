"""A small convolutional network on scikit-learn's bundled 8x8 handwritten digits (no download).

    [training]
    task = "examples/digits_cnn/digits_cnn.py:DigitsCNN"
    [task]
    channels = 32

A complete plug-in, every part of the contract written out (training/_task.py): a Config whose fields
are the [task] options, build_model, batches, loss and evaluate. The built-in "digits" task trains an
MLP on the same data; this one sees the images as images.

No BatchNorm: its running statistics are buffers, and only parameters are synced between peers (each
peer would keep its own statistics); GroupNorm normalizes per example and has nothing to sync.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from training import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, 1, 8, 8) float32 in [0, 1], y (B,) int64


class DigitsCNN:
    """8x8 digit classification with two 3x3 convolutions and a linear head."""

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        channels: int = 16
        """Channels of the first convolution; the second has twice as many."""
        groups: int = 4
        """GroupNorm groups; must divide channels."""
        val_fraction: float = 0.2
        """Share of the 1797 images held out for evaluate (the same split on every peer)."""
        split_seed: int = 0
        """Seed of the fixed train/validation permutation; must match across peers."""
        init_seed: int = 0
        """Seed of build_model's initialization (peers start from the genesis vector anyway)."""

        def __post_init__(self) -> None:
            if self.channels < 1 or self.groups < 1 or self.channels % self.groups:
                raise ConfigError(
                    f"task.channels must be a positive multiple of task.groups (got {self.channels} "
                    f"and {self.groups})"
                )
            if not 0.0 < self.val_fraction < 1.0:
                raise ConfigError(f"task.val_fraction must be in (0, 1) (got {self.val_fraction})")

    name = "digits-cnn"

    def __init__(self, config: "DigitsCNN.Config") -> None:
        self.config = c = config
        data = load_digits()  # ships inside scikit-learn
        self.x = torch.from_numpy((data.images / 16.0).astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8)
        self.y = torch.from_numpy(data.target.astype(np.int64))  # (N,)
        perm = np.random.default_rng(c.split_seed).permutation(len(self.y))
        n_val = round(len(self.y) * c.val_fraction)
        self.val_rows, self.train_rows = perm[:n_val], perm[n_val:]

    def default_diloco(self) -> dict[str, object]:
        """Tuned on 2-4 lockstep peers (tests/training/test_examples.py): outer SGD at lr 1 without
        momentum, as stdlib-lm (error feedback already carries memory), 10% sparse-q8."""
        return {"inner_steps": 20, "batch_size": 32, "inner_lr": 3e-3, "outer_lr": 1.0, "outer_momentum": 0.0,
                "topk_density": 0.1}

    def build_model(self) -> nn.Module:
        c = self.config
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(c.init_seed)
            return nn.Sequential(
                nn.Conv2d(1, c.channels, 3, padding=1),  # (B, C, 8, 8)
                nn.GroupNorm(c.groups, c.channels),
                nn.GELU(),
                nn.Conv2d(c.channels, 2 * c.channels, 3, padding=1, stride=2),  # (B, 2C, 4, 4)
                nn.GELU(),
                nn.Flatten(),  # (B, 2C * 16)
                nn.Linear(2 * c.channels * 16, 10),  # (B, 10)
            )

    def batches(
        self, shard: int, num_shards: int, *, seed: int, batch_size: int, start: int = 0
    ) -> Iterator[Batch]:
        """Epochs of shuffled batches; batch i depends only on (seed, shard, i), so `start` skips in O(1)."""
        rows = self.train_rows[shard::num_shards]
        if len(rows) == 0:
            raise ConfigError(f"{num_shards} shards leave shard {shard} of the digits empty")
        per_epoch = max(1, len(rows) // batch_size)
        step = start
        while True:
            epoch, pos = divmod(step, per_epoch)
            order = np.random.default_rng([seed, shard, epoch]).permutation(rows)
            order = np.resize(order, per_epoch * batch_size)  # wraps when batch_size > len(rows)
            pick = torch.from_numpy(order[pos * batch_size : (pos + 1) * batch_size])
            yield self.x[pick], self.y[pick]
            step += 1

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = next(model.parameters()).device
        return F.cross_entropy(model(batch[0].to(device)).float(), batch[1].to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        rows = torch.from_numpy(self.val_rows)
        x, y = self.x[rows].to(device), self.y[rows].to(device)
        logits = model(x).float()  # (N_val, 10)
        return {
            "val_loss": F.cross_entropy(logits, y).item(),
            "val_accuracy": (logits.argmax(-1) == y).float().mean().item(),
        }
