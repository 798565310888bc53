"""The link model of wan_emulator.py, without a kernel: delay, serialization, queues, loss, outages."""

from __future__ import annotations

import itertools

import pytest
from wan_emulator import Link, LinkModel

A, B, C = "10.201.1.2", "10.201.2.2", "10.201.3.2"


def model(**b: float) -> LinkModel:
    links = {
        A: Link(delay_ms=5, rate_mbit=100),
        B: Link(delay_ms=50, rate_mbit=8, **b),
        C: Link(delay_ms=5, rate_mbit=100),
    }
    return LinkModel(links, seed=1)


def deliver(m: LinkModel, src: str, dst: str, size: int, now: float) -> float | None:
    arrive = m.upload(src, dst, size, now)
    return None if arrive is None else m.download(dst, size, arrive)


def test_one_way_time_is_both_delays_plus_serialization() -> None:
    m = model()
    # 1000 bytes: 80 us up A's 100 Mbit/s, 55 ms of propagation, 1 ms down B's 8 Mbit/s
    assert deliver(m, A, B, 1000, 0.0) == pytest.approx(0.00008 + 0.055 + 0.001)
    assert deliver(m, B, A, 1000, 1.0) == pytest.approx(1.0 + 0.001 + 0.055 + 0.00008)


def test_a_slow_downlink_queues_packets_in_arrival_order() -> None:
    m = model()
    times = [deliver(m, A, B, 1000, 0.0) for _ in range(10)]
    gaps = [b - a for a, b in itertools.pairwise(times)]  # type: ignore[operator]
    assert gaps == pytest.approx([0.001] * 9)  # B's 8 Mbit/s, not A's 100 Mbit/s, sets the pace


def test_a_full_buffer_drops_the_tail() -> None:
    m = model(queue_bytes=10_000)
    sent = [m.upload(B, A, 1000, 0.0) for _ in range(20)]
    assert sum(t is not None for t in sent) == 10
    assert m.stats()["links"][B]["up"]["dropped"] == {"queue": 10}


def test_loss_rate_is_about_the_configured_one_and_seeded() -> None:
    runs = []
    for _ in range(2):
        m = model(loss=0.05)
        runs.append([deliver(m, A, B, 100, i * 0.01) is None for i in range(4000)])
    assert runs[0] == runs[1]  # same seed, same drops
    assert 0.03 < sum(runs[0]) / 4000 < 0.07  # crossing B's link once per packet, both directions share p


def test_an_outage_drops_both_ways_and_ends() -> None:
    m = model()
    m.set_link(B, up=False)
    assert deliver(m, A, B, 100, 0.0) is None and deliver(m, B, A, 100, 0.0) is None
    m.set_link(B, up=True)
    assert deliver(m, A, B, 100, 1.0) is not None
    assert m.stats()["links"][B]["up"]["dropped"] == {"outage": 1}


def test_unknown_addresses_and_fields() -> None:
    m = model()
    assert m.upload(A, "10.202.3.2", 100, 0.0) is None  # behind a NAT: not routable from outside
    assert m.stats()["unrouted"] == 1
    with pytest.raises(ValueError):
        m.set_link(A, mtu=9000)
    for bad in ({"loss": 2.5}, {"rate_mbit": 0}, {"up": "maybe"}):
        with pytest.raises(ValueError):
            m.set_link(A, **bad)
    assert m.links[A] == Link(delay_ms=5, rate_mbit=100)
