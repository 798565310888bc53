"""The commented ``config.toml`` that ``meshtrain init`` writes: every key with its default and a line on
what it does (the keys themselves are defined and validated in ``daemon.config``)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import tomli_w

from daemon.config import Config, NodeConfig, TrainingConfig

__all__ = ["render_config"]

CONFIG_TEMPLATE = """\
# meshtrain node configuration. Every key is optional; the values shown are the defaults.
# Flags given to `meshtrain daemon` override this file.

[node]
# Name of the training run: peers of one run find each other and share one model.
run = {run}
# Multiaddrs to listen on (port 0: the OS chooses).
listen = {listen}
# Peers to join through, e.g. "/ip4/192.0.2.7/tcp/4001/p2p/12D3Koo...". Empty: this node founds the run.
bootstrap = {bootstrap}
# The run's genesis id (`meshtrain invite` carries it): a joiner accepts no other. Empty: take what the
# bootstrap peers serve (or found the run).
genesis = {genesis}
# A joiner whose own task initialization has exactly that id downloads nothing; false: always download.
rebuild_genesis = true
# Find peers of the run on the local network by multicast DNS.
mdns = false
# Private run: path (relative to this dir) of a swarm key made by `meshtrain swarm-key generate FILE`.
# swarm_key = "swarm.key"
# Only these peer ids may connect (empty: anyone holding the swarm key, or anyone if there is none).
# allow_peers = ["12D3Koo..."]
# Dial the private/loopback addresses peers announce (a LAN or one machine; off on the internet).
dial_private_addrs = false
# Snapshots a joiner may adopt must be vouched for by checkpoint signers (fixed in the genesis when this
# node founds the run): the founder, these peer ids, and allow_peers on a private run; quorum of them.
# checkpoint_signers = ["12D3Koo..."]
checkpoint_quorum = 1
# Robust aggregation, fixed in the genesis when this node founds the run: clip every contribution's
# weighted L2 norm to this (a few times the honest update norm; see SECURITY.md). 0: off.
clip_norm = 0.0
# Pace and clip every author by the others' progress, fixed in the genesis when this node founds the run:
# one moves the model by at most clip_norm per this many contributions of others, however many records
# it signs (at most members - 1; an author alone waits for others). 0: off.
influence_window = 0
# An open run may ask every author for this many bits of proof of work, once, before its records count
# (24: about 7 s of one core; flooding the author cap with throwaway keys then costs CPU-hours). 0: off.
admission_bits = 0

[nat]
# NAT traversal (`meshtrain doctor` explains what to do behind NAT; keys of p2p.NatConfig).
# Learn whether this node is reachable from outside (AutoNAT):
autonat = true
# Relay for peers behind NAT: "auto" (while AutoNAT says this node is public), "on" or "off", within
# limits (slots, circuits per peer, circuit duration and bytes).
relay_service = "auto"
relay_max_reservations = 32
relay_circuit_duration_s = 1800
relay_circuit_bytes = 134217728
# Behind NAT: reserve a slot on a relay and advertise the relayed address; hole punch to direct.
use_relays = true
hole_punch = true

[training]
# Train locally (a node with training off still merges and serves the model).
enabled = true
# "stdlib-lm" (byte-level transformer on Python's own source), "digits" (tiny, fast), or "pkg.mod:factory".
task = {task}
# Stop local training after this many rounds (0: train until stopped).
max_rounds = {max_rounds}
# CPU threads for the training process.
threads = 1
# Evaluate the merged model every this many local rounds.
eval_every = 5
# Data: -1 streams the whole training set in this node's own order (no coordination needed); or a shard
# of num_shards (the local cluster harness uses that).
shard = -1
num_shards = 4
# Train this many times slower than the hardware allows (idle between rounds), e.g. 2.0 on a shared desktop.
# Start each round only once every peer training now has contributed since this node's last round began
# (synchronous DiLoCo: better loss on equal machines; a slow peer then sets everyone's pace).
lockstep = false
slowdown = 1.0
# A founder's genesis takes its parameters from this safetensors file (`meshtrain init --from-checkpoint`).
init_from = {init_from}

