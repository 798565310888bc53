"""The status of one node: the typed contract between the node and everything that reports on it.

The node builds one :class:`Status` (``daemon/node/node.py``); the control API serves it as JSON
(``GET /v1/status``, documented in ``daemon/service/openapi.yaml``); the CLI's panel, ``doctor``, the
Prometheus collector, the cluster harness and the demo read it back with :func:`parse_status`. Every one
of them reads attributes of these classes, never string keys of a dict, so renaming a field breaks them
at once (``tests/daemon/test_status.py`` runs each consumer on a real node's status and checks the OpenAPI
schema lists exactly these fields).

msgspec does the JSON work: ``to_json`` for the API, ``convert`` (with type checks) for clients. Every
field is always present, except in an :class:`Evaluation`, whose unset metrics are left out (an
evaluation not yet run reads as ``{}``).

This module is imported by the CLI: it must stay cheap (no torch, no libp2p).

Rejected: a TypedDict (no runtime check when a client reads a status from another version) and pydantic
(0.25 s to import against msgspec's 0.04 s, on every CLI command).
"""

from __future__ import annotations

import ast
import enum
import inspect
import itertools
import sys
from typing import Any

import msgspec

__all__ = [
    "ConfigStatus",
    "Counters",
    "Evaluation",
    "JoinStatus",
    "LimitsStatus",
    "NatStatus",
    "PeerInfo",
    "RelayService",
    "RoundRecord",
    "Status",
    "TrainingState",
    "Transfer",
    "openapi_schemas",
    "openapi_yaml",
    "parse_status",
    "to_json",
]


class TrainingState(enum.StrEnum):
    """What the node's local training is doing (``status.training``, heartbeats, a metrics label)."""

    STARTING = "starting"
    """The process is up; the model state is not loaded yet."""
    LOADING = "loading"
    """Starting the training process and reading the store."""
    FETCHING_GENESIS = "fetching-genesis"
    """A joiner waiting for the run's genesis from its peers."""
    RUNNING = "running"
    PAUSED = "paused"
    """``meshtrain train pause``: no local compute; merging and serving go on."""
    DONE = "done"
    """``max_rounds`` reached; merging and serving go on."""
    DISABLED = "disabled"
    """``[training] enabled = false``: the node only stores, merges and serves."""
    LEAVING = "leaving"
    """Shutting down (the last heartbeat a node sends says so)."""


class _Record(msgspec.Struct, kw_only=True):
    """Base of every status record: keyword-only fields."""


class Counters(_Record):
    """Contribution and sync accounting since start."""

    accepted: int = 0
    """Contributions applied (local and remote)."""
    duplicates: int = 0
    """Contributions received that were already held."""
    rejected: int = 0
    """Invalid input from peers (bad records, junk requests or gossip), by reason below."""
    rejected_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    pulls: int = 0
    """Anti-entropy pull requests sent."""
    pushed: int = 0
    """Own contributions pushed straight to a connected member (one per member reached)."""
    pushes_received: int = 0
    """Contributions their authors pushed to this node."""
    announced: int = 0
    """Own contributions announced on gossip (a live member was not reached by a push)."""
    pull_failures: int = 0
    stale_rounds_skipped: int = 0
    """Local rounds not contributed: too many others landed while they trained."""
    snapshots_written: int = 0
    snapshots_installed: int = 0
    snapshots_served: int = 0
    equivocations: int = 0
    """Authors caught signing two records for one seq (proofs kept in the store)."""
    refused_disk_full: int = 0
    """Contributions refused because the store could not log them (a full disk)."""

    def reject(self, reason: str) -> None:
        """Count one refused input from a peer under ``reason``."""
        self.rejected += 1
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1


class Evaluation(_Record, omit_defaults=True):
    """Validation metrics of the merged model, and which state they were computed on (``{}`` before the
    first evaluation: unset fields are left out)."""

    state_hash: str | None = None
    contributions: int | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_bpb: float | None = None
    """Bits per byte (byte-level language models)."""
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    """Every metric the task's ``evaluate`` returned, the three above included."""

    @classmethod
    def of(cls, metrics: dict[str, float], *, state_hash: str, contributions: int) -> Evaluation:
        values = {k: float(v) for k, v in metrics.items()}
        return cls(
            state_hash=state_hash,
            contributions=contributions,
            val_loss=values.get("val_loss"),
            val_accuracy=values.get("val_accuracy"),
            val_bpb=values.get("val_bpb"),
            metrics=values,
        )


