"""The emulated WAN of wan.py, measured with plain TCP sockets between its namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from netns_testlib import NAMESPACE_PREFIX, sh
from wan import DEFAULT_SITES, open_wan

pytestmark = pytest.mark.netns

PORT = 5000
MIB = 1 << 20
SERVER = f"""
import socket, sys
s = socket.create_server((sys.argv[1], {PORT}))
print("listening", flush=True)
c, _ = s.accept()
while c.recv(1 << 16):
    pass
c.sendall(b"k")
"""
CLIENT = f"""
import json, socket, sys, time
t = time.monotonic()
c = socket.create_connection((sys.argv[1], {PORT}))
rtt = time.monotonic() - t
t = time.monotonic()
c.sendall(bytes(int(sys.argv[2])))
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(json.dumps({{"rtt_ms": rtt * 1000, "mbit_s": int(sys.argv[2]) * 8 / 1e6 / (time.monotonic() - t)}}))
"""


def _transfer(wan, src: int, dst: int, size: int) -> dict[str, float]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", wan.namespaces[dst], sys.executable, "-c", SERVER, wan.hosts[dst]],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        client = sh(
            "ip",
            "netns",
            "exec",
            wan.namespaces[src],
            sys.executable,
            "-c",
            CLIENT,
            wan.hosts[dst],
            str(size),
        )
        return json.loads(client.stdout)
    finally:
        server.kill()
        server.wait()


def test_paths_have_the_sites_delays_and_rates(netns_ok: None, tmp_path: Path) -> None:
    with open_wan(DEFAULT_SITES, seed=1, log_dir=tmp_path) as wan:
        fast = _transfer(wan, 3, 0, 4 * MIB)  # NATed node out to the founder: 2 x (5 + 5) ms
        slow = _transfer(wan, 0, 2, 2 * MIB)  # into the slow site: 2 x (5 + 50) ms, 10 Mbit/s
        assert 20 <= fast["rtt_ms"] < 40
        assert 110 <= slow["rtt_ms"] < 150
        assert slow["mbit_s"] < 10.5 and fast["mbit_s"] > 2 * slow["mbit_s"]
        wan.set_link(2, rate_mbit=1)
        collapsed = _transfer(wan, 0, 2, MIB // 4)
        assert collapsed["mbit_s"] < 1.05
        stats = wan.stats()
        assert stats[2]["down"]["bytes"] > 2 * MIB and stats[2]["link"]["rate_mbit"] == 1
        behind_nat = wan.namespaces[3]
        created = wan.created
    assert behind_nat in created and len(created) == 1 + len(DEFAULT_SITES) + 2  # hub, sites, 2 NATed
    listed = sh("ip", "netns", "list").stdout
    assert not [n for n in created if n in listed]


def test_a_failure_while_building_or_using_it_leaves_nothing(netns_ok: None, tmp_path: Path) -> None:
    created: list[str] = []
    with pytest.raises(RuntimeError, match="refused"), open_wan(DEFAULT_SITES[:2], log_dir=tmp_path) as wan:
        created = wan.created
        wan.set_link(0, loss=2.5)  # not a probability: the emulator refuses it
    assert created and all(n.startswith(NAMESPACE_PREFIX) for n in created)
    listed = sh("ip", "netns", "list").stdout
    assert not [n for n in created if n in listed]