[sync]
# Anti-entropy period in seconds, and the most contributions shipped per response. Announcements trigger
# the pulls that matter; the period only repairs what gossip missed, and costs bytes even when idle.
interval_s = 30.0
max_batch = 64
# Random peers pulled from per period: keeps each node's control traffic flat as the mesh grows.
fanout = 1
request_timeout_s = 30.0
# Snapshot (and compact history every known peer already has) after this many new contributions.
snapshot_every = 256
# A peer silent this long stops holding history back (it catches up from a snapshot when it returns).
member_ttl_s = 3600.0

[api]
# Control socket (mode 0600), relative to the home dir or absolute ("/run/meshtrain/control.sock").
socket = "control.sock"
# Group given the socket (mode 0660): its members may drive this node without being its user.
socket_group = ""
# Optional TCP control listener, e.g. "127.0.0.1:8466" (loopback only unless tcp_allow_remote = true).
# Every request must send "Authorization: Bearer <the token in token_file>" (made 0600 by `meshtrain init`).
tcp_listen = ""
token_file = "api.token"

[log]
# DEBUG, INFO, WARNING or ERROR. `systemctl reload meshtrain` (SIGHUP) applies a change.
level = "INFO"
# Lines on stderr (the journal): "logfmt" (key=value) or "json" (one object per line, for log shippers).
format = "logfmt"

[limits]
# Cap on bytes/s sent to peers in sync traffic (0: no cap). Reloaded on SIGHUP; also `meshtrain limits`.
bandwidth_bytes_per_s = 0

[metrics]
# Prometheus metrics at http://<listen>/metrics. Another host than loopback exposes them to the network.
enabled = false
listen = "127.0.0.1:9464"

[dashboard]
# Read-only web page (peers, loss curves, bytes) at http://<listen>/. Loopback only.
enabled = false
listen = "127.0.0.1:8465"

{task_section}
[diloco]
# Passed to training.DilocoConfig over the task's tuned defaults (stdlib-lm: H=20, rice-q8 at 10 %), e.g.:
# inner_steps = 20
# codec = "rice-q8"      # or dense-f32, dense-bf16, sparse-f32, sparse-q8, sparse-q4, sparse-q2,
#                        # rice-q2, rice-q1, chunked-q2, dct-q8
# topk_density = 0.015625
# residual_decay = 1.0   # error feedback's beta
"""
TASK_COMMENT = """\
# Options of the task's model and data (`meshtrain task options NAME` lists them), e.g. for stdlib-lm:
# n_layer = 4
# n_embd = 128
"""


def render_config(
    *,
    run: str = "default",
    listen: tuple[str, ...] = NodeConfig().listen,
    bootstrap: tuple[str, ...] = (),
    task: str = TrainingConfig().task,
    max_rounds: int = 0,
    genesis: str = "",
    task_options: Mapping[str, Any] | None = None,
    init_from: str = "",
) -> str:
    """The commented config file that ``meshtrain init`` writes.

    Raises:
        ConfigError: an argument is not a valid value (say, a run name with a quote in it); checked
            before rendering, so a value can never break the TOML.
    """
    node = {"run": run, "listen": list(listen), "bootstrap": list(bootstrap), "genesis": genesis}
    training = {"task": task, "max_rounds": max_rounds, "init_from": init_from}
    Config.from_dict({"node": node, "training": training, "task": dict(task_options or {})})
    text = CONFIG_TEMPLATE.format(
        run=_toml_string(run),
        listen=_toml_list(listen),
        bootstrap=_toml_list(bootstrap),
        task=_toml_string(task),
        genesis=_toml_string(genesis),
        max_rounds=max_rounds,
        init_from=_toml_string(init_from),
        task_section="[task]\n" + TASK_COMMENT + _toml_table("task", task_options or {}),
    )
    Config.from_dict(tomllib.loads(text))  # what init writes must load
    return text


def _toml_table(name: str, table: Mapping[str, Any]) -> str:
    """The keys of a table (and its sub-tables, headed ``[name.sub]``), without its own header."""
    return tomli_w.dumps({name: dict(table)}).removeprefix(f"[{name}]\n")


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_string(item) for item in items) + "]"


def _toml_string(value: str) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()
