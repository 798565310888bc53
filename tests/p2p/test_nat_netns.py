"""NAT traversal through real NATs: network namespaces, nftables masquerade, three p2p.Host processes.

Topology (all private test ranges, only inside namespaces this test creates and always deletes):

    [pub] 10.200.0.1  bootstrap node, NAT defaults (relay_service "auto"), on bridge br0 10.200.0.0/24
      |-- [r1] wan 10.200.0.11  -- masquerade --  lan 10.200.1.1  -- [h1] 10.200.1.2  host A
      '-- [r2] wan 10.200.0.12  -- masquerade --  lan 10.200.2.1  -- [h2] 10.200.2.2  host B

Each router forwards its LAN out through nftables ``masquerade`` and drops unsolicited inbound packets, as a
home router does. A and B know only the public node; they must learn their reachability (AutoNAT), find each
other through the DHT (the run's provider records carry their /p2p-circuit addresses), connect through the
public node's relay, and, where the NAT allows, replace that link by a hole-punched direct one (DCUtR).
Each Host runs in its own process (tests/p2p/_netns_host.py), driven over stdin/stdout.

Cases: ``eim`` = plain masquerade (Linux keeps the source port when it can: endpoint-independent mapping, so
the predicted address WAN-IP:listen-port is right and hole punching can succeed); ``symmetric`` =
``masquerade random`` (a fresh random port per connection: the prediction is wrong, A and B stay relayed,
which is where the relay's limits show).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.netns

PORT = 4001
HELPER = Path(__file__).with_name("_netns_host.py")
DEADLINE_S = 120.0  # per case, start to link; measured ~10-30 s
PUNCH_WAIT_S = 45.0  # after the link: time for DCUtR to replace the relayed connection
FAST_NAT = {"interval_s": 2.0}  # NAT rounds every 2 s instead of 5 s (the test's only speed-up)


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if shutil.which("nft") is None:
        return "nftables (`nft`) is not installed (apt-get install -y nftables)"
    probe = f"mtprobe{os.getpid()}"
    if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` failed (no CAP_SYS_ADMIN in this container?)"
    _sh("ip", "netns", "del", probe, check=False)
    return None


class Topology:
    """Creates the namespaces above; `close()` deletes them (veths and nft tables go with them)."""

    def __init__(self, *, symmetric: bool) -> None:
        tag = f"{os.getpid() % 100000}"
        self.pub, self.r1, self.r2, self.h1, self.h2 = (
            f"mt{n}{tag}" for n in ("pub", "r1", "r2", "h1", "h2")
        )
        self.namespaces = [self.pub, self.r1, self.r2, self.h1, self.h2]
        self.symmetric = symmetric

    def ns(self, name: str, *cmd: str) -> None:
        _sh("ip", "netns", "exec", name, *cmd)

    def build(self) -> None:
        for name in self.namespaces:
            _sh("ip", "netns", "add", name)
            self.ns(name, "ip", "link", "set", "lo", "up")
        self.ns(self.pub, "ip", "link", "add", "br0", "type", "bridge")
        self.ns(self.pub, "ip", "addr", "add", "10.200.0.1/24", "dev", "br0")
        self.ns(self.pub, "ip", "link", "set", "br0", "up")
        for i, (router, host) in enumerate(((self.r1, self.h1), (self.r2, self.h2)), start=1):
            # WAN side: router <-> public bridge
            _sh(
                "ip",
                "link",
                "add",
                f"w{i}",
                "netns",
                router,
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                self.pub,
            )
            self.ns(self.pub, "ip", "link", "set", f"p{i}", "master", "br0", "up")
            self.ns(router, "ip", "addr", "add", f"10.200.0.{10 + i}/24", "dev", f"w{i}")
            self.ns(router, "ip", "link", "set", f"w{i}", "up")
            # LAN side: router <-> private host
            _sh(
                "ip",
                "link",
                "add",
                f"l{i}",
                "netns",
                router,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host,
            )
            self.ns(router, "ip", "addr", "add", f"10.200.{i}.1/24", "dev", f"l{i}")
            self.ns(router, "ip", "link", "set", f"l{i}", "up")
            self.ns(host, "ip", "addr", "add", f"10.200.{i}.2/24", "dev", "eth0")
            self.ns(host, "ip", "link", "set", "eth0", "up")
            self.ns(host, "ip", "route", "add", "default", "via", f"10.200.{i}.1")
            self.ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            masq = "masquerade random" if self.symmetric else "masquerade"
            rules = f"""
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority 100; oifname "w{i}" {masq}; }}
}}
table ip filter {{
  chain input {{ type filter hook input priority 0; policy accept;
    iifname "w{i}" ct state established,related accept; iifname "w{i}" drop; }}
  chain forward {{ type filter hook forward priority 0; policy accept;
    iifname "w{i}" ct state established,related accept; iifname "w{i}" drop; }}
}}
"""
            subprocess.run(
                ["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules, text=True, check=True
            )

    def close(self) -> None:
        for name in self.namespaces:
            _sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns_ok() -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


class Node:
    """One Host process in a namespace (tests/p2p/_netns_host.py); `call` sends a command, gets the reply."""

    def __init__(self, name: str, ns: str, config: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(HELPER), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._buffer = b""
        try:
            self.peer_id: str = self._read_line(timeout_s=60.0)["peer_id"]
        except BaseException:
            self.stop()
            raise

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read_line(timeout_s=90.0)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def _read_line(self, *, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: no reply (exit code {self.proc.poll()})")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"{self.name}: exited (code {self.proc.wait(5)})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        sys.stderr.write(
            f"----- {self.name} log (tail) -----\n{self.log_path.read_text(errors='replace')[-3000:]}\n"
        )


def _wait(what: str, timeout_s: float, check: Callable[[], Any]) -> Any:
    """Poll ``check()`` every half second until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; last={last!r}")


