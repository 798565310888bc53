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
DEADLINE_S = 120.0  # per case, start to link; measured ~25-35 s
PUNCH_WAIT_S = 30.0  # after the link: time for DCUtR to replace the relayed connection


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
    from daemon.cli.client import ControlClient
    from daemon.home import Home

    try:
        return ControlClient(Home(home).socket_path(), timeout_s=5.0).get("/v1/status")
    except Exception:
        return None


def _block(home: Path, peers: list[str]) -> bool:
    """The daemon's fault hook: no model data (sync, snapshots, pulls) with ``peers`` from now on."""
    from daemon.cli.client import ControlClient
    from daemon.home import Home

    try:
        ControlClient(Home(home).socket_path(), timeout_s=5.0).post("/v1/faults", {"block": peers})
    except Exception:
        return False
    return True


@pytest.fixture
def netns_ok() -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


class Daemons:
    """The three daemon processes of one case; `stop()` terminates them and prints their log tails."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, ns: str, home: Path) -> None:
        log_path = self.tmp_path / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed when we drop it below
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "daemon.cli", "daemon", "--home", str(home)]
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log_path))
        log.close()

    def check_alive(self) -> None:
        for name, proc, _log in self.procs:
            assert proc.poll() is None, f"daemon {name} exited with {proc.returncode}"

    def stop(self) -> None:
        for _name, proc, _log in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for name, proc, log_path in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if log_path.exists():
                sys.stderr.write(
                    f"----- {name} log (tail) -----\n{log_path.read_text(errors='replace')[-3000:]}\n"
                )


def _wait(what: str, deadline: float, check: Any, daemons: Daemons) -> Any:
    """Poll ``check()`` once a second until it returns something truthy; fail at ``deadline``."""
    last = None
    while time.monotonic() < deadline:
        daemons.check_alive()
        last = check()
        if last:
            return last
        time.sleep(1.0)
    pytest.fail(f"timed out waiting for {what}; last={last!r}")


def _run_case(tmp_path: Path, *, symmetric: bool) -> dict[str, Any]:
    """Start pub, then A and B; model data may flow only A<->B; return statuses once A and B are linked.

    The public node is partitioned from A and B for model data from the start (fault hook on all three:
    pub blocks A and B before they exist, A and B block pub once they are up), so a contribution of B on A
    can only have come over the A-B link, relayed or direct. Relaying (circuit v2), the DHT and genesis
    fetches are not model data and still go through pub.
    """
    topo = Topology(symmetric=symmetric)
    daemons = Daemons(tmp_path)
    started = time.monotonic()
    deadline = started + DEADLINE_S
    try:
        topo.build()
        pub_home, pub_id = _write_home(
            tmp_path, "pub", {"listen": [f"/ip4/10.200.0.1/tcp/{PORT}"], "relay_service": True}, 0
        )
        boot = f"/ip4/10.200.0.1/tcp/{PORT}/p2p/{pub_id}"
        nated: dict[str, tuple[str, Path, str]] = {}
        for i, ns in ((1, topo.h1), (2, topo.h2)):
            node = {"listen": [f"/ip4/10.200.{i}.2/tcp/{PORT}"], "bootstrap": [boot]}
            home, pid = _write_home(tmp_path, f"h{i}", node, i)
            nated[f"h{i}"] = (ns, home, pid)
        (_, a_home, a_id), (_, b_home, b_id) = nated["h1"], nated["h2"]
        daemons.start("pub", topo.pub, pub_home)
        _wait("pub's control socket", deadline, lambda: _block(pub_home, [a_id, b_id]), daemons)
        for name, (ns, home, _pid) in nated.items():
            daemons.start(name, ns, home)
        for home in (a_home, b_home):
            _wait("a NATed daemon's control socket", deadline, lambda h=home: _block(h, [pub_id]), daemons)

        def exchanged() -> tuple[dict[str, Any], dict[str, Any]] | None:
            a, b = _status(a_home), _status(b_home)
            if not (a and b):
                return None
            ok = (
                a["version_vector"].get(b_id, 0) >= 1
                and b["version_vector"].get(a_id, 0) >= 1
                and b_id in a.get("connections", {})
                and a_id in b.get("connections", {})
            )
            return (a, b) if ok else None

        a, b = _wait("A and B to link and exchange contributions", deadline, exchanged, daemons)
        linked_s = time.monotonic() - started
        # Hole punching (DCUtR) runs after the relayed link exists: give it a bounded moment.
        punch_deadline = min(deadline, time.monotonic() + PUNCH_WAIT_S)
        while time.monotonic() < punch_deadline:
            now = exchanged()
            if now is not None:
                a, b = now
                if a["connections"][b_id] == "direct" and b["connections"][a_id] == "direct":
                    break
            time.sleep(1.0)
        pub = _status(pub_home)
        assert pub is not None
        return {
            "a": a,
            "b": b,
            "pub": pub,
            "a_id": a_id,
            "b_id": b_id,
            "pub_id": pub_id,
            "linked_s": linked_s,
            "total_s": time.monotonic() - started,
        }
    finally:
        daemons.stop()
        topo.close()


def _check_common(out: dict[str, Any], case: str) -> str:
    a, b, pub = out["a"], out["b"], out["pub"]
    a_id, b_id, pub_id = out["a_id"], out["b_id"], out["pub_id"]
    assert a["reachability"] == "private", a["reachability"]
    assert b["reachability"] == "private", b["reachability"]
    assert pub["reachability"] == "public", pub["reachability"]
    kind_ab, kind_ba = a["connections"][b_id], b["connections"][a_id]
    assert kind_ab in ("relayed", "direct") and kind_ba in ("relayed", "direct")
    # B's contribution reached A, and pub (partitioned for model data from the start) has neither's:
    # it came over the A-B link.
    assert a["version_vector"].get(b_id, 0) >= 1 and b["version_vector"].get(a_id, 0) >= 1
    assert pub["version_vector"].get(a_id, 0) == 0 and pub["version_vector"].get(b_id, 0) == 0, pub
    assert pub_id in a["blocked_peers"] and pub_id in b["blocked_peers"]
    sys.stderr.write(
        f"NAT case {case}: A->B {kind_ab}, B->A {kind_ba}; linked+exchanged after {out['linked_s']:.0f} s,"
        f" case took {out['total_s']:.0f} s\n"
    )
    return kind_ab


def test_nat_masquerade_both_sides(tmp_path: Path, netns_ok: None) -> None:
    """Port-preserving masquerade on both sides: discovery via DHT, relay, then a direct link by DCUtR."""
    out = _run_case(tmp_path, symmetric=False)
    kind = _check_common(out, "eim/eim (masquerade)")
    assert kind == "direct", f"hole punching through port-preserving masquerade should go direct, got {kind}"


def test_nat_symmetric_stays_relayed(tmp_path: Path, netns_ok: None) -> None:
    """Random-port masquerade on both sides (symmetric-like): the link works, at least through the relay."""
    out = _run_case(tmp_path, symmetric=True)
    _check_common(out, "symmetric/symmetric (masquerade random)")


@pytest.fixture(autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    yield
    leftovers = [n for n in _sh("ip", "netns", "list", check=False).stdout.split() if n.startswith("mt")]
    assert not [n for n in leftovers if n.endswith(str(os.getpid() % 100000))], leftovers
