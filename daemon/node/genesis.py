"""Founding and joining a run: where a node's genesis comes from, and which genesis it accepts.

Theory of operation
-------------------
A node with no stored genesis and no bootstrap peers *founds* the run: its task's freshly initialized
parameters become the genesis, content-addressed (its id is the hash), with the run's name, task and
``clip_norm`` in its meta. A joiner *fetches* the genesis from its connected peers (``/meshtrain/genesis/2``),
unless its own task initialization reproduces it: before the first download of an offered genesis, the
joiner builds the genesis from its task's fresh parameters with the offer's meta and layout, and if that
has exactly the offered id (a hash of every byte), it is the offered genesis and nothing is downloaded
(``status.join.rebuilt``; a 1B-parameter run saves each joiner 4 GB). It does not match when the founder
started from ``init_from`` weights, a task seeds its initialization per node, or torch builds initialize
differently; the joiner then fetches it. Trust is unchanged: the id is what is checked either way.

Peers *offer* the genesis (``wire.GenesisOffer``: id, meta, layout, and the blob of the stored genesis
file; daemon/node/offers.py has why and how). What a joiner accepts is checked on the offer, before a byte
is fetched (:func:`refusal`): the run's name and task as configured, the fragment layout its own model
has, and, when ``[node] genesis`` pins one (the ``meshtrain invite`` token carries it), exactly that id.
It then fetches the file from every peer that offered the same one, and installs it only if it decodes
to exactly the id offered (which hashes meta and layout too). A genesis that fails either check is
refused with its reason, counted (``counters.rejected_reasons["GenesisRefused"]``) and shown in
``status.join.refused``; that peer is not asked again, the others are, and the node stays up and answers
its control API meanwhile. A download that fails (every source dropped) is tried again on the next pass,
from its part file.
Without a pin the first acceptable genesis wins (trust on first use): a peer of the right run and task
could hand out its own parameters, so a run's operator pins the genesis (SECURITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

import crdt
import p2p
from daemon.config import Config
from daemon.node import wire
from daemon.node.attestation import policy_for_run
from daemon.node.offers import fetch, transfer_dest
from daemon.node.offers import sources as offers_sources
from daemon.node.store import Store, StoreError, read_genesis
from daemon.node.trainer_process import TrainerError
from daemon.status import Counters, JoinStatus

__all__ = ["GENESIS_REFUSED", "admission_nonce", "fetch_genesis", "found_genesis", "refusal", "serve_genesis"]

log = logging.getLogger(__name__)

GENESIS_RETRY_S = 1.0  # between passes over the connected peers
GENESIS_REFUSED = "GenesisRefused"  # the rejected_reasons key of a refused genesis
MAX_GENESIS_FILE_BYTES = crdt.DEFAULT_LIMITS.max_genesis_bytes + 64  # crdt's bound, plus the seal's header
ADMISSION_FILE = "admission"  # in the store: this node's proof of work for the run, found once


def found_genesis(
    config: Config, founder: bytes, params: object, fragments: Sequence[tuple[int, int]]
) -> crdt.Genesis:
    """The genesis of a run this node (public key ``founder``) founds: its name and task, ``clip_norm``,
    ``influence_window``, and the checkpoint policy (the founder, ``[node] checkpoint_signers``,
    ``allow_peers`` on a private run; ``checkpoint_quorum`` of them)."""
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
        | ({"influence_window": str(node.influence_window)} if node.influence_window else {})
        | ({"admission_bits": str(node.admission_bits)} if node.admission_bits else {})
        | policy.to_meta(),
    )
    log.info("founded run=%s genesis=%s params=%d clip_norm=%s influence_window=%s checkpoint_signers=%d "
             "quorum=%d", node.run, genesis.id[:16], genesis.length, genesis.meta.get("clip_norm", "off"),
             genesis.meta.get("influence_window", "off"), len(policy.signers), policy.quorum)
    return genesis


class GenesisLike(Protocol):
    """What :func:`refusal` reads: a :class:`crdt.Genesis`, or a peer's ``wire.GenesisOffer`` of one."""

    @property
    def id(self) -> str: ...
    @property
    def meta(self) -> Mapping[str, str]: ...
    @property
    def fragments(self) -> Sequence[Sequence[int]]: ...