class PeerInfo(_Record):
    """The last heartbeat heard from a peer of the run (``daemon/node/wire.py`` ``Heartbeat``)."""

    round: int
    contributions: int
    training: str
    """The peer's TrainingState value (a newer peer may send a state this build does not know)."""
    reachability: str
    task: str
    device: str
    throughput_bps: int
    age_s: float
    """Seconds since the heartbeat arrived."""


class RelayService(_Record):
    """The Circuit Relay v2 service this node offers peers behind NAT."""

    mode: str = "off"
    """``[nat] relay_service``: "auto" (relay while AutoNAT says public), "on" or "off"."""
    active: bool = False
    """Relaying now."""
    reservations: int = 0
    """Peers holding a relay slot on this node now."""
    circuits: int = 0
    """Relayed connections through this node now."""
    limits: dict[str, int] = msgspec.field(default_factory=dict)
    counters: dict[str, int] = msgspec.field(default_factory=dict)


class NatStatus(_Record):
    """NAT traversal as the host sees it (``p2p.Host.nat_status``)."""

    reachability: str = "unknown"
    connections: dict[str, str] = msgspec.field(default_factory=dict)
    relay_addrs: list[str] = msgspec.field(default_factory=list)
    """This node's relayed addresses (give them to peers when it is not reachable directly)."""
    relays: list[str] = msgspec.field(default_factory=list)
    """Relays holding a slot for this node."""
    autonat_verdicts: dict[str, bool] = msgspec.field(default_factory=dict)
    """AutoNAT server -> whether its dial-back reached us."""
    relay_service: RelayService = msgspec.field(default_factory=RelayService)
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    """The ``[nat]`` settings in effect (``p2p.NatConfig``)."""
    counters: dict[str, int] = msgspec.field(default_factory=dict)


class Transfer(_Record):
    """One download of the genesis or of a snapshot (a blob fetched from every peer that offered it)."""

    blob: str
    """The blob id (``genesis/<id>`` or ``snapshot/<state hash>``)."""
    state: str = "fetching"
    """fetching, verifying (the genesis id, or the snapshot's attestation and hash), done or failed."""
    bytes_done: int = 0
    """Verified bytes on disk, resumed ones included."""
    bytes_total: int = 0
    bytes_resumed: int = 0
    """Bytes found already verified in the part file left by an earlier try (a restart resumes)."""
    rate_bytes_per_s: int = 0
    """Bytes fetched over the network per second since this try started."""
    sources: list[str] = msgspec.field(default_factory=list)
    """Peers sending chunks now."""
    elapsed_s: float = 0.0


class JoinStatus(_Record):
    """How this node got (or is getting) the run's genesis, and its latest snapshot download."""

    pinned_genesis: str | None = None
    """The genesis id ``[node] genesis`` pins (None: the first acceptable one a peer serves)."""
    source: str | None = None
    """The peer the genesis came from (None: stored, founded, rebuilt here, or not fetched yet)."""
    rebuilt: bool = False
    """The genesis was rebuilt here from the task's initialization and had exactly the offered id, so
    nothing was downloaded."""
    refused: dict[str, str] = msgspec.field(default_factory=dict)
    """Peer -> why the genesis it offered was refused (wrong id, run, task or model layout)."""
    genesis_transfer: Transfer | None = None
    """The genesis download (None: the genesis was stored or founded here)."""
    snapshot_transfer: Transfer | None = None
    """The latest snapshot download (None: none since start)."""
    dropped: dict[str, str] = msgspec.field(default_factory=dict)
    """Peer -> why a download dropped it (unreachable, stalled, a chunk that fails its digest, bytes that
    are not the genesis or snapshot it offered)."""


class LimitsStatus(_Record):
    """Runtime limits (``meshtrain limits``): training threads and the sync bandwidth cap."""

    threads: int
    """Threads wanted for the training process."""
    threads_applied: int
    """Threads it runs with (a change applies after the round in flight)."""
    bandwidth_bytes_per_s: int
    """Cap on sync bytes sent per second; 0: none."""
    waited_s: float = 0.0
    """Time sync responses waited on the cap."""


class ConfigStatus(_Record):
    """The reloadable settings in effect (SIGHUP changes them)."""

    log_level: str
    max_rounds: int
    eval_every: int
    sync_interval_s: float


