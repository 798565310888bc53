"""Node configuration: a TOML file with documented defaults, validated on load.

The file has one table per component. Every key is optional; a missing key takes the default written
here. An unknown key, or a value of the wrong type, is an error that names the key, because a typo that
silently falls back to a default is the worst kind of configuration bug.

The ``[diloco]`` table is handed to :class:`training.DilocoConfig` as keyword arguments, which validates
it; this module only checks that it is a table, so training owns its own knobs.

Command-line flags override the file (see ``daemon.cli.local_commands``); ``Config.with_overrides`` builds
the merged value.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ApiConfig",
    "Config",
    "ConfigError",
    "DashboardConfig",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "NodeConfig",
    "SyncConfig",
    "TrainingConfig",
    "default_home",
    "load_config",
]

CONFIG_FILE = "config.toml"


class ConfigError(ValueError):
    """The configuration file or a flag has a bad key or value; the message names it."""


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    run: str = "default"
    """Name of the training run. Peers of one run find each other and share one model."""
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    """Multiaddrs to listen on. Port 0 lets the OS choose."""
    bootstrap: tuple[str, ...] = ()
    """Multiaddrs (ending in /p2p/<peer id>) of peers to join through. Empty: this node founds the run."""
    mdns: bool = False
    """Discover peers of the run on the local network by multicast DNS."""
    swarm_key: str = ""
    """Path (relative to the home dir) of the run's swarm key: a private network only key holders can
    join (``meshtrain swarm-key generate FILE``; see SECURITY.md). Empty: an open network."""
    allow_peers: tuple[str, ...] = ()
    """If not empty, only these peer ids may connect, send requests or author gossip."""
    autonat: bool = True
    """Ask peers to dial us back (AutoNAT) to learn whether this node is publicly reachable."""
    autonat_confirmations: int = 1
    """Peers that must agree before reachability flips to public/private (libp2p's default is 4)."""
    relay_service: bool = False
    """Relay traffic (Circuit Relay v2, with limits) for peers behind NAT. Turn on for public nodes."""
    use_relays: bool = True
    """Unless publicly reachable: reserve a slot on a relay peer and advertise a /p2p-circuit address."""
    hole_punch: bool = True
    """Upgrade relayed connections to direct ones by hole punching (DCUtR)."""
    clip_norm: float = 0.0
    """Robust aggregation for a run this node founds: every contribution's weighted L2 norm is clipped to
    this (deterministically, on every replica; see crdt ``Limits.clip_norm``). Written into the genesis,
    so it is fixed for the run's lifetime and a joiner's own value is ignored. 0: off. Pick a few times
    the honest update norm (``/v1/history`` ``update_norm``); digits tests use 0.3."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    enabled: bool = True
    """Train locally. A node with training off still stores, merges and serves the model."""
    task: str = "stdlib-lm"
    """Task name ("stdlib-lm", "digits") or a plug-in "package.module:factory"."""
    max_rounds: int = 0
    """Stop local training after this many rounds; 0 trains until stopped."""
    threads: int = 1
    """CPU threads for the training process (torch.set_num_threads)."""
    eval_every: int = 5
    """Evaluate the merged model on the validation set every this many local rounds."""
    shard: int = -1
    """Data shard of this node; -1 derives one from the peer id."""
    num_shards: int = 4
    """Number of data shards the training set is split into."""
    slowdown: float = 1.0
    """Run this many times slower than the hardware allows (idles after each round): to share a machine,
    or to test that a slow peer does not stall the others."""
    byzantine: str = ""
    """TEST ONLY: make this node a Byzantine attacker. "flip10" negates its updates and scales them by 10
    before signing them (validly, with its own key). Used by tests/integration/test_byzantine.py to show
    that clipping and suspect detection work; never set it on a real node. Empty: honest."""

    def __post_init__(self) -> None:
        if self.byzantine not in BYZANTINE_MODES:
            raise ConfigError(f"training.byzantine must be one of {BYZANTINE_MODES}, got {self.byzantine!r}")


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    interval_s: float = 2.0
    """Anti-entropy period: how often this node asks a peer for what it is missing."""
    max_batch: int = 64
    """Most contributions shipped in one anti-entropy response."""
    fanout: int = 3
    """Peers (chosen at random) pulled from per anti-entropy period."""
    request_timeout_s: float = 30.0
    """Deadline of one request to a peer."""
    snapshot_every: int = 256
    """Write a snapshot (and compact the log and the in-memory history) after this many new contributions."""


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    socket: str = "control.sock"
    """Control socket path, relative to the home dir. Mode 0600."""
    tcp_listen: str = ""
    """host:port of an optional TCP control listener (same API; every request must carry
    ``Authorization: Bearer <token>``). Empty: none. Loopback only unless ``tcp_allow_remote``."""
    tcp_allow_remote: bool = False
    """Allow a non-loopback ``tcp_listen`` host. The token is sent in clear text over plain HTTP: only
    behind a TLS-terminating proxy or on a trusted network."""
    token_file: str = "api.token"
    """File (relative to the home dir) holding the TCP listener's bearer token; created 0600 with a random
    token by ``meshtrain init`` or at first start, refused if group/others can read it."""

    def __post_init__(self) -> None:
        if self.tcp_listen:
            host, _ = parse_listen("api.tcp_listen", self.tcp_listen)
            if host not in LOOPBACK_HOSTS and not self.tcp_allow_remote:
                raise ConfigError(
                    f"api.tcp_listen must be a loopback address (127.0.0.1, ::1), got {host!r}; "
                    "set api.tcp_allow_remote = true to expose the control API"
                )


BYZANTINE_MODES = ("", "flip10")  # training.byzantine (test-only attacker; see daemon/node/byzantine.py)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    level: str = "INFO"
    """Log level: DEBUG, INFO, WARNING or ERROR (reloaded on SIGHUP)."""

    def __post_init__(self) -> None:
        if self.level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log.level must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")
        object.__setattr__(self, "level", self.level.upper())


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    bandwidth_bytes_per_s: int = 0
    """Cap on the bytes per second this node sends to peers in sync traffic; 0: no cap."""


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = False
    """Serve Prometheus metrics at http://<listen>/metrics."""
    listen: str = "127.0.0.1:9464"
    """host:port of the metrics HTTP server. Loopback by default; another address exposes the metrics."""

    def __post_init__(self) -> None:
        parse_listen("metrics.listen", self.listen)


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    enabled: bool = False
    """Serve a read-only web dashboard at http://<listen>/ (peers, loss curves, bytes)."""
    listen: str = "127.0.0.1:8465"
    """host:port of the dashboard; loopback only. May equal metrics.listen (one server serves both)."""

    def __post_init__(self) -> None:
        host, _ = parse_listen("dashboard.listen", self.listen)
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(f"dashboard.listen must be a loopback address (127.0.0.1, ::1), got {host!r}")


def parse_listen(name: str, value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); raise ConfigError naming the key."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port, e.g. 127.0.0.1:9464, got {value!r}")
    return host, int(port)


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "training": TrainingConfig,
    "sync": SyncConfig,
    "api": ApiConfig,
    "log": LogConfig,
    "limits": LimitsConfig,
    "metrics": MetricsConfig,
    "dashboard": DashboardConfig,
}