def refusal(genesis: GenesisLike, config: Config, fragments: Sequence[tuple[int, int]]) -> str | None:
    """Why this node cannot take ``genesis`` (or the genesis a peer offers) as its run's (None: it can)."""
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


async def serve_genesis(
    host: p2p.Host, store: Store, genesis: crdt.Genesis, *, run: str, pace: Callable[[int], None]
) -> None:
    """Offer the run's genesis on ``/meshtrain/genesis/2``: the stored genesis file, served as a blob
    (hashed once, here, in a worker thread), and its id, meta and layout in a small offer."""
    blob = f"genesis/{genesis.id}".encode()
    manifest = await host.serve_file(blob, store.genesis_file, pace=pace)
    ref = wire.BlobRef(blob=blob, root=manifest.root, size=manifest.size)
    offer = wire.GenesisOffer(id=genesis.id, meta=dict(genesis.meta), fragments=genesis.fragments,
                              ref=ref).encode()

    async def handler(peer: str, data: bytes) -> bytes:
        request = wire.GenesisRequest.decode(data)
        if request.run != run:
            raise wire.ForeignRun(f"this node serves run {run!r}, not {request.run!r}")
        return offer

    host.set_request_handler(wire.GENESIS_PROTOCOL, handler)


async def fetch_genesis(
    host: p2p.Host,
    config: Config,
    fragments: Sequence[tuple[int, int]],
    *,
    store: Store,
    counters: Counters,
    join: JoinStatus,
    rebuild: Callable[[], Awaitable[np.ndarray]] | None = None,
) -> crdt.Genesis:
    """Ask the connected peers for the run's genesis until one offers an acceptable one (see the module
    docstring), fetch it from every peer that offered the same file, check it is the genesis offered, and
    install it in ``store``. ``join`` shows the progress, the refusals and the peers a download dropped.

    ``rebuild``: the task's fresh initialization, tried once per offered id before any download. When
    the genesis built from it (with the offer's meta and layout) has exactly the offered id, it is the
    offered genesis, byte for byte, and is returned without a download (``join.rebuilt``)."""
    tried: set[str] = set()  # genesis ids this node tried to rebuild
    while True:
        offers = await _acceptable_offers(host, config, fragments, counters=counters, join=join)
        if offers:
            ref, peers = offers_sources({peer: offer.ref for peer, offer in offers.items()})
            offered = offers[peers[0]]  # the genesis most peers offered
            if rebuild is not None and offered.id not in tried:
                tried.add(offered.id)
                rebuilt = await _rebuilt(offered, rebuild, config, fragments)
                if rebuilt is not None:
                    join.rebuilt = True
                    log.info("rebuilt genesis=%s from the task's initialization: nothing to download",
                             rebuilt.id[:16])
                    return rebuilt
            genesis = await _download(host, offers, ref, peers, config, fragments, store=store,
                                      counters=counters, join=join)
            if genesis is not None:
                log.info("fetched genesis=%s from peer=%s pinned=%s", genesis.id[:16], join.source,
                         bool(config.node.genesis))
                return genesis
        await asyncio.sleep(GENESIS_RETRY_S)


async def _acceptable_offers(
    host: p2p.Host,
    config: Config,
    fragments: Sequence[tuple[int, int]],
    *,
    counters: Counters,
    join: JoinStatus,
) -> dict[str, wire.GenesisOffer]:
    """One pass over the connected peers: their genesis offers that this node would take."""
    request = wire.GenesisRequest(run=config.node.run).encode()
    offers: dict[str, wire.GenesisOffer] = {}
    for peer in host.connected_peers():
        if peer in join.refused:
            continue
        try:
            data = await host.request(peer, wire.GENESIS_PROTOCOL, request,
                                      timeout_s=config.sync.request_timeout_s)
            offer = wire.GenesisOffer.decode(data)
        except p2p.ProtocolNotSupported:
            log.info("peer has no genesis to serve yet peer=%s", peer)  # a joiner itself
            continue
        except (p2p.P2PError, wire.WireError) as exc:
            log.warning("genesis offer failed peer=%s error=%s", peer, exc)
            continue
        reason = refusal(offer, config, fragments)
        if reason is not None:
            _refuse(peer, reason, counters=counters, join=join)
            continue
        offers[peer] = offer
    return offers


