"""DilocoConfig: the `[diloco]` table, one peer's DiLoCo knobs, validated; and `resolve_device`.

Every field is documented below it; `__post_init__` raises ConfigError naming the key as written in
the config file ("diloco.warmup_steps ..."). Fields that must agree across peers (anything that shapes
the update: inner_steps, codec, num_fragments, expected_peers, ...) are the daemon's to compare; the
per-machine ones are device, amp, torch_threads and seed (each peer's own data order).

Inner learning-rate schedule (nanoGPT's): linear warm-up over `warmup_steps`, then cosine decay to
`min_lr_ratio x inner_lr` at `total_steps`, flat after. Steps are counted across rounds and persisted
with the trainer state, so a restarted peer resumes the schedule where it stopped. `total_steps = 0`
keeps the lr constant after warm-up (a run of unknown length, the default).

Rejected: a free-form `optimizer_options` dict handed to torch (hivemind's untyped `*_opts`): typos and
wrong types would surface as a torch TypeError on the first round, not as a named key at startup.
"""

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

import crdt
from training._errors import ConfigError
from training._options import build_config
from training._staleness import StalenessPolicy, default_max_staleness

CODECS: tuple[str, ...] = crdt.CODECS  # the payload codecs every peer can decode
INNER_OPTIMIZERS = ("adamw", "sgd")  # torch.optim.AdamW / SGD with momentum; a task may bring its own
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # torch's spelling; "auto" = CUDA if present
SECTION = "diloco"  # the config table; errors name "diloco.<key>"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DilocoConfig:
    """Knobs of one peer's DiLoCo loop. Must match across peers except device/amp/torch_threads/seed."""

    inner_steps: int = 50
    """H: local optimizer steps per round. Larger H = less communication per unit of compute."""
    inner_optimizer: str = "adamw"
    """"adamw" (torch.optim.AdamW) or "sgd" (torch.optim.SGD with inner_momentum); a task's own
    build_optimizer(model, config), when it has one, replaces this."""
    inner_lr: float = 1e-3
    """Peak learning rate of the inner optimizer (reached after warm-up)."""
    inner_weight_decay: float = 0.01
    """Weight decay on matrices and embeddings (never biases or norms): decoupled for AdamW, L2 for SGD."""
    inner_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2); large language models usually train with (0.9, 0.95)."""
    inner_momentum: float = 0.9
    """SGD's momentum (heavy ball); unused by AdamW."""
    warmup_steps: int = 0
    """Inner steps of linear lr warm-up from inner_lr / warmup_steps to inner_lr (counted across rounds)."""
    total_steps: int = 0
    """Inner step at which the cosine decay reaches min_lr_ratio x inner_lr (counted across rounds, kept
    across restarts); 0 = constant lr after warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine's floor as a fraction of inner_lr (nanoGPT and Chinchilla: 0.1)."""
    batch_size: int = 32
    """Examples (sequences for LM tasks) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per inner step, gradients averaged: the step's batch is batch_size x grad_accum."""
    grad_clip: float = 1.0
    """Clip the inner gradient's global L2 norm to this; 0 disables clipping."""
    outer_lr: float = 0.7
    """Outer (Nesterov SGD) learning rate applied to the mean pseudo-gradient (DiLoCo paper: 0.7)."""
    outer_momentum: float = 0.9
    """μ of the outer Nesterov momentum (DiLoCo paper: 0.9); 0 gives plain outer SGD (and saves 4 bytes
    per parameter: no momentum buffer is kept)."""
    codec: str = "rice-q8"
    """crdt payload codec; "dense-f32" turns compression off and "dense-bf16" keeps only the rounding
    (no top-k for either: topk_density is ignored). rice-q8 sends sparse-q8's exact values with
    Rice-coded index gaps (a quarter fewer bytes); the q2 codecs halve that again but cost loss in
    training (bench/convergence full preset, 5 % top-k, H=10: +9.6 % vs DDP against sparse-q8's +1.4 %)."""
    topk_density: float = 0.02
    """Fraction of the fragment's entries sent per round by sparse codecs (error feedback keeps the rest);
    chunked codecs keep round(density x 64) of every 64 entries (larger chunks below 1/64)."""
    residual_decay: float = 1.0
    """β of the error feedback: the residual carried from the last round is multiplied by β before it joins
    this round's update (SparseLoCo's error-feedback momentum); 1 keeps all of it."""
    num_fragments: int = 1
    """F: contiguous fragments the model is split into; one is synced per round. Must match genesis."""
    expected_peers: int = 1
    """N used to scale each peer's update by 1/N, so N peers together take one outer step per round."""
    seed: int = 0
    """Seed of this peer's data order; the daemon derives it from the peer id (training.data_seed)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    amp: bool = True
    """bf16 autocast for the inner loop and evaluation on CUDA devices that support it; no-op on CPU."""
    torch_threads: int | None = None
    """If set, torch.set_num_threads(n) at trainer construction (process-wide; e.g. 1 on a 2-core box)."""
    max_staleness: int = 0
    """Drop a round when more than this many other peers' contributions landed during it (see
    training/_staleness.py); 0 = auto, 4 x expected_peers."""

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "DilocoConfig":
        """Build from a TOML table / dict; unknown keys and wrong types raise ConfigError naming the key."""
        return build_config(cls, options, section=SECTION)

    @classmethod
    def for_task(cls, task: Any, options: Mapping[str, Any]) -> "DilocoConfig":
        """`from_dict` over the task's own defaults: {**task.default_diloco(), **options}.

        A task may define `default_diloco() -> dict` (settings tuned for it); explicit options win.
        """
        defaults = task.default_diloco() if hasattr(task, "default_diloco") else {}
        return cls.from_dict({**defaults, **options})

    @property
    def staleness_policy(self) -> StalenessPolicy:
        return self.staleness_policy_for(self.expected_peers)

    def staleness_policy_for(self, peers: int) -> StalenessPolicy:
        """The staleness rule with ``peers`` training peers (the daemon passes the live count)."""
        return StalenessPolicy(
            expected_peers=peers, max_staleness=self.max_staleness or default_max_staleness(peers)
        )

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{SECTION}.{field} {why}, got {getattr(self, field)!r}")

        for field in ("inner_steps", "batch_size", "grad_accum", "num_fragments", "expected_peers"):
            if getattr(self, field) < 1:
                raise bad(field, "must be >= 1")
        for field in ("inner_lr", "outer_lr"):
            if not (getattr(self, field) > 0 and math.isfinite(getattr(self, field))):
                raise bad(field, "must be a finite number > 0")
        for field in ("inner_weight_decay", "grad_clip", "warmup_steps", "total_steps", "seed"):
            if not getattr(self, field) >= 0:
                raise bad(field, "must be >= 0")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise bad("inner_optimizer", f"must be one of {INNER_OPTIMIZERS}")
        if not all(0.0 <= b < 1.0 for b in self.inner_betas):
            raise bad("inner_betas", "must be two numbers in [0, 1)")
        for field in ("inner_momentum", "outer_momentum"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise bad(field, "must be in [0, 1)")
        if self.total_steps and self.total_steps <= self.warmup_steps:
            raise bad("total_steps", f"must be 0 (no decay) or > diloco.warmup_steps={self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if self.codec not in CODECS:
            raise bad("codec", f"must be one of {CODECS}")
        if not 0.0 < self.topk_density <= 1.0:
            raise bad("topk_density", "must be in (0, 1]")
        if not 0.0 <= self.residual_decay <= 1.0:
            raise bad("residual_decay", "must be in [0, 1]")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise bad("torch_threads", "must be >= 1 or absent")
        if self.max_staleness != 0 and self.max_staleness < self.expected_peers - 1:
            raise bad("max_staleness", "must be 0 (auto) or >= expected_peers - 1 (lockstep is not stale)")


def resolve_device(name: str) -> torch.device:
    """The torch device for a `diloco.device` value: "auto" is CUDA when available, else the CPU.

    Raises:
        ConfigError: CUDA asked for on a machine where torch sees none, or an index it does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{SECTION}.device is {name!r} but torch sees no CUDA device on this machine "
                "(torch.cuda.is_available() is False); use 'auto' to fall back to the CPU, or 'cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{SECTION}.device is {name!r} but this machine has {count} CUDA device(s)")
    return device
