"""DiLoCo for one peer: H local optimizer steps, an outer Nesterov step on the pseudo-gradient, compression.

Theory of operation
-------------------
Every peer holds the same global vector θ (crdt's materialized model). One round on one peer:

    θ_local = AdamW^H(θ, own data)                   inner loop (training/_inner.py; state persists)
    Δ       = θ[f] - θ_local[f]                      pseudo-gradient, fragment f only
    m[f]    = μ·m[f] + Δ                             per-peer outer Nesterov momentum, per fragment
    update  = -(outer_lr / expected_peers)·(Δ + μ·m[f])
    u       = update + β·r[f]                        error feedback (β = residual_decay, 1 by default)
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
Parameters, AdamW state and the outer state stay float32; the outer math runs on the CPU, in place
(training/_outer.py: one D-sized float32 work vector per round beyond the persistent state).

Data: by default the peer streams the whole training set (shard 0 of 1) in its own order, seeded by
`config.seed`, which the daemon derives from the peer id (training/_assignment.py says why). The
position in that stream (batches consumed) and the schedule's inner step persist across restarts.
"""

import contextlib
import copy
import inspect
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from training._config import DilocoConfig, resolve_device
from training._errors import ConfigError, TrainingError
from training._inner import build_inner_optimizer, inner_loop, lr_factor
from training._outer import compress, outer_update
from training._params import flatten_params, fragment_ranges, load_flat_params, num_params
from training._result import RoundResult
from training._task import Task

logger = logging.getLogger(__name__)

STATE_VERSION = 1  # bump when state_dict's layout changes incompatibly (added keys get defaults)


# ---------------------------------------------------------------------------------------------- result


# ------------------------------------------------------------------------------------------ trainer


