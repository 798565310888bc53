"""LAN discovery by mDNS, in a private network namespace (multicast stays inside it).

Two hosts with mDNS on find and connect to each other with no bootstrap address at all; a third with mDNS
off is announced to nobody and dials nobody. Runs the hosts in a child process inside the namespace,
which the test creates and always removes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.netns

PROBE = textwrap.dedent(
    """
    import asyncio, json, time
    import p2p

    async def main():
        on, off = p2p.HostConfig(mdns=True), p2p.HostConfig()
        hosts = [p2p.Host(p2p.Identity.generate(), config=c) for c in (on, on, off)]
        for h in hosts:
            await h.start()
        a, b, quiet = hosts
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b.peer_id not in a.connected_peers():
            await asyncio.sleep(0.05)
        result = {
            "a_sees_b": b.peer_id in a.connected_peers(),
            "quiet_peers": quiet.connected_peers(),
            "a_sees_quiet": quiet.peer_id in a.connected_peers(),
        }
        for h in hosts:
            await h.aclose()
        print(json.dumps(result))

    asyncio.run(main())
    """
)


@pytest.fixture
def namespace() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"mtmdns{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("`ip netns add` failed (no CAP_SYS_ADMIN in this container?)")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up", "multicast", "on"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_mdns_peers_find_each_other_without_bootstrap(namespace: str) -> None:
    run = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["a_sees_b"], result
    assert result["quiet_peers"] == [] and not result["a_sees_quiet"], result