@dataclass(frozen=True, kw_only=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    diloco: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for training.DilocoConfig (validated there)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        sections: dict[str, Any] = {}
        for name, value in data.items():
            if name == "diloco":
                if not isinstance(value, dict):
                    raise ConfigError("[diloco] must be a table")
                sections["diloco"] = dict(value)
            elif name in _SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"[{name}] must be a table")
                sections[name] = _build_section(name, _SECTIONS[name], value)
            else:
                raise ConfigError(f"unknown section [{name}] (known: {', '.join([*_SECTIONS, 'diloco'])})")
        return cls(**sections)

    def with_overrides(self, section: str, **values: Any) -> Config:
        """Return a copy with some keys of one section replaced (flags override the file)."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        if section == "diloco":
            return dataclasses.replace(self, diloco={**self.diloco, **values})
        current = getattr(self, section)
        merged = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)} | values
        return dataclasses.replace(self, **{section: _build_section(section, type(current), merged)})


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"[{section}] unknown key {key!r} (known: {', '.join(fields)})")
        kwargs[key] = _coerce(f"{section}.{key}", fields[key].default, value)
    return cls(**kwargs)


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Check ``value`` against the type of the field's default, converting lists to tuples."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if value < -1:
            raise ConfigError(f"{name} must not be negative, got {value}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if value < 0 or (value == 0 and default != 0):  # a 0.0 default means "off": 0 is allowed
            raise ConfigError(f"{name} must be positive, got {value}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str) or (not value and default):  # an empty default means "off"
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{name}: unsupported type")  # pragma: no cover - every field is covered above


def load_config(home: Path) -> Config:
    """Read ``home/config.toml``; a missing file means all defaults."""
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except UnicodeDecodeError as exc:  # found by fuzzing: must be a named config error, not a crash
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Config.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def default_home() -> Path:
    """Per-user state dir (XDG), or $MESHTRAIN_HOME when set."""
    if env := os.environ.get("MESHTRAIN_HOME"):
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "meshtrain"


CONFIG_TEMPLATE = """\
# meshtrain node configuration. Every key is optional; the values shown are the defaults.
# Flags given to `meshtrain daemon` override this file.

