"""The "digits" task: sklearn's bundled 8x8 handwritten digits, a small MLP. The fast test task.

1797 images, 10 classes, ships inside scikit-learn (no download). A fixed permutation (split_seed)
holds out `val_fraction` for validation; the rest is dealt round-robin to shards, so every shard sees
every class. Pixels are scaled to [0, 1]. Data lives on the CPU; `loss` moves batches to the model.

The images are read from scikit-learn's bundled ``datasets/data/digits.csv.gz`` (the file its
``load_digits`` parses) without importing scikit-learn: the import cost 1.9 s of CPU in every training
process start, the longest part after torch itself, and a test cluster starts four at once on two cores
(2026-12-02). Where the file is not at that place, ``load_digits`` is used.
"""

import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training._errors import ConfigError
from training._task import task_config_error

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, 64) float32, y (B,) int64


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 images as float64 pixels 0-16 (N, 64) and their int64 labels (N,), as scikit-learn's
    ``load_digits`` gives them."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or []:
        path = Path(root, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_load_digits

    data = sklearn_load_digits()
    return data.data, data.target.astype(np.int64)


class DigitsTask:
    """8x8 digits classification with an MLP."""

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        hidden: int = 128
        """Width of each of the two hidden layers (64 -> hidden -> hidden -> 10)."""
        val_fraction: float = 0.2
        """Share of the 1797 images held out for `evaluate` (same on every peer)."""
        split_seed: int = 0
        """Seed of the fixed train/val permutation; must match across peers."""
        init_seed: int = 0
        """Seed for build_model's init (peers start from the genesis vector anyway)."""

        def __post_init__(self) -> None:
            if self.hidden < 1:
                raise task_config_error("hidden", "must be >= 1", self.hidden)
            if not 0.0 < self.val_fraction < 1.0:
                raise task_config_error("val_fraction", "must be in (0, 1)", self.val_fraction)

    name = "digits"

    def __init__(self, config: "DigitsTask.Config | None" = None) -> None:
        self.config = config or DigitsTask.Config()
        pixels, labels = load_digits()
        x = torch.from_numpy((pixels / 16.0).astype(np.float32))  # (N, 64)
        y = torch.from_numpy(labels)  # (N,)
        perm = np.random.default_rng(self.config.split_seed).permutation(len(y))
        n_val = round(len(y) * self.config.val_fraction)
        self._val_idx, self._train_idx = perm[:n_val], perm[n_val:]
        self._x, self._y = x, y

    def build_model(self) -> torch.nn.Module:
        h = self.config.hidden
        nn = torch.nn
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(self.config.init_seed)
            return nn.Sequential(nn.Linear(64, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 10))

    def shard_indices(self, shard: int, num_shards: int) -> np.ndarray:
        """Training-row indices of one shard (round-robin over the fixed permutation)."""
        if not 0 <= shard < num_shards:
            raise ConfigError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
        idx = self._train_idx[shard::num_shards]
        if len(idx) == 0:
            raise ConfigError(f"num_shards={num_shards} leaves shard {shard} of digits empty")
        return idx

    def batches(
        self, shard: int, num_shards: int, *, seed: int, batch_size: int, start: int = 0
    ) -> Iterator[Batch]:
        """Epochs of shuffled batches (seeded per epoch, remainder dropped); `start` skips in O(1)."""
        idx = self.shard_indices(shard, num_shards)
        per_epoch = max(1, len(idx) // batch_size)
        step = start
        while True:
            epoch, pos = divmod(step, per_epoch)
            order = np.random.default_rng([seed, shard, epoch]).permutation(idx)
            order = np.resize(order, per_epoch * batch_size)  # wraps when batch_size > shard size
            rows = torch.from_numpy(order[pos * batch_size : (pos + 1) * batch_size])
            yield self._x[rows], self._y[rows]
            step += 1

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        device = next(model.parameters()).device
        x, y = batch[0].to(device), batch[1].to(device)
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        rows = torch.from_numpy(self._val_idx)
        x, y = self._x[rows].to(device), self._y[rows].to(device)
        logits = model(x).float()  # (N_val, 10)
        return {
            "val_loss": F.cross_entropy(logits, y).item(),
            "val_accuracy": (logits.argmax(-1) == y).float().mean().item(),
        }
