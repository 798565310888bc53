"""The model's big files between nodes: the genesis and snapshots, offered by request, moved as p2p blobs.

Theory of operation
-------------------
A model does not fit in one request frame (``p2p.RequestLimits`` caps a reply; a 100M-parameter genesis is
400 MB). So ``/meshtrain/genesis/2`` and ``/meshtrain/snapshot/2`` answer with an *offer*: what the asker
checks before it fetches anything (the genesis's id, meta and layout; the checkpoints that attest a
snapshot) and a :class:`~daemon.node.wire.BlobRef` (blob id, manifest root, size). The bytes then move over
``/meshtrain/blob/2`` (``p2p.Host.fetch_blob``): chunked, every chunk checked against the pinned root the
moment it arrives, pulled from every peer that offered the same root at once.

Serving: each file is served as it lies in the store, never re-serialized per request: the sealed genesis
file, and the snapshot file of the state offered. The store rewrites ``snapshot.bin`` at each compaction,
so :class:`SnapshotServer` serves a hard link to it (``served/<state hash>.bin``: the inode outlives the
rename, no copy), hashed once per state, and keeps the previous one served too, so that a fetch started
before a compaction can finish. Every served chunk waits on the node's bandwidth cap (``[limits]``), as
sync replies do.

Fetching (:func:`fetch`): into ``incoming/<kind>-<key>`` through ``<that>.part``. A crash or restart in the
middle leaves the part file, and the next fetch of the same blob re-verifies it chunk by chunk and asks
only for the missing chunks; a download of another genesis or snapshot removes it (the disk holds at most
one part file of each kind). A peer that is unreachable, stalls or sends a chunk that fails its digest is
dropped by the fetch (its reason lands in ``status.join.dropped``) and the others finish. What arrives is
verified by the caller before it is adopted: the genesis id (daemon/node/genesis.py), the snapshot's
attestation and state hash (daemon/node/sync.py, ``Replica.adopt``); peers whose offer does not survive
that are refused as liars. ``status.join`` shows each download live (bytes, rate, sources).

Memory: a fetch holds ``peers x fetch_depth`` chunks (4 MiB each); a snapshot is decoded from its file in
1 MiB reads (``store.read_snapshot``); a genesis is read through a memory map (``store.read_genesis``).

Rejected alternatives: raising the reply cap (a joiner would hold the whole reply, then decode it: 2-3
copies of the model, one peer, no resume); streaming the file in one long reply (no per-chunk
verification, so a lying peer wastes the whole download; no second source); serving snapshot.bin itself
(a compaction renames a new file over it and every fetch in flight fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import crdt
import p2p
from daemon.node import wire
from daemon.node.attestation import Attestations
from daemon.node.limits import TokenBucket
from daemon.node.store import read_snapshot
from daemon.status import JoinStatus, Transfer

__all__ = [
    "Offered",
    "SnapshotServer",
    "check_snapshot_offer",
    "fetch",
    "fetch_snapshot",
    "pace",
    "snapshot_max_bytes",
    "sources",
    "transfer_dest",
]

log = logging.getLogger(__name__)

INCOMING_DIR = "incoming"  # downloads in progress, in the store
SERVED_DIR = "served"  # hard links to the snapshot files offered, in the store
SERVED_KEEP = 2  # snapshots served at once: the newest, and the one fetches may have started on
REFRESH_S = 0.25  # how often a download's record in status.join is brought up to date
SNAPSHOT_BYTES_PER_PARAM = 9  # a snapshot's worst case: 8 byte planes, zstd's bound and framing on top


def pace(bucket: TokenBucket, loop: asyncio.AbstractEventLoop) -> Callable[[int], None]:
    """A ``pace`` for ``p2p.Host.serve_file``: each served chunk waits on the node's bandwidth cap. Runs in
    the blob server's worker thread, so it blocks there until the event loop's bucket lets it through."""

    def wait(length: int) -> None:
        if bucket.rate:
            asyncio.run_coroutine_threadsafe(bucket.acquire(length), loop).result()

    return wait


# -- serving ------------------------------------------------------------------------------------------


class SnapshotServer:
    """Serves the store's snapshot file of each state offered, through a hard link (see the docstring)."""

    def __init__(self, host: p2p.Host, store_dir: Path, *, pace: Callable[[int], None]) -> None:
        self.host = host
        self.pace = pace
        self.dir = store_dir / SERVED_DIR
        self.dir.mkdir(exist_ok=True)
        for stale in self.dir.iterdir():  # links of a previous run: nothing serves them
            stale.unlink()
        self._refs: OrderedDict[str, wire.BlobRef] = OrderedDict()  # state hash -> served blob, oldest first
        self._lock = asyncio.Lock()

    async def offer(self, path: Path, state_hash: str) -> wire.BlobRef:
        """The blob of ``path``, the store's snapshot file of ``state_hash`` at the time of the call."""
        link = self.dir / f"{state_hash}.bin"
        if state_hash not in self._refs and not link.exists():
            os.link(path, link)  # before any await: ``path`` holds this state now, maybe not after
        async with self._lock:  # one hashing per state, however many ask at once
            if state_hash not in self._refs:
                blob = f"snapshot/{state_hash}".encode()
                manifest = await self.host.serve_file(blob, link, pace=self.pace)
                self._refs[state_hash] = wire.BlobRef(blob=blob, root=manifest.root, size=manifest.size)
                while len(self._refs) > SERVED_KEEP:
                    old, ref = self._refs.popitem(last=False)
                    self.host.unserve_blob(ref.blob)
                    (self.dir / f"{old}.bin").unlink(missing_ok=True)
            return self._refs[state_hash]


