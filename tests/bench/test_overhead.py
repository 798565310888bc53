"""The convergence benchmark's byte accounting (bench/convergence/_overhead.py) and lr stretching."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

import training
from bench.convergence import _methods, _overhead

SS_OUTPUT = """\
ESTAB 0 0 127.0.0.1:20001 127.0.0.1:41000 users:(("python",pid=111,fd=9))
\t cubic wscale:7,7 rto:204 bytes_sent:1500 bytes_acked:1400 bytes_received:99 segs_out:3
ESTAB 0 0 127.0.0.1:41000 127.0.0.1:20001 users:(("python",pid=222,fd=7))
\t cubic bytes_acked:250 bytes_received:1400
ESTAB 0 0 127.0.0.1:41001 127.0.0.1:20001 users:(("python",pid=111,fd=11))
\t cubic bytes_acked:100
ESTAB 0 0 127.0.0.1:5000 127.0.0.1:5001 users:(("other",pid=999,fd=3))
\t cubic bytes_acked:7777
"""


def test_ss_bytes_are_summed_per_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 0, stdout=SS_OUTPUT, stderr="")

    monkeypatch.setattr(_overhead.subprocess, "run", fake_run)
    assert _overhead.tcp_bytes_sent({111, 222, 333}) == {111: 1500, 222: 250, 333: 0}  # acked, not sent


def test_tcp_payload_drops_52_header_bytes_a_packet() -> None:
    assert _overhead.tcp_payload(10_520, 10) == 10_000


def test_breakdown_adds_up_to_the_wire() -> None:
    """payload + envelope + genesis + gossip + sync + transport == wire, with every part from its source;
    the genesis is the blob bytes the joiners fetched, which the hosts' app counters leave out."""
    statuses = [
        {"home": "a", "task": "t", "bytes_sent": 40_000, "uptime_s": 10.0,
         "p2p": {"gossip_published": 5, "requests_sent": 7}, "counters": {"pulls": 3, "duplicates": 1}},
        {"home": "b", "task": "t", "bytes_sent": 40_000, "uptime_s": 12.0,
         "p2p": {"gossip_published": 5, "requests_sent": 7, "blob_bytes_fetched": 1000},
         "counters": {"pulls": 3, "duplicates": 0}},
    ]
    histories = [[{"payload_bytes": 5_000}] * 2, [{"payload_bytes": 5_000}] * 2]  # 2 peers x 2 rounds
    out = _overhead.breakdown(statuses, histories, 100_000, codec="sparse-q2")
    assert out["payload_bytes"] == 4 * 5_000 * 1 and out["genesis_bytes"] == 1000
    assert 100 < out["envelope_bytes"] / 4 < 300  # signature, author, ids, base version: ~200 bytes
    assert out["counts"] == {"contributions": 4, "heartbeats": 6, "pulls": 6, "duplicates": 1,
                             "requests": 14, "uptime_s": 12.0}
    parts = ("payload", "envelope", "genesis", "gossip", "sync", "transport")
    assert sum(out[f"{p}_bytes"] for p in parts) == out["wire_bytes"] == 100_000
    assert out["transport_bytes"] == 100_000 - 80_000 - 1000  # not the genesis download
    assert out["overhead_share"] == pytest.approx((100_000 - 20_000) / 20_000, abs=1e-4)


def test_schedules_stretch_to_each_contenders_steps() -> None:
    peer = training.DilocoConfig(inner_lr=1e-3, warmup_steps=10, total_steps=300, device="cpu")
    single = _methods._stretched(peer, 1200)  # one process takes N x the steps of a peer
    assert (single.warmup_steps, single.total_steps) == (40, 1200)
    for step in (10, 150, 299, 400):  # after the warm-up; it ends at the same fraction of the run
        assert training.lr_factor(step, peer) == pytest.approx(training.lr_factor(4 * step, single), abs=0.02)
    flat = training.DilocoConfig(device="cpu")
    assert _methods._stretched(flat, 1200) is flat
