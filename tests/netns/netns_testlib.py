"""Building blocks of the network-namespace tests: namespaces, veth links, home-router NAT, cleanup checks.

Shared by the NAT test (test_nat_netns.py: p2p.Host processes behind real NATs) and the WAN emulation
(wan.py: meshtrain daemons on shaped links). Every namespace a test creates carries a name ending in
this process's tag, so a fixture can assert that none is left behind, and parallel runs (other users of
the machine) never collide with ours.

Everything here shells out to iproute2 and nftables, as an administrator would type it; the commands
are the documentation. Rejected: pyroute2 (another dependency, for a dozen commands that run once per
test).
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = [
    "NAMESPACE_PREFIX",
    "Namespaces",
    "leftover_namespaces",
    "nat_router",
    "netns_unavailable",
    "sh",
    "tag",
    "veth",
]

NAMESPACE_PREFIX = "mt"  # every namespace the tests create starts with this (and ends with tag())


def sh(*cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command; with ``check``, a failure raises with the command's stderr in the message."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=stdin, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def tag() -> str:
    """This process's suffix for namespace names (short: interface names are limited to 15 bytes)."""
    return str(os.getpid() % 100000)


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if shutil.which("nft") is None:
        return "nftables (`nft`) is not installed (apt-get install -y nftables)"
    probe = f"{NAMESPACE_PREFIX}probe{tag()}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` failed (no CAP_SYS_ADMIN in this container?)"
    sh("ip", "netns", "del", probe, check=False)
    return None


def leftover_namespaces() -> list[str]:
    """Namespaces of this process still present (a test's cleanup failed if this is not empty)."""
    if shutil.which("ip") is None:
        return []
    names = sh("ip", "netns", "list", check=False).stdout.split()
    return [n for n in names if n.startswith(NAMESPACE_PREFIX) and n.endswith(tag())]


class Namespaces:
    """Namespaces created one by one and all deleted by ``close()`` (their veths and nft tables go with
    them), also after a failure half-way through building."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, role: str) -> str:
        """Create namespace ``mt<role><tag>`` with its loopback up; returns the name."""
        name = f"{NAMESPACE_PREFIX}{role}{tag()}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    @staticmethod
    def run(name: str, *cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside namespace ``name``."""
        return sh("ip", "netns", "exec", name, *cmd, stdin=stdin)

    def close(self) -> None:
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)
        self.names.clear()


def veth(ns_a: str, if_a: str, addr_a: str, ns_b: str, if_b: str, addr_b: str | None) -> None:
    """A veth pair between two namespaces, both ends up; ``addr_*`` like "10.0.0.1/24" (None: no address,
    e.g. a bridge port)."""
    sh("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        if addr is not None:
            sh("ip", "-n", ns, "addr", "add", addr, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")


def nat_router(router: str, *, wan_if: str, symmetric: bool) -> None:
    """Make ``router`` a home router: forward, masquerade what leaves through ``wan_if``, drop unsolicited
    inbound packets. ``symmetric``: ``masquerade random`` (a fresh random port per connection, so a
    predicted address is wrong and hole punching fails) instead of plain masquerade (Linux keeps the
    source port when it can: endpoint-independent mapping, so hole punching can succeed)."""
    Namespaces.run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    masq = "masquerade random" if symmetric else "masquerade"
    rules = f"""
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority 100; oifname "{wan_if}" {masq}; }}
}}
table ip filter {{
  chain input {{ type filter hook input priority 0; policy accept;
    iifname "{wan_if}" ct state established,related accept; iifname "{wan_if}" drop; }}
  chain forward {{ type filter hook forward priority 0; policy accept;
    iifname "{wan_if}" ct state established,related accept; iifname "{wan_if}" drop; }}
}}
"""
    Namespaces.run(router, "nft", "-f", "-", stdin=rules)
