"""Token bucket on a fake clock: the long-run rate is the cap, bursts up to one second pass, 0 disables."""

from __future__ import annotations

import asyncio

import pytest

from daemon.node.limits import Limits, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_zero_rate_never_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0, clock=clock, sleep=clock.sleep)
    assert bucket.reserve(10**9) == 0.0
    assert bucket.bytes_total == 10**9


async def test_long_run_rate_is_the_cap() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        await bucket.acquire(400)  # 20 000 bytes at 1000 B/s: 20 s, the bucket starts empty
    assert clock.now == pytest.approx(20.0)
    assert bucket.waited_s == pytest.approx(20.0)


async def test_burst_of_one_second_passes_after_idle() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    clock.now += 60  # idle: the bucket refills to its one-second burst, not to 60 s worth
    await bucket.acquire(1000)
    assert clock.slept == []
    await bucket.acquire(500)
    assert clock.slept == [pytest.approx(0.5)]


def test_concurrent_reservations_queue_behind_each_other() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    assert [bucket.reserve(100) for _ in range(3)] == [
        pytest.approx(1.0),
        pytest.approx(2.0),
        pytest.approx(3.0),
    ]


def test_large_message_goes_out_after_a_proportional_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    assert bucket.reserve(5000) == pytest.approx(5.0)  # larger than the burst, still sent


def test_set_rate_rejects_negative() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1)


async def test_limits_apply_threads_in_the_background() -> None:
    applied: list[int] = []

    class Trainer:
        async def set_threads(self, threads: int) -> None:
            applied.append(threads)

    limits = Limits(threads=1, bandwidth_bytes_per_s=0)
    task = asyncio.create_task(limits.run(Trainer()))
    try:
        limits.set(threads=3, bandwidth_bytes_per_s=2000)
        assert limits.as_dict() == {"threads": 3, "threads_applied": 1, "bandwidth_bytes_per_s": 2000}
        async with asyncio.timeout(5):
            while limits.threads_applied != 3:
                await asyncio.sleep(0)
        assert applied == [3]
    finally:
        task.cancel()


@pytest.mark.parametrize(
    "change", [{"threads": 0}, {"threads": 1.5}, {"threads": True}, {"bandwidth_bytes_per_s": -1}]
)
def test_limits_reject_bad_values(change: dict) -> None:
    limits = Limits(threads=1, bandwidth_bytes_per_s=0)
    with pytest.raises(ValueError, match=next(iter(change))):
        limits.set(**change)
    assert limits.as_dict() == {"threads": 1, "threads_applied": 1, "bandwidth_bytes_per_s": 0}
