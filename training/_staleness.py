"""Staleness: how much a round's update counts when other peers' updates landed while it was computed.

Theory of operation
-------------------
A peer trains a round from θ_base (the state it materialized) and adds its update to whatever θ is by
the time the round ends. Meanwhile other peers' contributions keep landing, so the update was computed
against an older model: the classic delayed-gradient problem of asynchronous SGD. Define

    staleness s = contributions by *other* authors applied to the local state between the round's
                  materialize() and the moment its own contribution is made
                  (= version_vector.total at the end - version_vector.total at the start; the peer's
                  own contributions are not applied during its own round).

With N = expected_peers in lockstep, every other peer lands about one contribution per round, so
s ≈ N - 1 is *normal* and costs nothing. Only the excess e = max(0, s - (N - 1)) is lag, measured in
contributions; e / N is roughly "extra rounds behind". The update's weight is

    w(s) = 1                     if s <= N - 1
         = N / (N + e)           = 1 / (1 + e/N): half weight one extra round behind, a third at two
         = 0  (drop the round)   if s > max_staleness (default 4·N: about three rounds behind)

1/(1 + lag) is the staleness-dependent learning rate of Zhang et al. 2016 ("Staleness-aware Async-SGD",
lr / τ), shifted so lockstep peers are not penalized. It only depends on integers every peer can see in
the contribution record (the weight is signed into it), so the merged state stays deterministic: the
weight is decided once, by the author, and every replica multiplies by the same float.

Rejected: measuring staleness in wall time (not reproducible, clock skew); returning a dropped round's
update to the error-feedback residual (it would be re-sent later, just as stale); rescaling the outer
momentum (it is per peer and already damped by the outer step; keeping it untouched keeps restarts exact).

This module is pure (no torch) so the daemon can evaluate it in its own process after a round returns.
"""

import dataclasses

DEFAULT_MAX_STALENESS_ROUNDS = 4  # auto bound: 4·N contributions ≈ 3 rounds of lag beyond lockstep


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StalenessPolicy:
    """The author's rule for weighting a round by its staleness (from DilocoConfig)."""

    expected_peers: int
    """N: in lockstep each of the other N - 1 peers lands one contribution per round (no penalty)."""
    max_staleness: int
    """Rounds with staleness above this are dropped (weight 0); >= N - 1."""

    def weight(self, staleness: int) -> float:
        """Multiplier for the round's update; 0.0 means "too stale, do not contribute this round"."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if staleness > self.max_staleness:
            return 0.0
        n = self.expected_peers
        excess = max(0, staleness - (n - 1))
        return n / (n + excess)


def default_max_staleness(expected_peers: int) -> int:
    return DEFAULT_MAX_STALENESS_ROUNDS * expected_peers