class Run:
    """The public node and A, B behind their NATs; `close()` stops them and deletes the namespaces."""

    def __init__(
        self, tmp_path: Path, *, symmetric: bool, pub_nat: dict[str, Any], swarm_key: str = ""
    ) -> None:
        self.topo = Topology(symmetric=symmetric)
        self.nodes: list[Node] = []
        try:  # a node that fails to start must not leave the namespaces behind
            self.topo.build()
            common = {"swarm_key": swarm_key, "run_id": "natnet"}
            self.pub = self._start("pub", self.topo.pub, {**common, "nat": {**FAST_NAT, **pub_nat}}, tmp_path)
            boot = [f"/ip4/10.200.0.1/tcp/{PORT}/p2p/{self.pub.peer_id}"]
            nated = {**common, "bootstrap": boot, "nat": FAST_NAT}
            self.a = self._start(
                "A", self.topo.h1, {**nated, "listen": f"/ip4/10.200.1.2/tcp/{PORT}"}, tmp_path
            )
            self.b = self._start(
                "B", self.topo.h2, {**nated, "listen": f"/ip4/10.200.2.2/tcp/{PORT}"}, tmp_path
            )
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, ns: str, config: dict[str, Any], tmp_path: Path) -> Node:
        config.setdefault("listen", f"/ip4/10.200.0.1/tcp/{PORT}")
        node = Node(name, ns, config, tmp_path)
        self.nodes.append(node)
        return node

    def linked(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """A's and B's statuses once each has a connection to the other, else None."""
        a, b = self.a.status(), self.b.status()
        if self.b.peer_id in a["connections"] and self.a.peer_id in b["connections"]:
            return a, b
        return None

    def close(self) -> None:
        try:
            for node in self.nodes:
                node.stop()
        finally:
            self.topo.close()


def _gossip_flows(sender: Node, receiver: Node, timeout_s: float) -> bool:
    """Publish from ``sender`` until ``receiver`` has counted one more message from it."""
    before = receiver.status()["gossip"].get(sender.peer_id, 0)

    def arrived() -> bool:
        sender.call("publish", data=f"from {sender.name}")
        return receiver.status()["gossip"].get(sender.peer_id, 0) > before

    return bool(_wait(f"gossip {sender.name} -> {receiver.name}", timeout_s, arrived))


def test_private_run_behind_nat_relays_then_punches(tmp_path: Path, netns_ok: None) -> None:
    """Swarm key; port-preserving masquerade: reachability right, relayed link, then direct by DCUtR."""
    run = Run(tmp_path, symmetric=False, pub_nat={}, swarm_key=os.urandom(32).hex())
    try:
        started = time.monotonic()
        reach = lambda: [n.status()["reachability"] for n in (run.pub, run.a, run.b)]  # noqa: E731
        assert _wait("AutoNAT verdicts", DEADLINE_S, lambda: reach() == ["public", "private", "private"])
        _wait("A and B to link", DEADLINE_S, run.linked)
        linked_s = time.monotonic() - started
        a, b = _wait(
            "the hole-punched direct link",
            PUNCH_WAIT_S,
            lambda: (s := run.linked()) and s[0]["connections"][run.b.peer_id] == "direct" and s,
        )
        relayed_dials = a["nat"]["counters"]["relay_dials_ok"] + b["nat"]["counters"]["relay_dials_ok"]
        assert relayed_dials >= 1  # the link went through the relay first
        assert b["connections"][run.a.peer_id] == "direct"
        pub = run.pub.status()["nat"]["relay_service"]
        assert pub["mode"] == "auto" and pub["active"]  # the default, switched on by AutoNAT's "public"
        # Once direct, gossip and requests flow both ways.
        assert _gossip_flows(run.a, run.b, 30) and _gossip_flows(run.b, run.a, 30)
        assert run.a.call("request", peer=run.b.peer_id, bytes=1 << 20, timeout_s=30)["ok"]
        sys.stderr.write(
            f"private run: linked after {linked_s:.0f} s, direct after {time.monotonic() - started:.0f} s\n"
        )
    finally:
        run.close()


def test_default_public_node_relays_within_its_limits(tmp_path: Path, netns_ok: None) -> None:
    """Random-port masquerade (no hole punch): pub's default "auto" relay carries A-B, within its limits."""
    duration_s = 30
    limits = {
        "relay_max_reservations": 1,
        "relay_circuit_bytes": 4 << 20,
        "relay_circuit_duration_s": duration_s,
    }
    started = time.monotonic()  # no circuit exists before this
    run = Run(tmp_path, symmetric=True, pub_nat=limits)
    try:
        a, b = _wait("A and B to link through the relay", DEADLINE_S, run.linked)
        assert a["connections"][run.b.peer_id] == "relayed" == b["connections"][run.a.peer_id]
        assert run.a.call("request", peer=run.b.peer_id, bytes=1 << 20, timeout_s=30)["ok"]  # within limits
        pub = run.pub.status()
        relay = pub["nat"]["relay_service"]
        assert pub["reachability"] == "public" and relay["mode"] == "auto" and relay["active"]
        holders = [n for n, s in ((run.a, a), (run.b, b)) if s["nat"]["relays"]]
        assert len(holders) == 1 and relay["reservations"] == 1  # one slot (relay_max_reservations)...
        counters = lambda: run.pub.status()["nat"]["relay_service"]["counters"]  # noqa: E731
        _wait("the refused reservation", 30, lambda: counters()["relay_reservations_refused"] >= 1)  # ...held

        cut = run.a.call("request", peer=run.b.peer_id, bytes=8 << 20, timeout_s=30)  # over 4 MiB
        assert not cut["ok"], cut
        _wait("a circuit cut by bytes", 30, lambda: counters()["relay_circuits_cut_bytes"] >= 1)

        _wait(
            "a circuit cut by duration",
            3 * duration_s,
            lambda: counters()["relay_circuits_cut_duration"] >= 1,
        )
        assert time.monotonic() - started >= duration_s  # never before a circuit's duration
        _wait("A and B to link again (discovery redials through the relay)", 60, run.linked)
    finally:
        run.close()


@pytest.fixture(autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    yield
    leftovers = [n for n in _sh("ip", "netns", "list", check=False).stdout.split() if n.startswith("mt")]
    assert not [n for n in leftovers if n.endswith(str(os.getpid() % 100000))], leftovers