class PeerTrainer:
    """One peer's DiLoCo state (model, inner optimizer, outer momentum, residuals, data position)."""

    def __init__(self, task: Task, config: DilocoConfig, *, shard: int = 0, num_shards: int = 1) -> None:
        if not 0 <= shard < num_shards:
            raise ConfigError(f"PeerTrainer: shard must be in [0, num_shards={num_shards}), got {shard}")
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.task, self.config, self.shard, self.num_shards = task, config, shard, num_shards
        self.device = resolve_device(config.device)
        self.model = task.build_model().to(self.device)
        self.dim = num_params(self.model)
        self.fragments = fragment_ranges(self.model, config.num_fragments)
        self.optimizer = build_inner_optimizer(self.model, config, task=task)
        self.momentum = self._zeros_momentum()  # per-fragment slices of outer momentum (empty when μ = 0)
        self.residual = np.zeros(self.dim, dtype=np.float32)  # per-fragment error-feedback residuals
        self.batches_consumed = 0
        self.inner_step = 0  # global inner step: drives the lr schedule
        self.rounds = 0
        self._batches: Iterator[Any] | None = None
        self._amp = config.amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        logger.info(
            "PeerTrainer task=%s shard=%d/%d device=%s amp=%s params=%d fragments=%d config=%s",
            task.name, shard, num_shards, self.device, self._amp, self.dim, len(self.fragments), config,
        )

    def _zeros_momentum(self) -> np.ndarray:
        return np.zeros(self.dim if self.config.outer_momentum else 0, dtype=np.float32)

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

    def run_round(
        self, global_params: np.ndarray, *, fragment: int, peers: int | None = None
    ) -> RoundResult:
        """Train H inner steps from θ = global_params and return the update for `fragment`.

        `global_params` is only read (a read-only shared-memory view works) and never copied. `peers`: how
        many peers train now (the daemon counts them live); it sets the outer step's 1/N and the staleness
        rule. None: the configured `expected_peers`.

        Raises:
            ConfigError: wrong vector shape/dtype or fragment index.
            TrainingError: the inner loop diverged (non-finite pseudo-gradient). Outer momentum and
                residuals are untouched; the inner optimizer is rebuilt (its moments hold NaN/inf by
                then) and the data position moves on, so the next round restarts cleanly from global θ.
        """
        self._check_params(global_params)
        if not 0 <= fragment < len(self.fragments):
            raise ConfigError(f"fragment must be in [0, {len(self.fragments)}), got {fragment}")
        if peers is not None and peers < 1:
            raise ConfigError(f"peers must be >= 1, got {peers}")
        c = self.config
        n = peers or c.expected_peers
        load_flat_params(self.model, global_params)
        try:
            train_loss = inner_loop(
                self.model, self.task, self.optimizer, self._data(),
                steps=c.inner_steps, grad_clip=c.grad_clip, grad_accum=c.grad_accum,
                lr_factors=[lr_factor(self.inner_step + i, c) for i in range(c.inner_steps)],
                autocast=self._autocast(),
            )
        except BaseException:
            self._batches = None  # stream position unknown now: re-create it at batches_consumed
            raise
        self.batches_consumed += c.inner_steps * c.grad_accum
        self.inner_step += c.inner_steps
        start, stop = self.fragments[fragment]
        work = flatten_params(self.model, start, stop)  # (n,) θ_local: the round's one D-sized buffer
        delta = np.subtract(global_params[start:stop], work, out=work)  # pseudo-gradient, in place
        if not (np.isfinite(delta.min()) and np.isfinite(delta.max())):  # min/max propagate NaN and inf
            self.optimizer = build_inner_optimizer(self.model, c, task=self.task)
            raise TrainingError(f"round {self.rounds}: non-finite pseudo-gradient (train_loss={train_loss})")
        momentum = self.momentum[start:stop] if c.outer_momentum else None
        u = outer_update(
            delta, momentum, outer_lr=c.outer_lr, outer_momentum=c.outer_momentum,
            expected_peers=n,
        )  # the update, in place (momentum is committed here: nothing below fails on finite input)
        residual = self.residual[start:stop]
        if c.residual_decay != 1.0:
            residual *= c.residual_decay  # in place: it is overwritten below anyway
        u += residual
        payload, indices, values, kept = compress(u, codec=c.codec, density=c.topk_density)
        if len(indices) == len(u):  # dense codecs and dct-q8 decode every entry
            u -= values
        else:
            u[indices] -= values
        self.residual[start:stop] = u  # u - sent: the new residual
        self.rounds += 1
        return RoundResult(
            fragment=fragment, codec=c.codec, payload=payload, weight=1.0, train_loss=train_loss,
            update_norm=float(np.linalg.norm(values)), residual_norm=float(np.linalg.norm(u)),
            density=len(kept) / (stop - start), payload_bytes=len(payload),
            staleness_policy=c.staleness_policy_for(n),
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
        """Everything needed to resume this peer bit-for-bit (not θ: that is crdt's).

        Like torch's own state_dicts it holds references to the live buffers, not copies (a copy is 16
        bytes per parameter more at the moment of saving): serialize it (torch.save) before the next
        round. `load_state_dict` copies.
        """
        return {
            "version": STATE_VERSION,
            "dim": self.dim,
            "num_fragments": len(self.fragments),
            "momentum": torch.from_numpy(self.momentum),
            "residual": torch.from_numpy(self.residual),
            "optimizer": self.optimizer.state_dict(),
            "batches_consumed": self.batches_consumed,
            "inner_step": self.inner_step,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`. Raises ConfigError if it was made for another model/config."""
        expected = {"version": STATE_VERSION, "dim": self.dim, "num_fragments": len(self.fragments)}
        for key, want in expected.items():
            if state.get(key) != want:
                raise ConfigError(f"trainer state: {key}={state.get(key)!r}, this trainer needs {want!r}")
        momentum = state["momentum"].numpy()
        want = self._zeros_momentum().size  # a state saved with μ = 0 (or for μ = 0) restarts momentum
        fresh = momentum.size != want
        self.momentum = self._zeros_momentum() if fresh else momentum.astype(np.float32, copy=True)
        self.residual = state["residual"].numpy().astype(np.float32, copy=True)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # torch aliases same-device tensors
        self.batches_consumed = int(state["batches_consumed"])
        self.rounds = int(state["rounds"])
        self.inner_step = int(state.get("inner_step", self.rounds * self.config.inner_steps))  # older states
        self._batches = None  # re-created at batches_consumed on the next round
