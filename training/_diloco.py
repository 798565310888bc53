"""DiLoCo for one peer: H local AdamW steps, an outer Nesterov step on the pseudo-gradient, compression.

Theory of operation
-------------------
Every peer holds the same global vector θ (crdt's materialized model). One round on one peer:

    θ_local = AdamW^H(θ, own shard)                  inner loop (AdamW state persists across rounds)
    Δ       = θ[f] - θ_local[f]                      pseudo-gradient, fragment f only
    m[f]    = μ·m[f] + Δ                             per-peer outer Nesterov momentum, per fragment
    update  = -(outer_lr / expected_peers)·(Δ + μ·m[f])
    u       = update + r[f]                          error feedback
    sent    = decode(encode(topk(u)))                exactly what every peer will add
    r[f]    = u - sent                               top-k *and* quantization error carried forward

The caller adds `sent` (the decoded payload, times `weight` = 1.0) to θ[f]. Momentum is linear, so the
sum of N peers' updates equals one Nesterov step of lr `outer_lr` on the *mean* pseudo-gradient when N =
expected_peers and peers are in lockstep: N peers take one outer step per round together (tested
against a centralized reference). With more or fewer peers than expected the outer step scales by
N / expected_peers; that is the knob to set, not a bug.

Streaming fragments: each round syncs the fragment the caller names (e.g. round % F). Every round starts
from the *global* θ for all fragments, and the local progress on the other fragments is dropped.
Rejected: keeping unsent local progress (Streaming DiLoCo's local/global mixing), because θ on those
fragments has meanwhile moved by other peers' contributions and merging the two needs a mixing rule
with its own tuning; resetting is simple and exactly correct. The inner steps still train all
parameters jointly, so the synced fragment's Δ reflects the whole model's progress. Momentum and
residuals are per fragment (slices of D-length vectors) and only change when their fragment syncs.

Devices: "auto" picks CUDA when available; bf16 autocast on CUDA devices that support it (`amp`).
Parameters, AdamW state and the outer state stay float32; the outer math runs in numpy on the CPU.
"""

import contextlib
import copy
import dataclasses
import inspect
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

import crdt
from training._errors import ConfigError, TrainingError
from training._params import flatten_params, fragment_ranges, load_flat_params, num_params
from training._staleness import StalenessPolicy, default_max_staleness
from training._task import Task

logger = logging.getLogger(__name__)

CODECS: tuple[str, ...] = crdt.CODECS  # the payload codecs every peer can decode
DEVICES = ("auto", "cpu", "cuda")
STATE_VERSION = 1  # bump when state_dict's layout changes


