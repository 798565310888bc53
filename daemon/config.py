"""Node configuration: a TOML file with documented defaults, validated on load, on every flag and on SIGHUP.

The file has one table per component. Every key is optional; a missing key takes the default written
here. An unknown key, a value of the wrong type or out of range, a malformed multiaddr, or keys that
contradict each other (a shard beyond the shard count) are errors that name the key, because a typo that
silently falls back to a default, or a value that crashes a started node later, is the worst kind of
configuration bug. A config error exits the daemon with ``EX_CONFIG`` (78), which the systemd unit does
not restart on.

msgspec validates (types, ranges, unknown keys) and this module turns its messages into ones that name the
key the way the file spells it (``training.eval_every must be an integer >= 1, got 0``). Rejected:
pydantic (0.25 s to import on every CLI command against msgspec's 0.04 s; its messages are richer, but
ours name the key either way) and the hand-written type checks this module used before (they knew types,
not ranges or multiaddrs).

The ``[diloco]`` and ``[task]`` tables are handed to ``training`` (``DilocoConfig``, the task's
``Config``) and ``[nat]`` to ``p2p.NatConfig``, which validate them; this module only checks that they
are tables, so each package owns its own knobs and no field is copied from one config type to another.
Command-line flags override the file (``daemon.cli.local_commands``); ``Config.with_overrides`` builds
the merged value and validates it again.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec
from multiaddr import Multiaddr

from daemon.config_errors import explain

__all__ = [
    "CONFIG_FILE",
    "EX_CONFIG",
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
    "load_config",
    "load_config_sources",
    "parse_listen",
    "task_path",
]

CONFIG_FILE = "config.toml"
EX_CONFIG = 78  # sysexits.h: configuration error (the unit's RestartPreventExitStatus)
BYZANTINE_MODES = ("", "flip10")  # training.byzantine (test-only attacker; see daemon/node/byzantine.py)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("logfmt", "json")  # daemon/service/logs.py renders both
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_SYNC_BATCH = 4096  # a sync answer carries at most this many records (daemon/node/wire.py)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # goes into topic names and DHT keys
GENESIS_ID = re.compile(r"^([0-9a-f]{64})?$")


class ConfigError(ValueError):
    """The configuration file or a flag has a bad key or value; the message names it."""


class _Section(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A table of the config file: keyword-only, immutable, unknown keys refused."""


def _multiaddrs(key: str, values: tuple[str, ...], *, peer_id: bool) -> None:
    for value in values:
        try:
            protocols = [p.name for p in Multiaddr(value).protocols()]
        except Exception as exc:  # py-multiaddr raises several types for bad input
            raise ValueError(f"{key}: {value!r} is not a multiaddr ({exc})") from None
        if "tcp" not in protocols:
            raise ValueError(f"{key}: {value!r} has no /tcp/<port> (meshtrain listens and dials over TCP)")
        if peer_id and protocols[-1] != "p2p":
            raise ValueError(f"{key}: {value!r} must end in /p2p/<peer id> (`meshtrain id` on that peer)")


def _peer_ids(key: str, values: tuple[str, ...]) -> None:
    for value in values:
        try:
            Multiaddr(f"/p2p/{value}")
        except Exception:  # py-multiaddr raises several types for bad input
            raise ValueError(f"{key}: {value!r} is not a peer id (`meshtrain id` prints one)") from None


