"""RoundResult: what a round hands the daemon (pure: no torch)."""

from __future__ import annotations

import dataclasses

from training._staleness import StalenessPolicy


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
