"""Flat parameter vectors: the bridge between a torch model and crdt's float32 model vector.

The order is `model.parameters()` order (registration order, tied weights counted once), which is fixed
by the task's `build_model()`; every peer builds the same model, so every peer agrees on the layout.
Only parameters travel: tasks must not keep *trained* state in buffers (no BatchNorm running stats; use
LayerNorm), because buffers are not part of the CRDT state.

Fragments are contiguous, near-equal slices of the flat vector (`np.linspace` cut points). Rejected:
cutting at parameter boundaries. It reads nicer but makes fragment sizes lopsided whenever one tensor
(an embedding table) dominates, and streaming sync wants each round to cost about the same bytes.
"""

import itertools
import warnings

import numpy as np
import torch

from training._errors import ConfigError


def num_params(model: torch.nn.Module) -> int:
    """D: the length of the flat vector for `model`."""
    return sum(p.numel() for p in model.parameters())


def flatten_params(model: torch.nn.Module, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Copy entries [start, stop) of the model's flat parameter vector (default: all D) into one new
    float32 numpy vector on the CPU; only the parameters that overlap the range are read."""
    stop = num_params(model) if stop is None else stop
    out = np.empty(stop - start, dtype=np.float32)
    dst, offset = torch.from_numpy(out), 0
    with torch.no_grad():
        for p in model.parameters():
            a, b = max(start, offset), min(stop, offset + p.numel())
            if a < b:  # copy_ converts dtype and moves from the device: no intermediate copy
                dst[a - start : b - start].copy_(p.detach().reshape(-1)[a - offset : b - offset])
            offset += p.numel()
    return out


def load_flat_params(model: torch.nn.Module, vec: np.ndarray) -> None:
    """Overwrite the model's parameters in place from a flat vector (inverse of `flatten_params`).

    `vec` is only read, never copied when it is C-contiguous float32: it may be a read-only view of
    shared memory handed over by another process.

    Raises:
        ConfigError: `vec` is not 1-D with exactly D entries.
    """
    d = num_params(model)
    if vec.ndim != 1 or vec.shape[0] != d:
        raise ConfigError(f"flat params: expected a 1-D vector of length {d}, got shape {vec.shape}")
    with warnings.catch_warnings():  # torch warns that a read-only array is not writable; we only read it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        src = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))  # copy_ moves to p's device and dtype
            offset += n


def fragment_ranges(model: torch.nn.Module, num_fragments: int) -> tuple[tuple[int, int], ...]:
    """Split 0..D into `num_fragments` contiguous, non-empty, near-equal [start, stop) ranges.

    Raises:
        ConfigError: num_fragments < 1 or > D.
    """
    d = num_params(model)
    if not 1 <= num_fragments <= d:
        raise ConfigError(f"num_fragments must be in [1, {d}] for this model, got {num_fragments}")
    cuts = np.linspace(0, d, num_fragments + 1).round().astype(np.int64)
    return tuple((int(a), int(b)) for a, b in itertools.pairwise(cuts))