class NodeConfig(_Section):
    run: str = "default"
    """Name of the training run. Peers of one run find each other and share one model."""
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    """Multiaddrs to listen on. Port 0 lets the OS choose."""
    bootstrap: tuple[str, ...] = ()
    """Multiaddrs (ending in /p2p/<peer id>) of peers to join through. Empty: this node founds the run."""
    genesis: str = ""
    """Id of the run's genesis (64 hex digits, ``meshtrain invite`` carries it). A joiner accepts only
    this genesis from its peers. Empty: whatever a bootstrap peer serves (or found the run)."""
    rebuild_genesis: bool = True
    """A joiner first builds the genesis from its task's initialization and, when that has exactly the
    offered id, downloads nothing (daemon/node/genesis.py). False: always download (the rebuild costs one
    model initialization, wasted when the founder started from ``init_from`` weights)."""
    mdns: bool = False
    """Discover peers of the run on the local network by multicast DNS."""
    swarm_key: str = ""
    """Path (relative to the home dir) of the run's swarm key: a private network only key holders can
    join (``meshtrain swarm-key generate FILE``; see SECURITY.md). Empty: an open network."""
    allow_peers: tuple[str, ...] = ()
    """If not empty, only these peer ids may connect, send requests or author gossip."""
    checkpoint_signers: tuple[str, ...] = ()
    """For a run this node founds: peer ids whose signed checkpoints vouch for snapshots, besides the
    founder itself and, on a private run, ``allow_peers`` (SECURITY.md). Written into the genesis."""
    checkpoint_quorum: Annotated[int, msgspec.Meta(ge=1)] = 1
    """For a run this node founds: how many signers must vouch for a snapshot before a joiner adopts it
    (capped at the number of signers). Above half the signers is the safe choice."""
    dial_private_addrs: bool = False
    """Let discovery dial the private, loopback and link-local addresses peers announce. Off on the
    internet (a peer could point the run at hosts inside your network); on for a LAN or one machine."""
    clip_norm: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Robust aggregation for a run this node founds: every contribution's weighted L2 norm is clipped to
    this (deterministically, on every replica; see crdt ``Limits.clip_norm``). Written into the genesis,
    so it is fixed for the run's lifetime and a joiner's own value is ignored. 0: off. Pick a few times
    the honest update norm (``/v1/history`` ``update_norm``); digits tests use 0.3."""
    influence_window: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0
    """For a run this node founds: pace and clip every author by the others' progress (crdt/_window.py,
    SECURITY.md): an author's records wait for other authors' contributions, and one moves the model by at
    most ``clip_norm`` per this many contributions of others. Set it to at most the others'
    contributions per round (members - 1); a node training alone then waits for others. Written into the
    genesis. 0: off."""
    admission_bits: Annotated[int, msgspec.Meta(ge=0, le=40)] = 0
    """For an open run this node founds: every author must prove this many bits of work once before its
    records count (crdt/admission.py; 2**bits hashes, 24: about 7 s of one core), so filling the author
    cap with throwaway keys costs CPU-hours. Written into the genesis. 0: off (a private run's allowlist
    needs none)."""

    def __post_init__(self) -> None:
        if not RUN_NAME.match(self.run):
            raise ValueError(
                f"node.run must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                f"got {self.run!r}"
            )
        if not GENESIS_ID.match(self.genesis):
            raise ValueError(f"node.genesis must be 64 lowercase hex digits (or empty), got {self.genesis!r}")
        _multiaddrs("node.listen", self.listen, peer_id=False)
        _multiaddrs("node.bootstrap", self.bootstrap, peer_id=True)
        _peer_ids("node.allow_peers", self.allow_peers)
        _peer_ids("node.checkpoint_signers", self.checkpoint_signers)


class TrainingConfig(_Section):
    enabled: bool = True
    """Train locally. A node with training off still stores, merges and serves the model."""
    task: str = "stdlib-lm"
    """Task name ("stdlib-lm", "digits") or a plug-in "package.module:factory"."""
    max_rounds: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Stop local training after this many rounds; 0 trains until stopped."""
    threads: Annotated[int, msgspec.Meta(ge=1)] = 1
    """CPU threads for the training process (torch.set_num_threads)."""
    eval_every: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Evaluate the merged model on the validation set every this many local rounds."""
    shard: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """Data shard of this node out of ``num_shards``; -1 (the default): the whole training set, in an
    order of this node's own (seeded from its key), which needs no coordination between machines."""
    num_shards: Annotated[int, msgspec.Meta(ge=1)] = 4
    """Number of data shards the training set is split into (only with ``shard >= 0``)."""
    lockstep: bool = False
    """Start each round only once every peer training now has contributed since this node's previous
    round began (synchronous DiLoCo: every round's updates come from one merged model; at most
    ``lockstep_timeout_s`` of waiting). Free-running peers apply each other's updates a round late, which
    cost loss in bench/convergence (4 daemons, outer lr 2: +10 % vs DDP free-running against +2.6 % in
    lockstep simulation). Off: a slow peer never holds the others back."""
    lockstep_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """The longest a round waits for its peers in lockstep (a peer gone without a goodbye)."""
    slowdown: Annotated[float, msgspec.Meta(ge=1)] = 1.0
    """Run this many times slower than the hardware allows (idles after each round): to share a machine,
    or to test that a slow peer does not stall the others."""
    init_from: str = ""
    """A founder's genesis takes its parameters from this safetensors file (absolute, as ``meshtrain init
    --from-checkpoint`` writes it). Empty: the task's fresh initialization. A joiner ignores it."""
    byzantine: str = ""
    """TEST ONLY: make this node a Byzantine attacker. "flip10" negates its updates and scales them by 10
    before signing them (validly, with its own key). Used by tests/integration/test_byzantine.py to show
    that clipping and suspect detection work; never set it on a real node. Empty: honest."""

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("training.task must be a non-empty string")
        if self.byzantine not in BYZANTINE_MODES:
            raise ValueError(f"training.byzantine must be one of {BYZANTINE_MODES}, got {self.byzantine!r}")
        if self.shard >= self.num_shards:
            raise ValueError(
                f"training.shard must be below training.num_shards ({self.num_shards}), got {self.shard}"
            )