class Status(_Record):
    """``GET /v1/status``: one node, now. Every field is always present in the JSON."""

    peer_id: str
    pid: int
    home: str
    run: str
    task: str
    listen_addrs: list[str]
    peers: list[str]
    """Connected peers."""
    round: int
    """Local rounds contributed."""
    training: TrainingState
    shard: int
    contributions: int
    """Contributions in the model (all authors)."""
    state_hash: str | None
    """Equal on two nodes exactly when they hold the same contributions (None: not loaded yet)."""
    genesis: str | None
    version_vector: dict[str, int]
    """Peer id -> highest contiguous seq applied."""
    bytes_sent: int
    bytes_received: int
    train_loss: float | None
    eval: Evaluation
    initial_eval: Evaluation
    """The evaluation before this node's first round (the start of its loss curve)."""
    counters: Counters
    retained_contributions: int
    """Records still held to serve peers (the rest were compacted into a snapshot)."""
    blocked_peers: list[str]
    """Fault injection: peers this node exchanges no model data with."""
    p2p: dict[str, Any]
    """The host's transfer, gossip and discovery counters (``p2p.Host.stats``)."""
    peer_info: dict[str, PeerInfo]
    reachability: str
    connections: dict[str, str]
    """Peer id -> "direct" or "relayed"."""
    nat: NatStatus
    suspects: list[str]
    """Authors whose updates look Byzantine, and equivocators (SECURITY.md)."""
    equivocators: dict[str, list[int]]
    diverged_from: list[str]
    """Peers holding our version vector with another state hash."""
    clip_norm: float | None
    """The run's norm clip, fixed by its genesis (None: off or not loaded)."""
    influence_window: int | None
    """The run's influence window, fixed by its genesis (None: off or not loaded; crdt/_window.py)."""
    admission_bits: int | None
    """The proof of work the run asks of each author, fixed by its genesis (None: not loaded)."""
    join: JoinStatus
    disk_full: bool
    """The store could not log the last contribution: new ones are refused until there is room."""
    uptime_s: float
    limits: LimitsStatus
    config: ConfigStatus


class RoundRecord(msgspec.Struct, kw_only=True):
    """One local round, for ``GET /v1/history`` (the demo's and the dashboard's loss curves)."""

    round: int
    time_s: float
    """Seconds since the daemon started."""
    train_loss: float
    update_norm: float
    density: float
    payload_bytes: int
    contributions: int
    """Contributions in the model after this round."""
    bytes_sent: int
    bytes_received: int
    staleness: int
    """Contributions of others merged while this round trained (against an older base)."""
    weight: float
    """Weight signed into the contribution (staleness down-weighting)."""
    residual_norm: float
    """L2 norm of the error-feedback residual carried to the next round."""
    round_s: float
    spans_s: dict[str, float] = msgspec.field(default_factory=dict)
    """Where the round's time went: materialize (the merged model into the training process's block),
    train (the training process: inner steps, outer step, compression), sign, accept (verify, apply,
    log with fsync), commit (the trainer saves its state), announce. All but train are the daemon's."""
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_bpb: float | None = None


def to_json(status: Status | RoundRecord) -> Any:
    """The JSON-ready form (dicts, lists, str, numbers) that the control API serves."""
    return msgspec.to_builtins(status)


def parse_status(data: Any) -> Status:
    """A status read back from JSON, type-checked.

    Raises:
        msgspec.ValidationError: ``data`` is not a status of this build's shape (the message names the
            field, e.g. ``Expected `int`, got `str` - at `$.round```).
    """
    return msgspec.convert(data, Status)


def openapi_schemas() -> dict[str, Any]:
    """The OpenAPI 3.1 (JSON Schema) components of the records above, each field's docstring as its
    description. ``daemon/service/openapi.yaml`` holds exactly these (``tests/daemon/test_status.py``)."""
    _, components = msgspec.json.schema_components(
        [Status, RoundRecord, LimitsStatus], ref_template="#/components/schemas/{name}"
    )
    docs = _field_docs()
    for name, schema in components.items():
        for key, prop in schema.get("properties", {}).items():
            if (name, key) in docs:
                prop["description"] = docs[name, key]
    return components


OPENAPI_MARKER = "    # Generated from daemon/status.py"


def openapi_yaml(document: str) -> str:
    """``document`` (the text of ``daemon/service/openapi.yaml``) with its generated schemas, which end the
    file after OPENAPI_MARKER, replaced by the current ones (``make openapi`` writes it back)."""
    import yaml  # only for this developer command: the CLI never pays for it

    head = document[: document.index(OPENAPI_MARKER)]
    body = yaml.safe_dump(openapi_schemas(), sort_keys=False, width=110, default_flow_style=None)
    return (
        head
        + OPENAPI_MARKER
        + " by openapi_schemas(); `make openapi` rewrites them and tests/daemon/test_status.py\n"
        + "    # fails when they differ.\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
    )


def _field_docs() -> dict[tuple[str, str], str]:
    """(class, field) -> the docstring under the field in this module's source."""
    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for field, doc in itertools.pairwise(cls.body):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs[cls.name, field.target.id] = " ".join(doc.value.value.split())
    return docs