# ---------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DilocoConfig:
    """Knobs of one peer's DiLoCo loop. Must match across peers except device/torch_threads/seed."""

    inner_steps: int = 50
    """H: local AdamW steps per round. Larger H = less communication per unit of compute."""
    inner_lr: float = 1e-3
    """AdamW learning rate of the inner loop."""
    inner_weight_decay: float = 0.01
    """AdamW decoupled weight decay of the inner loop."""
    batch_size: int = 32
    """Examples (sequences for LM tasks) per inner step."""
    grad_clip: float = 1.0
    """Clip the inner gradient's global L2 norm to this; 0 disables clipping."""
    outer_lr: float = 0.7
    """Outer (Nesterov SGD) learning rate applied to the mean pseudo-gradient (DiLoCo paper: 0.7)."""
    outer_momentum: float = 0.9
    """μ of the outer Nesterov momentum (DiLoCo paper: 0.9); 0 gives plain outer SGD."""
    codec: str = "sparse-q8"
    """crdt payload codec; "dense-f32" turns compression off and "dense-bf16" keeps only the rounding
    (no top-k for either: topk_density is ignored)."""
    topk_density: float = 0.02
    """Fraction of the fragment's entries sent per round by sparse codecs (error feedback keeps the rest)."""
    num_fragments: int = 1
    """F: contiguous fragments the model is split into; one is synced per round. Must match genesis."""
    expected_peers: int = 1
    """N used to scale each peer's update by 1/N, so N peers together take one outer step per round."""
    seed: int = 0
    """Seed of this peer's data order (combined with the shard index by the task)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu" or "cuda"."""
    amp: bool = True
    """bf16 autocast for the inner loop and evaluation on CUDA devices that support it; no-op on CPU."""
    torch_threads: int | None = None
    """If set, torch.set_num_threads(n) at trainer construction (process-wide; e.g. 1 on a 2-core box)."""
    max_staleness: int = 0
    """Drop a round when more than this many other peers' contributions landed during it (see
    training/_staleness.py); 0 = auto, 4 x expected_peers."""

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "DilocoConfig":
        """Build from a TOML table / dict; unknown keys raise ConfigError (not TypeError) naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"DilocoConfig: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    @classmethod
    def for_task(cls, task: Task, options: Mapping[str, Any]) -> "DilocoConfig":
        """`from_dict` over the task's own defaults: {**task.default_diloco(), **options}.

        A task may define `default_diloco() -> dict` (settings tuned for it); explicit options win.
        """
        defaults = task.default_diloco() if hasattr(task, "default_diloco") else {}
        return cls.from_dict({**defaults, **options})

    @property
    def staleness_policy(self) -> StalenessPolicy:
        return StalenessPolicy(
            expected_peers=self.expected_peers,
            max_staleness=self.max_staleness or default_max_staleness(self.expected_peers),
        )

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"DilocoConfig.{field} {why}, got {getattr(self, field)!r}")

        if self.inner_steps < 1:
            raise bad("inner_steps", "must be >= 1")
        if not (self.inner_lr > 0 and math.isfinite(self.inner_lr)):
            raise bad("inner_lr", "must be a finite number > 0")
        if not self.inner_weight_decay >= 0:
            raise bad("inner_weight_decay", "must be >= 0")
        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if not self.grad_clip >= 0:
            raise bad("grad_clip", "must be >= 0 (0 disables)")
        if not (self.outer_lr > 0 and math.isfinite(self.outer_lr)):
            raise bad("outer_lr", "must be a finite number > 0")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise bad("outer_momentum", "must be in [0, 1)")
        if self.codec not in CODECS:
            raise bad("codec", f"must be one of {CODECS}")
        if not 0.0 < self.topk_density <= 1.0:
            raise bad("topk_density", "must be in (0, 1]")
        if self.num_fragments < 1:
            raise bad("num_fragments", "must be >= 1")
        if self.expected_peers < 1:
            raise bad("expected_peers", "must be >= 1")
        if self.device not in DEVICES:
            raise bad("device", f"must be one of {DEVICES}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise bad("torch_threads", "must be >= 1 or None")
        if self.max_staleness != 0 and self.max_staleness < self.expected_peers - 1:
            raise bad("max_staleness", "must be 0 (auto) or >= expected_peers - 1 (lockstep is not stale)")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RoundResult:
    """One round's contribution. Apply as θ[start:stop][indices] += weight * values, where
    (indices, values) = crdt.decode_payload(codec, stop - start, payload) and (start, stop) is the
    fragment's range."""

    fragment: int
    codec: str
    payload: bytes
    """crdt-encoded update for the fragment (indices relative to the fragment start)."""
    weight: float
    """Multiplier for the decoded values: 1.0 (1/expected_peers and outer_lr are baked in) before the
    daemon applies the staleness weight."""
    train_loss: float
    """Mean inner-loop training loss over this round's H steps."""
    update_norm: float
    """L2 norm of the decoded update actually sent."""
    residual_norm: float
    """L2 norm of the fragment's error-feedback residual after this round."""
    density: float
    """Fraction of the fragment's entries present in the payload (1.0 for the dense codecs)."""
    payload_bytes: int
    staleness_policy: StalenessPolicy
    """The author's staleness rule: the daemon sets the contribution's weight to
    `weight * staleness_policy.weight(s)` once it knows s (and skips the round when that is 0)."""


# ------------------------------------------------------------------------------------- pure pieces