class SyncConfig(_Section):
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Anti-entropy period: how often this node asks a peer for what it is missing. It only repairs what
    gossip missed (every announcement of a contribution triggers its own pull, and the author's next one
    brings everything older too): each period costs two digests per peer pulled from whether anything is
    missing or not, which at 2 s and 3 peers was a third of a 0.28M-parameter run's payload bytes."""
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_SYNC_BATCH)] = 64
    """Most contributions shipped in one anti-entropy response."""
    fanout: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Peers (chosen at random) pulled from per anti-entropy period (push-pull with one peer already
    reaches every node in a number of periods logarithmic in the mesh size)."""
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Deadline of one request to a peer."""
    snapshot_every: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Write a snapshot (and compact the log and the in-memory history) after this many new contributions."""
    member_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """A peer not heard from for this long no longer holds history back from compaction (when it returns
    it catches up from a snapshot)."""


class ApiConfig(_Section):
    socket: str = "control.sock"
    """Control socket path, relative to the home dir or absolute (a system service's
    ``/run/meshtrain/control.sock``). Mode 0600, or 0660 with ``socket_group``."""
    socket_group: str = ""
    """Group given the control socket (mode 0660): its members drive the node without being its user.
    Empty: only the daemon's own user (mode 0600)."""
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
        if not self.socket or not self.token_file:
            raise ValueError("api.socket and api.token_file must be non-empty paths")
        if self.tcp_listen:
            host, _ = parse_listen("api.tcp_listen", self.tcp_listen)
            if host not in LOOPBACK_HOSTS and not self.tcp_allow_remote:
                raise ValueError(
                    f"api.tcp_listen must be a loopback address (127.0.0.1, ::1), got {host!r}; "
                    "set api.tcp_allow_remote = true to expose the control API"
                )


class LogConfig(_Section):
    level: str = "INFO"
    """Log level: DEBUG, INFO, WARNING or ERROR (reloaded on SIGHUP)."""
    format: str = "logfmt"
    """Lines on stderr: "logfmt" (key=value) or "json" (one object per line, for log shippers). The
    ring buffer of ``meshtrain logs`` is logfmt either way."""

    def __post_init__(self) -> None:
        if self.level.upper() not in LOG_LEVELS:
            raise ValueError(f"log.level must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")
        if self.format not in LOG_FORMATS:
            raise ValueError(f"log.format must be one of {', '.join(LOG_FORMATS)}, got {self.format!r}")
        msgspec.structs.force_setattr(self, "level", self.level.upper())


