"""`meshtrain doctor`: read a running node's status and explain its connectivity in plain words.

Pure: `diagnose(status) -> Report` takes the node's status (`daemon.status.Status`) and says
what a user behind NAT should do (reachability, relays, port forwarding, which addresses to hand to peers),
whether its relay service helps anyone, and what stops it outright: a full disk, a genesis it refused
(`status.join.refused`, with each peer's reason). The CLI prints `Report.lines` or, with --json,
`Report.as_dict()`; the checks that need no daemon are `daemon.cli.checkup`'s.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from daemon.status import Status

__all__ = ["Report", "diagnose"]


@dataclass(frozen=True, slots=True)
class Report:
    """Verdict (``ok`` / ``warn`` / ``problem``), findings and advice, and the addresses to share."""

    verdict: str
    findings: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    share_addrs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "findings": self.findings,
            "advice": self.advice,
            "share_addrs": self.share_addrs,
        }

    @property
    def lines(self) -> list[str]:
        out = [f"verdict: {self.verdict}", ""]
        out += [f"- {f}" for f in self.findings]
        if self.advice:
            out += ["", "what to do:"] + [f"- {a}" for a in self.advice]
        if self.share_addrs:
            out += ["", "give peers one of these addresses (as their bootstrap):"] + [
                f"  {a}" for a in self.share_addrs
            ]
        return out


def _is_public(addr: str) -> bool:
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            return False
        return ip.is_global
    return parts[1:2] in (["dns"], ["dns4"], ["dns6"])


def diagnose(status: Status) -> Report:
    """Explain a node's connectivity."""
    nat = status.nat
    reach = status.reachability
    conns = status.connections
    listen = list(status.listen_addrs)
    relay_addrs = list(nat.relay_addrs)
    findings: list[str] = []
    advice: list[str] = []
    direct = sorted(p for p, k in conns.items() if k == "direct")
    relayed = sorted(p for p, k in conns.items() if k == "relayed")
    findings.append(f"connected peers: {len(conns)} ({len(direct)} direct, {len(relayed)} relayed)")
    public_listen = [a for a in listen if _is_public(a)]

    if reach == "public":
        findings.append("reachability: public - other peers can dial this node directly (AutoNAT confirmed).")
        share = public_listen or listen
        relay = nat.relay_service
        if relay.active:
            findings.append(
                f"relaying for peers behind NAT: {relay.reservations} slot(s) held, "
                f"{relay.circuits} circuit(s)."
            )
        else:
            advice.append(
                f'This node is publicly reachable but does not relay (relay_service = "{relay.mode}"): set '
                '`relay_service = "auto"` in [nat] so peers behind NAT can reach the run through it.'
            )
    elif reach == "private":
        findings.append(
            "reachability: private - this node is behind a NAT or firewall; peers cannot dial it."
        )
        share = relay_addrs
        if relay_addrs:
            findings.append(
                f"relayed through {len(nat.relays)} relay(s); peers reach it via /p2p-circuit."
            )
        elif nat.config.get("use_relays", True):
            findings.append("no relay reservation yet: no connected peer offers a relay slot.")
            advice.append(
                "Bootstrap from a public node (its relay service is on by default while it is public)."
            )
        else:
            advice.append(
                "Set `use_relays = true` in [nat]: without a relay, peers can only be dialled by this node."
            )
        advice.append(
            "For direct connections, forward the listen TCP port on your router to this machine "
            "(or enable UPnP on the router), or run the node on a host with a public IP."
        )
        if relayed and nat.config.get("hole_punch", True):
            advice.append(
                f"{len(relayed)} peer(s) are still relayed: hole punching did not succeed (symmetric NAT on "
                "one side?). Relayed links are slower (relay limits apply); port forwarding fixes it."
            )
        elif relayed:
            advice.append("Set `hole_punch = true` in [nat] to upgrade relayed connections to direct ones.")
    else:
        findings.append("reachability: unknown - no peer has answered an AutoNAT dial-back yet.")
        share = public_listen or relay_addrs or listen
        if not nat.config.get("autonat", True):
            advice.append("Set `autonat = true` in [nat] so the node can learn whether it is reachable.")
        elif not conns:
            advice.append("Not connected to anyone: check `bootstrap` in [node] and your network.")
        else:
            advice.append("Wait a few seconds; reachability needs a directly connected peer with AutoNAT.")

    if any(a.split("/")[2:3] == ["0.0.0.0"] for a in listen):
        findings.append("listening on all interfaces (0.0.0.0).")
    if listen and not public_listen and reach == "public":
        findings.append(
            "listen addresses are private, but AutoNAT reached us: a port forward or 1:1 NAT is in place."
        )
    if not listen:
        advice.append("The node reports no listen address: is it running?")

    _relay_service(status, findings, advice)
    blocked = _blockers(status, findings, advice)
    if blocked or (reach == "private" and not relay_addrs):
        verdict = "problem"
    elif reach == "public" or (reach == "private" and not relayed):
        verdict = "ok"
    else:
        verdict = "warn"
    return Report(verdict=verdict, findings=findings, advice=advice, share_addrs=list(share))


def _relay_service(status: Status, findings: list[str], advice: list[str]) -> None:
    """A relay service forced on (``[nat] relay_service = "on"``) helps only if peers can dial this node."""
    relay = status.nat.relay_service
    if relay.mode == "on" and status.reachability != "public":
        findings.append(f"relay service: on, but this node's reachability is {status.reachability}.")
        advice.append('A relay helps only when peers can dial it: set relay_service = "auto" in [nat], or '
                      "make the node reachable (port forward, public IP).")


def _blockers(status: Status, findings: list[str], advice: list[str]) -> bool:
    """What keeps the node from taking part at all: a full disk, refused genesis offers."""
    blocked = False
    if status.disk_full:
        blocked = True
        findings.append(f"disk full: the store in {status.home} could not log a contribution; new ones are "
                        "refused until there is room.")
        advice.append(f"Free space on the disk of {status.home}; the node resumes by itself.")
    if status.join.refused:
        findings.append(f"refused the genesis of {len(status.join.refused)} peer(s):")
        findings += [f"  {peer}: {why}" for peer, why in sorted(status.join.refused.items())]
        if status.genesis is None:
            blocked = True
            advice.append("No acceptable genesis yet: the run name, task, [task] options and [node] genesis "
                          "must match the run's; `meshtrain init --join <invite>` writes matching ones.")
    return blocked