[node]
# Name of the training run: peers of one run find each other and share one model.
run = "{run}"
# Multiaddrs to listen on (port 0: the OS chooses).
listen = {listen}
# Peers to join through, e.g. "/ip4/192.0.2.7/tcp/4001/p2p/12D3Koo...". Empty: this node founds the run.
bootstrap = {bootstrap}
# Find peers of the run on the local network by multicast DNS.
mdns = false
# Private run: path (relative to this dir) of a swarm key made by `meshtrain swarm-key generate FILE`.
# swarm_key = "swarm.key"
# Only these peer ids may connect (empty: anyone holding the swarm key, or anyone if there is none).
# allow_peers = ["12D3Koo..."]
# NAT traversal (`meshtrain doctor` explains what to do behind NAT). Learn our reachability (AutoNAT):
autonat = true
# Relay for peers behind NAT (public nodes): relay_service = true
relay_service = false
# Behind NAT: reserve a slot on a relay and advertise the relayed address; hole punch to direct.
use_relays = true
hole_punch = true
# Robust aggregation, fixed in the genesis when this node founds the run: clip every contribution's
# weighted L2 norm to this (a few times the honest update norm; see SECURITY.md). 0: off.
clip_norm = 0.0

[training]
# Train locally (a node with training off still merges and serves the model).
enabled = true
# "stdlib-lm" (byte-level transformer on Python's own source), "digits" (tiny, fast), or "pkg.mod:factory".
task = "{task}"
# Stop local training after this many rounds (0: train until stopped).
max_rounds = {max_rounds}
# CPU threads for the training process.
threads = 1
# Evaluate the merged model every this many local rounds.
eval_every = 5
# Data shard of this node (-1: derived from the peer id) out of num_shards.
shard = -1
num_shards = 4
# Train this many times slower than the hardware allows (idle between rounds), e.g. 2.0 on a shared desktop.
slowdown = 1.0

[sync]
# Anti-entropy period in seconds, and the most contributions shipped per response.
interval_s = 2.0
max_batch = 64
# Random peers pulled from per period: keeps each node's control traffic flat as the mesh grows.
fanout = 3
request_timeout_s = 30.0
# Snapshot (and compact history every known peer already has) after this many new contributions.
snapshot_every = 256

[api]
# Control socket (mode 0600), relative to the home dir.
socket = "control.sock"
# Optional TCP control listener, e.g. "127.0.0.1:8466" (loopback only unless tcp_allow_remote = true).
# Every request must send "Authorization: Bearer <the token in token_file>" (made 0600 by `meshtrain init`).
tcp_listen = ""
token_file = "api.token"

[log]
# DEBUG, INFO, WARNING or ERROR. `systemctl reload meshtrain` (SIGHUP) applies a change.
level = "INFO"

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

[diloco]
# Passed to training.DilocoConfig, e.g.:
# inner_steps = 20
# codec = "sparse-q8"    # or dense-f32, dense-bf16, sparse-f32, sparse-q4, sparse-q2, dct-q8
# topk_density = 0.02
"""


def render_config(
    *,
    run: str = "default",
    listen: tuple[str, ...] = NodeConfig.listen,
    bootstrap: tuple[str, ...] = (),
    task: str = TrainingConfig.task,
    max_rounds: int = 0,
) -> str:
    """The commented config file that ``meshtrain init`` writes."""
    text = CONFIG_TEMPLATE.format(
        run=run,
        listen=_toml_list(listen),
        bootstrap=_toml_list(bootstrap),
        task=task,
        max_rounds=max_rounds,
    )
    Config.from_dict(tomllib.loads(text))  # what init writes must load
    return text


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"
