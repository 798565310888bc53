"""Where a cluster run's bytes go: model payloads, record envelopes, gossip, anti-entropy, transport.

Three measured totals, summed over the daemons:

* ``wire``: TCP payload bytes the daemons sent: everything libp2p puts on the wire (Noise, yamux and
  multistream framing, identify and ping, DHT discovery, AutoNAT dial-backs, gossipsub envelopes, control
  messages and forwarding). Measured exactly when the benchmark runs in its own network namespace
  (:func:`enter_private_netns`, root only): the namespace's loopback counts every packet, and the TCP
  payload is its bytes less 52 header bytes (IPv4, TCP, timestamps) per packet; ``ip_bytes`` keeps the
  headers. Otherwise ``ss -tin``'s ``bytes_acked`` of each daemon's established sockets at the end, which
  misses connections that closed during the run (AutoNAT dial-backs). The trainer child talks over a pipe
  and the control API over a Unix socket: neither is counted.
* ``app``: the daemons' own counter (``p2p.Host.stats()["bytes_sent"]``): request, response and published
  gossip bodies, each gossip message counted once at its publisher.
* ``payload``: the model updates themselves, ``payload_bytes x (N - 1)`` per contribution (each peer
  needs every other peer's update once).

Between them: ``envelope`` (each record's signature, author, ids and base version around its payload,
once per recipient; encoded here with the run's values), ``gossip`` (heartbeats and announcements as
published, likewise), ``sync`` (the rest of ``app``: digests in anti-entropy requests and answers, pulls
that found nothing new, records received twice), ``genesis`` (the blob bytes the daemons fetched:
joiners' genesis downloads, 4 bytes per parameter, and snapshots; blobs are not in ``app``, the host
counts request, response and gossip bodies only; 0 when every joiner rebuilt the genesis from its own
initialization, as DDP's ranks do) and ``transport`` (``wire - app - genesis``). Shares are of
``payload``.

Rejected: counting bytes inside the daemons per protocol (daemon/ and p2p/ belong to others; the kernel's
count is the ground truth and needs no change there); libpcap on loopback (a dependency, and the
namespace's counters give the same totals).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any

import crdt
from daemon.node import wire

_PID = re.compile(r"pid=(\d+)")
_ACKED = re.compile(r"\bbytes_acked:(\d+)")
_CLONE_NEWNET = 0x40000000  # <sched.h>
_HEADER_BYTES = 52  # per packet on loopback: IPv4 (20) + TCP (20) + the timestamps option (12)


def enter_private_netns() -> bool:
    """Move this process (its calling thread, and every child started from it) into a new network
    namespace with its loopback up, so its counters see only this benchmark. False where not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        return False
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return True


def loopback_sent() -> tuple[int, int]:
    """(bytes, packets) the loopback interface of this network namespace has carried."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            fields = counters.split()
            return int(fields[8]), int(fields[9])  # transmit bytes, packets
    raise RuntimeError("no loopback interface in /proc/net/dev")


def tcp_payload(ip_bytes: int, packets: int) -> int:
    return ip_bytes - _HEADER_BYTES * packets


def tcp_bytes_sent(pids: set[int]) -> dict[int, int]:
    """pid -> TCP payload bytes its established sockets sent (acknowledged), from ``ss -tinpH``."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    sent = dict.fromkeys(pids, 0)
    owner: int | None = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket line; its tcp_info follows on the next line
            match = _PID.search(line)
            owner = int(match.group(1)) if match else None
            continue
        if owner in sent and (acked := _ACKED.search(line)):
            sent[owner] += int(acked.group(1))
    return sent


def _envelope_bytes(codec: str, payload_bytes: int) -> int:
    """Bytes of a contribution record around a payload of this size (signature, ids, base version)."""
    signer = crdt.Signer.from_seed(hashlib.sha256(b"bench-envelope").digest())
    record = crdt.make_contribution(
        signer, genesis_id="0" * 64, seq=1, fragment=0, codec=codec, payload=bytes(payload_bytes),
        weight=1.0, base_version=bytes(32),
    )
    return len(record.encode()) - payload_bytes


def breakdown(
    statuses: list[dict[str, Any]],
    histories: list[list[dict[str, Any]]],
    wire_total: int,
    *,
    codec: str,
) -> dict[str, Any]:
    """The byte accounting of the module docstring (totals over all daemons)."""
    peers = len(statuses)
    records = [r for h in histories for r in h]
    payload = sum(r["payload_bytes"] for r in records) * (peers - 1)
    mean_payload = payload // max(1, len(records) * (peers - 1))
    envelope = len(records) * (peers - 1) * _envelope_bytes(codec, mean_payload)
    genesis = sum(int(s["p2p"].get("blob_bytes_fetched", 0)) for s in statuses)
    app = sum(int(s["bytes_sent"]) for s in statuses)
    published = sum(int(s["p2p"].get("gossip_published", 0)) for s in statuses)
    beat = wire.Heartbeat(
        round=len(records) // peers, contributions=len(records), training="running", reachability="public",
        task=statuses[0]["task"], device="cpu", throughput_bps=10_000,
    )
    ann = wire.Announcement(author=bytes(32), seq=len(records) // peers, fragment=0, size=mean_payload,
                            id="0" * 64)
    announcements = len(records)
    heartbeats = max(0, published - announcements)  # what else a node publishes (checkpoints) is rare
    gossip = heartbeats * len(beat.encode()) + announcements * len(ann.encode())
    sync = max(0, app - payload - envelope - gossip)
    transport = wire_total - app - genesis
    uptime = max(float(s.get("uptime_s", 0.0)) for s in statuses)
    parts = {"envelope": envelope, "genesis": genesis, "gossip": gossip, "sync": sync, "transport": transport}
    return {
        "wire_bytes": wire_total,
        "app_bytes": app,
        "payload_bytes": payload,
        **{f"{name}_bytes": value for name, value in parts.items()},
        "overhead_share": round((wire_total - payload) / payload, 4) if payload else None,
        "training_overhead_share": round((wire_total - genesis - payload) / payload, 4) if payload else None,
        "shares": {name: round(value / payload, 4) for name, value in parts.items()} if payload else {},
        "per_round": {  # one round = every peer contributing once
            name: round(value * peers / max(1, len(records)))
            for name, value in {"payload": payload, **parts}.items()
        },
        "counts": {
            "contributions": len(records),
            "heartbeats": heartbeats,
            "pulls": sum(int(s["counters"].get("pulls", 0)) for s in statuses),
            "duplicates": sum(int(s["counters"].get("duplicates", 0)) for s in statuses),
            "requests": sum(int(s["p2p"].get("requests_sent", 0)) for s in statuses),
            "uptime_s": round(uptime, 1),
        },
    }