def inner_loop(
    model: torch.nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    *,
    steps: int,
    grad_clip: float,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> float:
    """Run `steps` optimizer steps of `task.loss` on `batches`; return the mean loss."""
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    for batch in itertools.islice(batches, steps):
        with autocast or contextlib.nullcontext():
            loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.detach().float()
    return total.item() / steps  # the round's only CPU-GPU sync point


def outer_update(
    delta: np.ndarray, momentum: np.ndarray, *, outer_lr: float, outer_momentum: float, expected_peers: int
) -> np.ndarray:
    """Nesterov step on pseudo-gradient `delta`, as an additive update; updates `momentum` in place.

    Matches torch.optim.SGD(nesterov=True, lr=outer_lr/expected_peers) applied to one peer's Δ.
    """
    momentum *= outer_momentum
    momentum += delta
    step = delta + outer_momentum * momentum
    return (-(outer_lr / expected_peers) * step).astype(np.float32)


class Compressed(NamedTuple):
    payload: bytes
    """crdt-encoded payload."""
    sent: np.ndarray
    """(n,) float32: the decoded update, dense; exactly what every receiver adds."""
    indices: np.ndarray
    """(k,) uint32: the slots present in the payload: entries, or DCT coefficients for dct-q8 (a quantized
    value may still be 0)."""


def compress(u: np.ndarray, *, codec: str, density: float) -> Compressed:
    """Encode top-k(u) (all of u for the dense codecs, top-k of its DCT coefficients for dct-q8) and
    decode it back.

    `u - sent` is the exact error-feedback residual (top-k drop plus quantization error).
    """
    n = u.shape[0]
    if codec in crdt.DENSE_CODECS:
        payload = crdt.encode_payload(codec, n, None, u.astype(np.float32))
        kept = np.arange(n, dtype=np.uint32)
    else:
        # top-k of the entries, or of the DCT coefficients (DeMo): same k, so the same payload size
        x = crdt.dct_coefficients(u) if codec in crdt.TRANSFORM_CODECS else u
        k = min(x.shape[0], max(1, math.ceil(density * n)))
        kept = np.sort(np.argpartition(np.abs(x), x.shape[0] - k)[x.shape[0] - k :]).astype(np.uint32)
        payload = crdt.encode_payload(codec, n, kept, x[kept].astype(np.float32))
    dec_idx, dec_vals = crdt.decode_payload(codec, n, payload)
    sent = np.zeros(n, dtype=np.float32)
    sent[dec_idx.astype(np.int64)] = dec_vals
    return Compressed(payload, sent, kept)


def build_inner_optimizer(model: torch.nn.Module, config: DilocoConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices/embeddings (dim >= 2) only, never on biases or norms (nanoGPT)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.inner_weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.inner_lr)


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DilocoConfig.device is 'cuda' but torch.cuda.is_available() is False")
    return torch.device(name)


# ------------------------------------------------------------------------------------------ trainer


class PeerTrainer:
    """One peer's DiLoCo state (model, inner AdamW, outer momentum, residuals, data position)."""

    def __init__(self, task: Task, config: DilocoConfig, *, shard: int, num_shards: int) -> None:
        if not 0 <= shard < num_shards:
            raise ConfigError(f"PeerTrainer: shard must be in [0, num_shards={num_shards}), got {shard}")
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.task, self.config, self.shard, self.num_shards = task, config, shard, num_shards
        self.device = resolve_device(config.device)
        self.model = task.build_model().to(self.device)
        self.dim = num_params(self.model)
        self.fragments = fragment_ranges(self.model, config.num_fragments)
        self.optimizer = build_inner_optimizer(self.model, config)
        self.momentum = np.zeros(self.dim, dtype=np.float32)  # per-fragment slices of outer momentum
        self.residual = np.zeros(self.dim, dtype=np.float32)  # per-fragment error-feedback residuals
        self.batches_consumed = 0
        self.rounds = 0
        self._batches: Iterator[Any] | None = None
        use_amp = config.amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self._amp = use_amp
        logger.info(
            "PeerTrainer task=%s shard=%d/%d device=%s amp=%s params=%d fragments=%d config=%s",
            task.name, shard, num_shards, self.device, use_amp, self.dim, len(self.fragments), config,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _data(self) -> Iterator[Any]:
        if self._batches is None:
            c, n = self.config, self.batches_consumed
            kw: dict[str, Any] = {"seed": c.seed, "batch_size": c.batch_size}
            if "start" in inspect.signature(self.task.batches).parameters:
                self._batches = self.task.batches(self.shard, self.num_shards, start=n, **kw)
            else:  # plug-in without O(1) skipping: replay the stream
                self._batches = self.task.batches(self.shard, self.num_shards, **kw)
                next(itertools.islice(self._batches, n, n), None)
        return self._batches

    def _check_params(self, global_params: np.ndarray) -> None:
        if global_params.dtype != np.float32 or global_params.shape != (self.dim,):
            raise ConfigError(
                f"global_params must be float32 of shape ({self.dim},), "
                f"got {global_params.dtype} {global_params.shape}"
            )

    def run_round(self, global_params: np.ndarray, *, fragment: int) -> RoundResult:
        """Train H inner steps from θ = global_params and return the update for `fragment`.

        Raises:
            ConfigError: wrong vector shape/dtype or fragment index.
            TrainingError: the inner loop diverged (non-finite pseudo-gradient). Outer momentum and
                residuals are untouched; the inner AdamW moments are reset (they hold NaN/inf by then)
                and the data position moves on, so the next round restarts cleanly from global θ.
        """
        self._check_params(global_params)
        if not 0 <= fragment < len(self.fragments):
            raise ConfigError(f"fragment must be in [0, {len(self.fragments)}), got {fragment}")
        c = self.config
        load_flat_params(self.model, global_params)
        try:
            train_loss = inner_loop(
                self.model, self.task, self.optimizer, self._data(),
                steps=c.inner_steps, grad_clip=c.grad_clip, autocast=self._autocast(),
            )
        except BaseException:
            self._batches = None  # stream position unknown now: re-create it at batches_consumed
            raise
        self.batches_consumed += c.inner_steps
        start, stop = self.fragments[fragment]
        delta = global_params[start:stop] - flatten_params(self.model)[start:stop]  # (n,) pseudo-gradient
        if not np.all(np.isfinite(delta)):
            self.optimizer = build_inner_optimizer(self.model, c)
            raise TrainingError(f"round {self.rounds}: non-finite pseudo-gradient (train_loss={train_loss})")
        momentum = self.momentum[start:stop].copy()  # commit state only after everything succeeded
        update = outer_update(
            delta, momentum, outer_lr=c.outer_lr, outer_momentum=c.outer_momentum,
            expected_peers=c.expected_peers,
        )
        u = update + self.residual[start:stop]  # (n,)
        payload, sent, indices = compress(u, codec=c.codec, density=c.topk_density)
        self.momentum[start:stop] = momentum
        self.residual[start:stop] = u - sent
        self.rounds += 1
        return RoundResult(
            fragment=fragment, codec=c.codec, payload=payload, weight=1.0, train_loss=train_loss,
            update_norm=float(np.linalg.norm(sent)), residual_norm=float(np.linalg.norm(u - sent)),
            density=len(indices) / (stop - start), payload_bytes=len(payload),
            staleness_policy=c.staleness_policy,
        )

    def evaluate(self, global_params: np.ndarray) -> dict[str, float]:
        """The task's held-out metrics for θ = global_params (the model is reloaded each round anyway)."""
        self._check_params(global_params)
        load_flat_params(self.model, global_params)
        self.model.eval()
        try:
            with self._autocast():
                return self.task.evaluate(self.model)
        finally:
            self.model.train()

    # ------------------------------------------------------------------------------------- restarts

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this peer bit-for-bit (torch.save-able). Not θ: that is crdt's."""
        return {
            "version": STATE_VERSION,
            "dim": self.dim,
            "num_fragments": len(self.fragments),
            "momentum": torch.from_numpy(self.momentum.copy()),
            "residual": torch.from_numpy(self.residual.copy()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not live tensors
            "batches_consumed": self.batches_consumed,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`. Raises ConfigError if it was made for another model/config."""
        expected = {"version": STATE_VERSION, "dim": self.dim, "num_fragments": len(self.fragments)}
        for key, want in expected.items():
            if state.get(key) != want:
                raise ConfigError(f"trainer state: {key}={state.get(key)!r}, this trainer needs {want!r}")
        self.momentum = state["momentum"].numpy().astype(np.float32, copy=True)
        self.residual = state["residual"].numpy().astype(np.float32, copy=True)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # torch aliases same-device tensors
        self.batches_consumed = int(state["batches_consumed"])
        self.rounds = int(state["rounds"])
        self._batches = None  # re-created at batches_consumed on the next round
