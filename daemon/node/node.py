"""One meshtrain node: the libp2p host, the replica of the model, the training process, composed.

Theory of operation
-------------------
The model is ``genesis + sum of contributions`` (see ``crdt``). The node wires the parts that grow it:

* :class:`~daemon.node.replica.Replica`: the one door every contribution enters by (validate, apply,
  log), with its counters, suspects and equivocation proofs;
* :class:`~daemon.node.sync.Sync`: serving peers' pulls and pulling from them (anti-entropy, gossip
  announcements, snapshots), driving the sans-IO :mod:`~daemon.node.replication` machine;
* :class:`~daemon.node.rounds.Rounds`: the local training loop in the child process;
* :class:`~daemon.node.membership.Membership`: heartbeats, goodbyes, peer info.

Founding and joining: a node without bootstrap peers and without a stored genesis founds the run with its
task's freshly initialized parameters. A node with bootstrap peers fetches the genesis from them (an
offer by request, the file as a blob: daemon/node/offers.py) and trusts it by content (every later
contribution is checked against it).

Concurrency: everything here runs on the asyncio loop. The p2p host runs its trio thread behind its
facade; the trainer is a child process. Background tasks live in one ``asyncio.TaskGroup``; one of them
failing stops the node (no task without an owner, no log-and-continue).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

import crdt
import p2p
from daemon.config import Config, ConfigError, task_path
from daemon.home import Home
from daemon.node import genesis, offers, wire
from daemon.node.limits import Limits
from daemon.node.membership import Membership
from daemon.node.replica import Replica
from daemon.node.rounds import Rounds
from daemon.node.store import Store
from daemon.node.sync import Sync
from daemon.node.trainer_process import TrainerError, TrainerProcess, TrainerSpec, fill_from
from daemon.status import (
    ConfigStatus,
    Counters,
    Evaluation,
    JoinStatus,
    LimitsStatus,
    NatStatus,
    RoundRecord,
    Status,
    TrainingState,
)

__all__ = ["Node", "NodeError", "Parts", "host_config"]

log = logging.getLogger(__name__)

class NodeError(RuntimeError):
    """The node cannot start or continue (bad genesis, wrong run, store failure)."""


class Node:
    """One node. ``host`` and ``trainer`` default to the real ones; tests pass in-memory stand-ins."""

    def __init__(
        self,
        home: Home,
        config: Config,
        *,
        host: p2p.Host | None = None,
        trainer: TrainerProcess | None = None,
    ) -> None:
        self.home = home
        self.config = config
        self.identity = p2p.load_or_create_identity(home.identity_file)
        self.signer = crdt.Signer.from_seed(self.identity.seed)
        self.store = Store(home.store_dir)
        self.host = host or p2p.Host(
            self.identity,
            listen_addrs=list(config.node.listen),
            bootstrap=config.node.bootstrap,
            run_id=config.node.run,
            config=host_config(home.path, config),
        )
        self.limits = Limits(
            threads=config.training.threads, bandwidth_bytes_per_s=config.limits.bandwidth_bytes_per_s
        )
        self.on_timing: Callable[[str, float], None] = lambda name, seconds: None
        """Hook for metrics: called with ("merge" | "pull" | "round", seconds)."""
        self.started_at = time.time()
        self.trainer = trainer or TrainerProcess(self._trainer_spec())
        self._phase = TrainingState.STARTING  # until the rounds loop exists
        self._parts: Parts | None = None
        self.counters = Counters()
        """What entered and what was refused, from the start (the replica counts into it once loaded)."""
        self.join = JoinStatus(pinned_genesis=config.node.genesis or None)

    def _trainer_spec(self) -> TrainerSpec:
        """What the training process is built from. Data: a configured ``[training] shard`` of
        ``num_shards`` (the local cluster harness), or else the whole training set in this node's own order,
        seeded from its key (nothing to agree on; training/_assignment.py has the measurements)."""
        training = self.config.training
        own_order = training.shard < 0
        return TrainerSpec(
            task=task_path(training.task, self.home.path),
            task_options=dict(self.config.task),
            diloco=dict(self.config.diloco),
            shard=0 if own_order else training.shard,
            num_shards=1 if own_order else training.num_shards,
            data_key=self.signer.public_key if own_order else None,
            threads=training.threads,
            state_file=self.home.trainer_state_file,
        )

    def _timing(self, name: str, seconds: float) -> None:
        self.on_timing(name, seconds)  # looked up per call: metrics hook in after construction

    @property
    def parts(self) -> Parts:
        """The replica, sync, training loop and membership, which exist once the model state is loaded.

        Raises:
            NodeError: not loaded yet.
        """
        if self._parts is None:
            raise NodeError("the model state is not loaded yet")
        return self._parts

    @property
    def training_state(self) -> TrainingState:
        return self._parts.rounds.state if self._parts is not None else self._phase

    @property
    def rounds_done(self) -> int:
        return self._parts.rounds.rounds_done if self._parts is not None else 0

    # -- lifecycle ------------------------------------------------------------------------------------

    async def run(self, *, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run until cancelled. ``on_ready`` is awaited once the host and the training process are up,
        before the model state is loaded: status answers while a joiner fetches the genesis.

        The training process starts first and the host beside it: the child spends seconds importing torch
        and building the task (7 s of CPU for the digits task on this 2-core VM, 2026-12-02), time a
        restarted node used to add to the host's start."""
        trainer_up = asyncio.create_task(self.trainer.start(), name="trainer-start")
        try:
            await self.host.start()
        except BaseException:
            trainer_up.cancel()
            await asyncio.gather(trainer_up, return_exceptions=True)
            await self.trainer.aclose()
            raise
        try:
            self._phase = TrainingState.LOADING
            await trainer_up
            if on_ready is not None:
                await on_ready()
            run_genesis = await self._genesis()
            sync_config = self.config.sync
            replica = Replica.open(self.store, run_genesis, snapshot_every=sync_config.snapshot_every,
                                   member_ttl_s=sync_config.member_ttl_s, counters=self.counters,
                                   signer=self.signer)
            log.info("model state loaded genesis=%s contributions=%d state_hash=%s",
                     replica.state.genesis.id[:16], replica.state.contribution_count,
                     replica.state.state_hash[:16])
            run = self.config.node.run
            sync = Sync(self.host, replica, run=run, settings=lambda: self.config.sync,
                                    limits=self.limits, timing=self._timing, join=self.join)
            membership = Membership(self.host, run=run, beat=self._heartbeat,
                                                      reject=sync.reject)
            sync.spreader.must_reach = membership.heard_members
            # Proven while the first round trains (a thread, ``proving`` a task of the group below): the
            # first contribution carries it.
            async def admission() -> int:
                return await asyncio.shield(proving)
            rounds = Rounds(self.trainer, replica, signer=self.signer, host=self.host,
                                          settings=lambda: self.config.training,
                                          announce=sync.spreader.announce, timing=self._timing,
                                          count_peers="expected_peers" not in self.config.diloco,
                                          joining=bool(self.config.node.bootstrap),
                                          training_peers=membership.training_peers,
                                          pull_now=sync.pull_from_peers_ahead, admission=admission)
            rounds.on_state_change = membership.state_changed
            self._parts = Parts(replica, sync, rounds, membership)
            await genesis.serve_genesis(self.host, self.store, run_genesis, run=run,
                                        pace=offers.pace(self.limits.bucket, asyncio.get_running_loop()))
            sync.install()
            heartbeats = membership.install(sync.counting)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(sync.run(), name="sync")
                tasks.create_task(membership.run(heartbeats), name="membership")
                proving = tasks.create_task(
                    genesis.admission_nonce(self.store, run_genesis, self.signer.public_key), name="admission"
                )
                tasks.create_task(rounds.run(), name="training")
                tasks.create_task(self.limits.run(self.trainer), name="limits")
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        # Fixed order: stop compute, finish the snapshot being written and make the log durable, then
        # say goodbye and leave the mesh; the replica's worker thread goes last (peers' requests can ask
        # it for a digest until the host is closed).
        await self.trainer.aclose()
        if self._parts is not None:
            await self._parts.replica.settle()
        self.store.close()
        if self._parts is not None:
            self._parts.rounds.state = TrainingState.LEAVING
            await self._parts.membership.say_goodbye()
        await self.host.aclose()
        if self._parts is not None:
            self._parts.replica.close()

    # -- genesis --------------------------------------------------------------------------------------

    async def _genesis(self) -> crdt.Genesis:
        """The run's genesis: stored, founded here, or fetched from a bootstrap peer (daemon/node/genesis.py).

        Raises:
            ConfigError: the stored genesis is not what the config asks for (another run, task, layout or
                pinned id): this home belongs to another run.
        """
        fragments = await self.trainer.fragment_ranges()
        stored = self.store.load_genesis()
        if stored is not None:
            if (reason := genesis.refusal(stored, self.config, fragments)) is not None:
                raise ConfigError(
                    f"{self.home.path} holds another run's genesis: {reason}; use another --home"
                )
            return stored
        if not self.config.node.bootstrap:
            return genesis.found_genesis(self.config, self.signer.public_key, await self._founding_params(),
                                         fragments)
        self._phase = TrainingState.FETCHING_GENESIS
        return await genesis.fetch_genesis(self.host, self.config, fragments, store=self.store,
                                           counters=self.counters, join=self.join,
                                           rebuild=self.trainer.initial_params
                                           if self.config.node.rebuild_genesis else None)

    async def _founding_params(self) -> np.ndarray:
        """A founder's parameters: the task's fresh initialization, or ``[training] init_from``'s weights.

        Raises:
            ConfigError: ``init_from`` is not a checkpoint of the task's model (the message says why).
        """
        init_from = self.config.training.init_from
        if not init_from:
            return await self.trainer.initial_params()
        path = Path(init_from).expanduser()
        path = path if path.is_absolute() else self.home.path / path
        try:
            params = await self.trainer.params_from_checkpoint(path)
        except TrainerError as exc:
            raise ConfigError(f"[training] init_from: {str(exc).strip().splitlines()[-1]}") from exc
        log.info("founding parameters from checkpoint=%s params=%d", path, params.size)
        return params

    # -- control --------------------------------------------------------------------------------------

    def set_blocked_peers(self, peers: set[str]) -> None:
        """Fault injection: stop exchanging model data with ``peers`` (empty set: heal)."""
        self.parts.sync.set_blocked(peers)

    def history(self) -> list[RoundRecord]:
        """This node's rounds, oldest first (none before the state is loaded)."""
        return list(self._parts.rounds.history) if self._parts is not None else []

    def config_reloaded(self) -> None:
        """After SIGHUP: a raised max_rounds (or training turned back on) restarts a finished node; a node
        still loading reads the new config when its loops start."""
        if self._parts is not None:
            self._parts.rounds.config_reloaded()

    async def export_checkpoint(self, path: Path) -> dict[str, Any]:
        state = self.parts.replica.state
        state_hash, contributions = state.state_hash, state.contribution_count
        await self.trainer.export(fill_from(state), state.genesis.length, path)
        return {"path": str(path), "state_hash": state_hash, "contributions": contributions}

    # -- reporting ------------------------------------------------------------------------------------

    def _heartbeat(self, throughput_bps: int) -> wire.Heartbeat:
        return wire.Heartbeat(
            round=self.rounds_done,
            contributions=self.parts.replica.state.contribution_count,
            training=self.training_state.value,
            reachability=self.host.reachability(),
            task=self.config.training.task,
            device=str(self.trainer.info.get("device", "cpu")),
            throughput_bps=throughput_bps,
        )

    async def fresh_status(self) -> Status:
        """:meth:`status`, the state hash computed first in a worker thread if it is not known (every
        accepted record changes it: 1.6 s of the loop at 100M parameters, for each poll after a change)."""
        if self._parts is not None:
            await self._parts.replica.digest()
        return self.status()

    def status(self) -> Status:
        """Everything ``GET /v1/status`` reports, in every phase (the model's fields are empty until the
        state is loaded). The state hash is computed here if it is not known: see :meth:`fresh_status`."""
        parts = self._parts
        state = parts.replica.state if parts is not None else None
        stats = self.host.stats()
        config = self.config
        return Status(
            peer_id=self.host.peer_id,
            pid=os.getpid(),
            home=str(self.home.path),
            run=config.node.run,
            task=config.training.task,
            listen_addrs=self.host.listen_addrs(),
            peers=self.host.connected_peers(),
            round=self.rounds_done,
            training=self.training_state,
            shard=config.training.shard,
            contributions=state.contribution_count if state else 0,
            state_hash=state.state_hash if state else None,
            genesis=state.genesis.id if state else None,
            version_vector=(
                {p2p.peer_id_from_public_key(a): s for a, s in state.version_vector.items()} if state else {}
            ),
            bytes_sent=int(stats["bytes_sent"]),
            bytes_received=int(stats["bytes_received"]),
            train_loss=parts.rounds.history[-1].train_loss if parts and parts.rounds.history else None,
            eval=parts.rounds.last_eval if parts else Evaluation(),
            initial_eval=parts.rounds.initial_eval if parts else Evaluation(),
            counters=self.counters,
            retained_contributions=state.retained_count if state else 0,
            blocked_peers=sorted(parts.sync.machine.blocked) if parts else [],
            p2p=stats,
            peer_info=parts.membership.peer_info() if parts else {},
            reachability=self.host.reachability(),
            connections=self.host.peer_connections(),
            nat=msgspec.convert(self.host.nat_status(), NatStatus),
            suspects=parts.replica.suspect_authors() if parts else [],
            equivocators=(
                {a: sorted(s) for a, s in sorted(parts.replica.equivocators.items())} if parts else {}
            ),
            diverged_from=sorted(parts.sync.machine.diverged) if parts else [],
            clip_norm=state.limits.clip_norm if state else None,  # fixed by the genesis (SECURITY.md)
            influence_window=state.influence_window if state else None,
            admission_bits=state.admission_bits if state else None,
            disk_full=parts.replica.disk_full if parts else False,
            join=self.join,
            uptime_s=round(time.time() - self.started_at, 3),
            limits=LimitsStatus(**self.limits.as_dict(), waited_s=round(self.limits.bucket.waited_s, 3)),
            config=ConfigStatus(
                log_level=config.log.level,
                max_rounds=config.training.max_rounds,
                eval_every=config.training.eval_every,
                sync_interval_s=config.sync.interval_s,
            ),
        )


