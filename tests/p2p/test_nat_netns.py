"""NAT traversal through real NATs: network namespaces, nftables masquerade, three real daemons.

Topology (all private test ranges, only inside namespaces this test creates and always deletes):

    [pub] 10.200.0.1  bootstrap + relay daemon (relay_service = true), on bridge br0 10.200.0.0/24
      |-- [r1] wan 10.200.0.11  -- masquerade --  lan 10.200.1.1  -- [h1] 10.200.1.2  daemon A
      '-- [r2] wan 10.200.0.12  -- masquerade --  lan 10.200.2.1  -- [h2] 10.200.2.2  daemon B

Each router forwards its LAN out through nftables ``masquerade`` and drops unsolicited inbound packets, as a
home router does. A and B know only the public node; they must find each other through the DHT (the run's
provider records carry their /p2p-circuit addresses), connect (relayed at least; direct after DCUtR hole
punching where the NAT allows), and exchange contributions. The daemons' control sockets are Unix files,
polled from the root namespace.

Cases: ``eim`` = plain masquerade (Linux keeps the source port when it can: endpoint-independent mapping,
so the predicted address WAN-IP:listen-port is right and hole punching can succeed); ``symmetric`` =
``masquerade random`` (a fresh random port per connection: the prediction is wrong, A and B stay relayed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

pytestmark = pytest.mark.netns

PORT = 4001
DEADLINE_S = 150.0


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


def _write_home(root: Path, name: str, node: dict[str, Any], shard: int) -> tuple[Path, str]:
    import p2p
    from daemon.home import Home

    home = Home(root / name)
    home.create()
    peer_id = p2p.load_or_create_identity(home.identity_file).peer_id
    config = {
        "node": {"run": "natnet", **node},
        "training": {"task": "digits", "max_rounds": 2, "eval_every": 2, "shard": shard, "num_shards": 3},
        "sync": {"interval_s": 1.0},
        "diloco": {"expected_peers": 3},
    }
    home.config_file.write_text(tomli_w.dumps(config))
    return home.path, peer_id


def _status(home: Path) -> dict[str, Any] | None:
    from daemon.client import ControlClient
    from daemon.home import Home

    try:
        return ControlClient(Home(home).socket_path(), timeout_s=5.0).get("/v1/status")
    except Exception:
        return None


@pytest.fixture
def netns_ok() -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


def _run_case(tmp_path: Path, *, symmetric: bool) -> dict[str, Any]:
    topo = Topology(symmetric=symmetric)
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        topo.build()
        pub_home, pub_id = _write_home(
            tmp_path, "pub", {"listen": [f"/ip4/10.200.0.1/tcp/{PORT}"], "relay_service": True}, 0
        )
        boot = f"/ip4/10.200.0.1/tcp/{PORT}/p2p/{pub_id}"
        homes = {"pub": (topo.pub, pub_home, pub_id)}
        for i, ns in ((1, topo.h1), (2, topo.h2)):
            node = {"listen": [f"/ip4/10.200.{i}.2/tcp/{PORT}"], "bootstrap": [boot]}
            home, pid = _write_home(tmp_path, f"h{i}", node, i)
            homes[f"h{i}"] = (ns, home, pid)
        for name, (ns, home, _pid) in homes.items():
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            cmd = [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "daemon.cli",
                "daemon",
                "--home",
                str(home),
            ]
            procs.append(
                (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), tmp_path / f"{name}.log")
            )
        _, a_home, a_id = homes["h1"]
        _, b_home, b_id = homes["h2"]
        deadline = time.monotonic() + DEADLINE_S
        a = b = None
        while time.monotonic() < deadline:
            for name, proc, _log in procs:
                assert proc.poll() is None, f"daemon {name} exited with {proc.returncode}"
            a, b = _status(a_home), _status(b_home)
            if a and b:
                a_has_b = a["version_vector"].get(b_id, 0) >= 1
                b_has_a = b["version_vector"].get(a_id, 0) >= 1
                linked = b_id in a.get("connections", {}) and a_id in b.get("connections", {})
                direct = a["connections"].get(b_id) == "direct" and b["connections"].get(a_id) == "direct"
                settled = direct or symmetric or time.monotonic() > deadline - 60
                if a_has_b and b_has_a and linked and settled:
                    return {"a": a, "b": b, "a_id": a_id, "b_id": b_id, "pub": _status(pub_home)}
            time.sleep(1.0)
        pytest.fail(f"A and B did not exchange contributions over a link in {DEADLINE_S} s:\nA={a}\nB={b}")
    finally:
        for _name, proc, _log in procs:
            if proc.poll() is None:
                proc.terminate()
        for name, proc, log_path in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if log_path.exists():
                sys.stderr.write(
                    f"----- {name} log (tail) -----\n{log_path.read_text(errors='replace')[-3000:]}\n"
                )
        topo.close()


def test_nat_masquerade_both_sides(tmp_path: Path, netns_ok: None) -> None:
    """Port-preserving masquerade on both sides: discovery via DHT, relay, then a direct link by DCUtR."""
    out = _run_case(tmp_path, symmetric=False)
    a, b = out["a"], out["b"]
    assert a["reachability"] == "private" and b["reachability"] == "private"
    assert out["pub"]["reachability"] in ("public", "unknown")
    kind = a["connections"][out["b_id"]]
    sys.stderr.write(f"NAT case eim/eim: A<->B connection is {kind}\n")
    assert kind == "direct", f"hole punching through port-preserving masquerade should go direct, got {kind}"


def test_nat_symmetric_stays_relayed(tmp_path: Path, netns_ok: None) -> None:
    """Random-port masquerade on both sides (symmetric-like): the link works, through the relay."""
    out = _run_case(tmp_path, symmetric=True)
    a = out["a"]
    assert a["reachability"] == "private"
    kind = a["connections"][out["b_id"]]
    sys.stderr.write(f"NAT case symmetric/symmetric: A<->B connection is {kind}\n")
    assert kind in ("relayed", "direct")


@pytest.fixture(autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    yield
    leftovers = [n for n in _sh("ip", "netns", "list", check=False).stdout.split() if n.startswith("mt")]
    assert not [n for n in leftovers if n.endswith(str(os.getpid() % 100000))], leftovers