# -- fetching -----------------------------------------------------------------------------------------


def transfer_dest(store_dir: Path, kind: str, key: str) -> Path:
    """Where a download of ``kind`` ("genesis", "snapshot") named ``key`` goes; a part file left by a
    download of another ``key`` of that kind is removed (it would never be resumed)."""
    directory = store_dir / INCOMING_DIR
    directory.mkdir(exist_ok=True)
    dest = directory / f"{kind}-{key}"
    for other in directory.glob(f"{kind}-*"):
        if other.name not in (dest.name, f"{dest.name}.part"):
            other.unlink(missing_ok=True)
    return dest


def sources(offers: dict[str, wire.BlobRef]) -> tuple[wire.BlobRef, list[str]]:
    """The blob most peers offered (by root and size; the first offered among equals) and those peers."""
    groups: dict[tuple[bytes, int], list[str]] = {}
    for peer, ref in offers.items():
        groups.setdefault((ref.root, ref.size), []).append(peer)
    peers = max(groups.values(), key=len)
    return offers[peers[0]], peers


async def fetch(
    host: p2p.Host,
    ref: wire.BlobRef,
    peers: list[str],
    dest: Path,
    *,
    join: JoinStatus,
    kind: str,
    max_bytes: int,
) -> Path:
    """Fetch the blob ``ref`` from ``peers`` to ``dest`` (resuming its part file), showing the download in
    ``join.<kind>_transfer`` and the peers it dropped in ``join.dropped``.

    Raises:
        p2p.TransferFailed: every peer was dropped or none offered an acceptable manifest (the part file
            stays, to be resumed).
        p2p.IntegrityError: the verified chunks do not make up the offered blob (the part file is gone).
        OSError: the disk could not take it.
    """
    progress = p2p.BlobProgress()
    record = Transfer(blob=ref.blob.decode("utf-8", "replace"), bytes_total=ref.size)
    setattr(join, f"{kind}_transfer", record)
    refresher = asyncio.create_task(_refresh(progress, record), name=f"{kind}-progress")
    try:
        path = await host.fetch_blob(ref.blob, peers=peers, root=ref.root, size=ref.size, max_bytes=max_bytes,
                                     dest=dest, progress=progress)
    except BaseException:
        record.state = "failed"
        raise
    else:
        record.state = "verifying"
        return Path(path)
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        _copy(progress, record)
        join.dropped.update(progress.dropped)
        if progress.dropped:
            log.warning("%s download dropped peers: %s", kind,
                        "; ".join(f"{peer}: {why}" for peer, why in sorted(progress.dropped.items())))
        log.info("%s download %s bytes=%d resumed=%d rate=%.0f B/s sources=%d", kind, record.state,
                 record.bytes_done, record.bytes_resumed, record.rate_bytes_per_s, len(peers))