class Parts(NamedTuple):
    """What a node runs once its model state is loaded."""

    replica: Replica
    sync: Sync
    rounds: Rounds
    membership: Membership


def host_config(home: Path, config: Config) -> p2p.HostConfig:
    """The host's configuration from ``[node]`` (the run's swarm key and allowlist, mDNS, private
    addresses) and ``[nat]`` (``p2p.NatConfig``: AutoNAT, relay service and use, hole punching).

    Raises:
        p2p.SwarmKeyError: the swarm key file is unusable (read once, here; it must be mode 0600).
        ConfigError: ``[nat]`` has an unknown key or a bad value.
    """
    node = config.node
    swarm_key = None
    if node.swarm_key:
        path = Path(node.swarm_key).expanduser()
        swarm_key = p2p.load_swarm_key(path if path.is_absolute() else home / path)
    allow = frozenset(node.allow_peers) if node.allow_peers else None
    if swarm_key is not None or allow is not None:
        log.info("private run: swarm_key=%s allow_peers=%s", swarm_key is not None,
                 len(allow) if allow else "any")
    try:
        nat = p2p.NatConfig(**config.nat)
    except (TypeError, ValueError) as exc:  # an unknown key, or a value NatConfig refuses (named)
        raise ConfigError(f"[nat]: {exc}") from exc
    return p2p.HostConfig(
        swarm_key=swarm_key,
        allow_peers=allow,
        nat=nat,
        mdns=node.mdns,
        dial_private_addrs=node.dial_private_addrs,
    )




