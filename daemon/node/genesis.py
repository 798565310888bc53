"""Founding and joining a run: where a node's genesis comes from, and which genesis it accepts.

Theory of operation
-------------------
A node with no stored genesis and no bootstrap peers *founds* the run: its task's freshly initialized
parameters become the genesis, content-addressed (its id is the hash), with the run's name, task and
``clip_norm`` in its meta. A joiner *fetches* the genesis from its connected peers (``/meshtrain/genesis/1``)
and never re-derives it from a seed (initialization differs across torch builds).

What a joiner accepts, checked before anything is written to disk (:func:`refusal`): the run's name and
task as configured, the fragment layout its own model has, and, when ``[node] genesis`` pins one (the
``meshtrain invite`` token carries it), exactly that id. A genesis that fails is refused with its reason,
counted (``counters.rejected_reasons["GenesisRefused"]``) and shown in ``status.join.refused``; that
peer is not asked again, the others are, and the node stays up and answers its control API meanwhile.
Without a pin the first acceptable genesis wins (trust on first use): a peer of the right run and task
could hand out its own parameters, so a run's operator pins the genesis (SECURITY.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import crdt
import p2p
from daemon.config import Config
from daemon.node import wire
from daemon.node.attestation import policy_for_run
from daemon.status import Counters, JoinStatus

__all__ = ["GENESIS_REFUSED", "fetch_genesis", "found_genesis", "refusal"]

log = logging.getLogger(__name__)

GENESIS_RETRY_S = 1.0  # between passes over the connected peers
GENESIS_REFUSED = "GenesisRefused"  # the rejected_reasons key of a refused genesis


def found_genesis(
    config: Config, founder: bytes, params: object, fragments: Sequence[tuple[int, int]]
) -> crdt.Genesis:
    """The genesis of a run this node (public key ``founder``) founds: its name and task, ``clip_norm``,
    and the checkpoint policy (the founder, ``[node] checkpoint_signers``, ``allow_peers`` on a private
    run; ``checkpoint_quorum`` of them)."""
    node = config.node
    private = bool(node.swarm_key or node.allow_peers)
    named = (*node.checkpoint_signers, *(node.allow_peers if private else ()))
    signers = [p2p.public_key_from_peer_id(peer) for peer in named]
    policy = policy_for_run(founder, signers, node.checkpoint_quorum)
    genesis = crdt.Genesis(
        params=params,  # type: ignore[arg-type]
        fragments=tuple(fragments),
        meta={"run": node.run, "task": config.training.task}
        | ({"task_options": task_options(config)} if config.task else {})
        | ({"clip_norm": repr(node.clip_norm)} if node.clip_norm else {})
        | policy.to_meta(),
    )
    log.info("founded run=%s genesis=%s params=%d clip_norm=%s checkpoint_signers=%d quorum=%d", node.run,
             genesis.id[:16], genesis.length, genesis.meta.get("clip_norm", "off"), len(policy.signers),
             policy.quorum)
    return genesis


def refusal(genesis: crdt.Genesis, config: Config, fragments: Sequence[tuple[int, int]]) -> str | None:
    """Why this node cannot take ``genesis`` as its run's (None: it can)."""
    pinned = config.node.genesis
    if pinned and genesis.id != pinned:
        return f"genesis {genesis.id[:16]} is not the pinned {pinned[:16]} ([node] genesis)"
    if genesis.meta.get("run") != config.node.run:
        return f"it belongs to run {genesis.meta.get('run')!r}, not {config.node.run!r}"
    if genesis.meta.get("task") != config.training.task:
        return (f"run {config.node.run!r} trains task {genesis.meta.get('task')!r}, this node is configured "
                f"for {config.training.task!r}")
    theirs, ours = genesis.meta.get("task_options", "{}"), task_options(config)
    if theirs != ours:
        return f"run {config.node.run!r} trains with [task] options {theirs}, this node's are {ours}"
    if _ranges(genesis.fragments) != _ranges(fragments):
        return (f"it splits the model into {len(genesis.fragments)} fragments of other sizes than this "
                "node's model ([diloco] num_fragments or the task's options differ)")
    return None


async def fetch_genesis(
    host: p2p.Host,
    config: Config,
    fragments: Sequence[tuple[int, int]],
    *,
    counters: Counters,
    join: JoinStatus,
) -> crdt.Genesis:
    """Ask the connected peers for the run's genesis until one serves an acceptable one (see the module
    docstring); ``join`` shows the progress and the refusals."""
    request = wire.GenesisRequest(run=config.node.run).encode()
    while True:
        for peer in host.connected_peers():
            if peer in join.refused:
                continue
            try:
                data = await host.request(
                    peer, wire.GENESIS_PROTOCOL, request, timeout_s=config.sync.request_timeout_s
                )
                genesis = crdt.Genesis.decode(data)
            except p2p.ProtocolNotSupported:
                log.info("peer has no genesis to serve yet peer=%s", peer)  # a joiner itself
                continue
            except (p2p.P2PError, crdt.CrdtError) as exc:
                log.warning("genesis fetch failed peer=%s error=%s", peer, exc)
                continue
            reason = refusal(genesis, config, fragments)
            if reason is not None:
                join.refused[peer] = reason
                counters.reject(GENESIS_REFUSED)
                log.warning("refused the genesis of peer=%s reason=%s", peer, reason)
                continue
            log.info("fetched genesis=%s from peer=%s pinned=%s", genesis.id[:16], peer,
                     bool(config.node.genesis))
            join.source = peer
            return genesis
        await asyncio.sleep(GENESIS_RETRY_S)


def task_options(config: Config) -> str:
    """The ``[task]`` table in one canonical form (written into the genesis, compared by joiners)."""
    return json.dumps(config.task, sort_keys=True, separators=(",", ":"))


def _ranges(ranges: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(start), int(stop)) for start, stop in ranges)