async def _refresh(progress: p2p.BlobProgress, record: Transfer) -> None:
    while True:
        _copy(progress, record)
        await asyncio.sleep(REFRESH_S)


def _copy(progress: p2p.BlobProgress, record: Transfer) -> None:
    record.bytes_done = progress.bytes_done
    record.bytes_total = progress.bytes_total or record.bytes_total
    record.bytes_resumed = progress.bytes_resumed
    record.rate_bytes_per_s = round(progress.rate_bytes_per_s)
    record.sources = sorted(progress.sources)
    record.elapsed_s = round((progress.finished_at or time.monotonic()) - progress.started_at, 3)


def snapshot_max_bytes(genesis: crdt.Genesis) -> int:
    """The largest snapshot of ``genesis`` a peer may offer (its header aside, bounded by 1 MiB per author
    of crdt.MAX_AUTHORS in the worst case: far less in practice)."""
    return SNAPSHOT_BYTES_PER_PARAM * genesis.length + (64 << 20)


# -- snapshot offers ----------------------------------------------------------------------------------

Offered = dict[str, tuple[wire.SnapshotOffer, list[crdt.Checkpoint]]]
"""Peer -> its snapshot offer and the checkpoints in it, decoded."""


def check_snapshot_offer(
    data: bytes, state: crdt.ModelState, attestations: Attestations
) -> tuple[wire.SnapshotOffer, list[crdt.Checkpoint]]:
    """A peer's snapshot offer, checked before a byte of the snapshot moves: its checkpoints are a quorum
    of the run's signers for one state of this genesis (crdt.check_attestation; ``Replica.adopt`` checks
    the fetched stream's header against them again), and its size is possible for this model.

    Raises:
        wire.WireError: the offer does not decode or announces an impossible size.
        crdt.CrdtError: a checkpoint does not decode, or no quorum attests the state.
    """
    offer = wire.SnapshotOffer.decode(data)
    checkpoints = [attestations.decode(raw) for raw in offer.checkpoints]
    if attestations.policy is None:
        raise crdt.AttestationError("snapshot: this run's genesis names no checkpoint signers")
    first = checkpoints[0]  # the offer carries at least one
    header = crdt.SnapshotHeader(state.genesis.id, first.version_vector, first.state_hash, False)
    crdt.check_attestation(header, checkpoints, attestations.policy)
    if offer.ref.size > snapshot_max_bytes(state.genesis):
        raise wire.WireError(f"a snapshot of {offer.ref.size} bytes is larger than any of this model")
    return offer, checkpoints


async def fetch_snapshot(
    host: p2p.Host, offered: Offered, state: crdt.ModelState, store_dir: Path, *, join: JoinStatus
) -> tuple[crdt.Snapshot, list[crdt.Checkpoint]]:
    """Fetch the snapshot ``offered`` (one file, by its root) from every peer that offered it and decode
    it (in a worker thread); the downloaded file is removed once read. Returns it with the checkpoints
    that attest it, for ``Replica.adopt``.

    Raises:
        p2p.P2PError, OSError: the download failed (the part file stays, to be resumed).
        crdt.CrdtError: the verified bytes are not a snapshot of this genesis (the peers offered junk).
    """
    peers = list(offered)
    offer, checkpoints = offered[peers[0]]
    dest = transfer_dest(store_dir, "snapshot", checkpoints[0].state_hash)  # attested: hex, not the peer's
    path = await fetch(host, offer.ref, peers, dest, join=join, kind="snapshot", max_bytes=offer.ref.size)
    try:
        snapshot = await asyncio.to_thread(read_snapshot, path, state.genesis,
                                           max_authors=state.limits.max_authors)
    finally:
        path.unlink(missing_ok=True)
    assert join.snapshot_transfer is not None  # fetch() set it
    join.snapshot_transfer.state = "done"
    return snapshot, checkpoints