async def _download(
    host: p2p.Host,
    offers: dict[str, wire.GenesisOffer],
    ref: wire.BlobRef,
    peers: list[str],
    config: Config,
    fragments: Sequence[tuple[int, int]],
    *,
    store: Store,
    counters: Counters,
    join: JoinStatus,
) -> crdt.Genesis | None:
    """Fetch the genesis file ``ref`` (the one most peers offered) from all of ``peers``, and install it if
    it is acceptable; a peer whose offer it does not match is refused (the bytes matched the root it
    offered: it lied)."""
    claimed = offers[peers[0]].id
    dest = transfer_dest(store.path, "genesis", claimed)
    try:
        path = await fetch(host, ref, peers, dest, join=join, kind="genesis",
                           max_bytes=MAX_GENESIS_FILE_BYTES)
    except (p2p.P2PError, OSError) as exc:  # dropped peers are in join.dropped; the part file is kept
        log.warning("genesis download failed error=%s", exc)
        return None
    try:
        genesis = await asyncio.to_thread(read_genesis, path)
    except StoreError as exc:
        path.unlink(missing_ok=True)
        for peer in peers:
            _refuse(peer, f"served a file that is not a genesis: {exc}", counters=counters, join=join)
        return None
    for peer in peers:
        if offers[peer].id != genesis.id:
            _refuse(peer, f"served genesis {genesis.id[:16]} for the {offers[peer].id[:16]} it offered",
                    counters=counters, join=join)
    reason = refusal(genesis, config, fragments)
    if reason is not None:
        path.unlink(missing_ok=True)
        return None
    assert join.genesis_transfer is not None  # fetch() set it
    join.genesis_transfer.state = "done"
    join.source = next((peer for peer in peers if peer not in join.refused), peers[0])
    store.install_genesis(path, genesis)
    return genesis


async def _rebuilt(
    offer: wire.GenesisOffer,
    rebuild: Callable[[], Awaitable[np.ndarray]],
    config: Config,
    fragments: Sequence[tuple[int, int]],
) -> crdt.Genesis | None:
    """The offered genesis if this node's own initialization reproduces it exactly, else None."""
    try:
        params = await rebuild()
        genesis = await asyncio.to_thread(crdt.Genesis, params, offer.fragments, dict(offer.meta))
    except (TrainerError, crdt.CrdtError) as exc:
        log.info("could not rebuild the genesis here, fetching it error=%s", exc)
        return None
    if genesis.id != offer.id or refusal(genesis, config, fragments) is not None:
        log.info("this node's initialization is not genesis=%s (another torch build, a founder's "
                 "init_from, or a task seeded per node): fetching it", offer.id[:16])
        return None
    return genesis


def _refuse(peer: str, reason: str, *, counters: Counters, join: JoinStatus) -> None:
    join.refused[peer] = reason
    counters.reject(GENESIS_REFUSED)
    log.warning("refused the genesis of peer=%s reason=%s", peer, reason)


def task_options(config: Config) -> str:
    """The ``[task]`` table in one canonical form (written into the genesis, compared by joiners)."""
    return json.dumps(config.task, sort_keys=True, separators=(",", ":"))


def _ranges(ranges: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(start), int(stop)) for start, stop in ranges)


async def admission_nonce(store: Store, genesis: crdt.Genesis, author: bytes) -> int:
    """This node's proof of work for the run (crdt/admission.py; 0 when the genesis asks none): found once,
    in a thread (2**bits hashes), and kept in the store so a restart does not pay again."""
    bits = crdt.admission_bits(genesis)
    if not bits:
        return 0
    path = store.path / ADMISSION_FILE
    with contextlib.suppress(OSError, ValueError):
        kept_id, kept = path.read_text().split()
        if kept_id == genesis.id:
            return int(kept)
    log.info("proving %d bits of work to be admitted as an author of this run", bits)
    nonce = await asyncio.to_thread(crdt.find_admission_nonce, genesis.id, author, bits)
    with contextlib.suppress(OSError):  # a full disk only costs the work again after a restart
        path.write_text(f"{genesis.id} {nonce}\n")
    return nonce
