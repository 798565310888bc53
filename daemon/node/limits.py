"""A token bucket that caps the bytes per second this node ships to peers, and the runtime limits object.

Theory of operation
-------------------
The bucket holds at most ``burst_bytes`` tokens and refills at ``rate`` bytes per second. Sending ``n``
bytes takes ``n`` tokens. When there are too few, the balance goes negative (debt) and the caller sleeps
until the refill has paid it back. Debt, rather than "wait until n tokens are there", has two virtues:

* a message larger than the burst still goes out (after a proportional wait) instead of never, and
* concurrent callers queue fairly without a lock: each one adds its size to the debt it sees, so the
  second of two simultaneous senders computes the longer wait. The long-run rate is exactly ``rate``.

Rejected: a lock-serialized leaky bucket (same rate, but a slow sender would hold up unrelated small
requests behind a lock), and shaping in p2p (the host has no limiter; the daemon knows which traffic is
bulk: sync responses carry contributions, everything else is small).

A rate of 0 means "no cap", so the limiter is always present and costs one comparison when unused.
The clock and the sleep are injectable so that tests run on a fake clock.

:class:`Limits` groups the knobs that ``POST /v1/limits`` and SIGHUP change at runtime: the bandwidth cap
(applied synchronously to the bucket) and the training threads (applied in the training child by a
background task of the node, between rounds, because the child answers one request at a time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Limits", "TokenBucket"]

log = logging.getLogger(__name__)

BURST_SECONDS = 1.0  # the bucket holds one second of traffic: smooth, yet a small response never waits


class TokenBucket:
    """Bytes-per-second cap with debt; ``rate_bytes_per_s == 0`` disables it."""

    def __init__(
        self,
        rate_bytes_per_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rate = 0.0
        self._tokens = 0.0
        self._stamp = clock()
        self.waited_s = 0.0
        """Total time callers spent waiting on the cap (for metrics)."""
        self.bytes_total = 0
        """Bytes that went through the bucket, capped or not."""
        self.set_rate(rate_bytes_per_s)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst_bytes(self) -> float:
        return self._rate * BURST_SECONDS

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change the cap now. Debt already incurred is kept (waiters already sleeping are not woken)."""
        if rate_bytes_per_s < 0:
            raise ValueError(f"rate must be >= 0 bytes/s, got {rate_bytes_per_s}")
        self._refill()
        self._rate = float(rate_bytes_per_s)
        self._tokens = min(self._tokens, self.burst_bytes) if self._rate else 0.0

    def _refill(self) -> None:
        now = self._clock()
        if self._rate:
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens; return how long the caller must wait before sending (0 when under the cap)."""
        self.bytes_total += n
        if not self._rate:
            return 0.0
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the cap."""
        delay = self.reserve(n)
        if delay > 0:
            self.waited_s += delay
            await self._sleep(delay)


class _Trainer(Protocol):
    async def set_threads(self, threads: int) -> None: ...


class Limits:
    """The runtime resource limits of one node: bandwidth cap and training threads."""

    def __init__(self, *, threads: int, bandwidth_bytes_per_s: int) -> None:
        self.bucket = TokenBucket(bandwidth_bytes_per_s)
        self.threads = threads
        """Threads wanted for the training child."""
        self.threads_applied = threads
        """Threads the child runs with (it starts with the configured value)."""
        self._threads_changed = asyncio.Event()

    @property
    def bandwidth_bytes_per_s(self) -> int:
        return int(self.bucket.rate)

    def set(self, *, threads: int | None = None, bandwidth_bytes_per_s: int | None = None) -> None:
        """Change limits; raises ValueError (with the field name) on a bad value."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if bandwidth_bytes_per_s is not None and (
            isinstance(bandwidth_bytes_per_s, bool)
            or not isinstance(bandwidth_bytes_per_s, int)
            or bandwidth_bytes_per_s < 0
        ):
            raise ValueError(
                f"bandwidth_bytes_per_s must be an integer >= 0 (0: no cap), got {bandwidth_bytes_per_s!r}"
            )
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s != self.bandwidth_bytes_per_s:
            self.bucket.set_rate(bandwidth_bytes_per_s)
            log.info("limit changed bandwidth_bytes_per_s=%d", bandwidth_bytes_per_s)
        if threads is not None and threads != self.threads:
            self.threads = threads
            self._threads_changed.set()
            log.info("limit changed threads=%d applies=after-current-round", threads)

    def as_dict(self) -> dict[str, int]:
        return {
            "threads": self.threads,
            "threads_applied": self.threads_applied,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
        }

    async def run(self, trainer: _Trainer) -> None:
        """Apply thread changes to the training child; a task of the node's TaskGroup."""
        while True:
            await self._threads_changed.wait()
            self._threads_changed.clear()
            wanted = self.threads
            await trainer.set_threads(wanted)  # queues behind a running round: the child is one-at-a-time
            self.threads_applied = wanted
            log.info("training threads applied threads=%d", wanted)