class LimitsConfig(_Section):
    bandwidth_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Cap on the bytes per second this node sends to peers in sync traffic; 0: no cap."""


class MetricsConfig(_Section):
    enabled: bool = False
    """Serve Prometheus metrics at http://<listen>/metrics."""
    listen: str = "127.0.0.1:9464"
    """host:port of the metrics HTTP server. Loopback by default; another address exposes the metrics."""

    def __post_init__(self) -> None:
        parse_listen("metrics.listen", self.listen)


class DashboardConfig(_Section):
    enabled: bool = False
    """Serve a read-only web dashboard at http://<listen>/ (peers, loss curves, bytes)."""
    listen: str = "127.0.0.1:8465"
    """host:port of the dashboard; loopback only. May equal metrics.listen (one server serves both)."""

    def __post_init__(self) -> None:
        host, _ = parse_listen("dashboard.listen", self.listen)
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"dashboard.listen must be a loopback address (127.0.0.1, ::1), got {host!r}")


def parse_listen(name: str, value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); raise ConfigError naming the key."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port, e.g. 127.0.0.1:9464, got {value!r}")
    return host, int(port)


class Config(_Section):
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    training: TrainingConfig = msgspec.field(default_factory=TrainingConfig)
    sync: SyncConfig = msgspec.field(default_factory=SyncConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    diloco: dict[str, Any] = msgspec.field(default_factory=dict)
    """Keyword arguments for training.DilocoConfig (validated there)."""
    task: dict[str, Any] = msgspec.field(default_factory=dict)
    """Options of the task's Config (validated by training when the task is built)."""
    nat: dict[str, Any] = msgspec.field(default_factory=dict)
    """Keyword arguments for p2p.NatConfig: AutoNAT, relay service and use, hole punching (validated there
    when the node starts)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Validate ``data`` (a parsed TOML document). Raises ConfigError naming the key."""
        try:
            return msgspec.convert(data, cls)
        except (msgspec.ValidationError, ConfigError) as exc:
            raise ConfigError(explain(str(exc), data, Config)) from None

    def to_dict(self) -> dict[str, Any]:
        """The plain (TOML-ready) form; ``from_dict(to_dict())`` gives back an equal config."""
        return msgspec.to_builtins(self)

    def with_overrides(self, section: str, **values: Any) -> Config:
        """Return a copy with some keys of one section replaced (flags override the file); ``None`` values
        are left out. Validated again: raises ConfigError naming the key."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        data = self.to_dict()
        data[section] = {**data.get(section, {}), **values}
        return Config.from_dict(data)


def load_config(home: Path) -> Config:
    """Read ``home/config.toml``; a missing file means all defaults. Raises ConfigError naming the file
    and the key (an unreadable file, a directory in its place and invalid TOML included)."""
    return load_config_sources(home)[0]


def load_config_sources(home: Path) -> tuple[Config, dict[str, str]]:
    """``load_config`` and where each value came from: ``{"node.run": "file", ...}``, every key of every
    table ("file" where config.toml sets it, "default" otherwise; ``[task]`` and ``[diloco]`` list only
    the keys the file sets). ``meshtrain config show`` adds the flags and environment on top."""
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except UnicodeDecodeError as exc:  # found by fuzzing: must be a named config error, not a crash
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        config = Config.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    sources = {
        f"{section}.{key}": "file" if key in data.get(section, {}) else "default"
        for section, table in config.to_dict().items()
        for key in table
    }
    return config, sources


def task_path(task: str, base: Path) -> str:
    """``task`` with a relative plug-in file (``path/to/file.py:Factory``) made absolute against ``base``
    (the home dir, where config.toml is), so the training process finds it whatever its cwd."""
    module, sep, attr = task.rpartition(":")
    if not sep or not module.endswith(".py") or Path(module).is_absolute():
        return task
    return f"{base / module}:{attr}"
