"""Store: the node's durable copy of the model state (genesis, latest snapshot, WAL of contributions).

Theory of operation
-------------------
Directory layout (``path`` is created if missing)::

    genesis.bin      sealed blob (crdt.seal_blob) of Genesis.encode(); written once
    snapshot.bin     the crdt snapshot stream (framed, checksummed parts): exactly what peers are served
    checkpoints.bin  sealed blob of the checkpoints held for that snapshot's state (crdt.checkpoint)
    wal.log          crdt WAL: header + framed Contribution.encode() records, appended + fsynced
    peers.bin      sealed blob of the members' last known version vectors (retention must remember them)
    evidence/      one sealed proof per equivocation: the author's two signed records for one slot
    incoming/      genesis and snapshot downloads in progress (``<name>.part``, resumable; offers.py)
    served/        hard links to the snapshot files offered to peers, one per state (offers.py)
    LOCK           flock()ed while a Store is open, so two daemons cannot share a directory

Durability: :meth:`append` writes one record and fsyncs before returning, so an accepted contribution
survives a crash (the node applies first, then appends: a crash in between loses a contribution that
anti-entropy fetches again, never the other way round). Whole files are written with the classic
tmp-file + fsync + rename + fsync(dir) sequence, so a reader sees the old or the new file, never a mix.

Recovery on open: the WAL is scanned with :func:`crdt.scan_log`; a torn or corrupt tail (a crash during
append, or garbage) is truncated to the valid prefix and reported in :attr:`Store.recovery` and the log.
A WAL that is not ours (bad magic, other format version) raises StoreError instead of being truncated.

Compaction: :meth:`write_snapshot` atomically replaces the snapshot (streamed part by part from
``ModelState.snapshot_parts``, never whole in memory), then rewrites the WAL keeping the contributions
above the replica's retention floor: those the snapshot does not cover, and the covered ones the node
still serves to peers that lack them (``crdt.ModelState.from_own_snapshot`` turns them back into servable
history, so a restart does not compact anything). A crash between the two steps leaves extra records in
the WAL, which only means more history is kept. The WAL's (author, seq) slots are kept beside its
records, so compaction decodes nothing (it used to re-verify every record's signature on the event
loop: about 18 s at 100k records).

Rejected alternatives: SQLite (another format to carry, and we only ever append and replay); one file
per contribution (millions of inodes, slow fsync of directories); mmap (no durability ordering).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgpack

import crdt
from daemon.node.store_files import (
    GENESIS_KIND,
    StoreError,
    atomic_write,
    decode_checkpoints,
    decode_equivocation,
    decode_peer_vectors,
    fsync_dir,
    publish_staged,
    read_genesis,
    read_snapshot,
    stage_write,
)

__all__ = ["RecoveryReport", "Store", "StoreError", "read_genesis", "read_snapshot"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_GENESIS_FILE = "genesis.bin"
_SNAPSHOT_FILE = "snapshot.bin"
_WAL_FILE = "wal.log"
_LOCK_FILE = "LOCK"
#: Blob kinds (7 bytes each, see crdt.log.seal_blob).
_CHECKPOINTS_FILE = "checkpoints.bin"
_CHECKPOINTS_KIND = b"CHKPNTS"
_PEERS_FILE = "peers.bin"
_PEERS_KIND = b"PEERVVS"
_EVIDENCE_DIR = "evidence"
_EVIDENCE_KIND = b"EQUIVOC"


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening the store found in the WAL."""

    records: int
    """Valid records kept."""
    truncated_bytes: int
    """Bytes cut from the tail (0: the log was clean)."""
    error: str | None
    """Why the tail was cut (scan_log's reason), or None."""


class Store:
    """Durable genesis + snapshot + WAL in one directory. Not thread-safe; one instance per directory.

    Raises:
        StoreError: the directory is locked by another Store, or holds files this build cannot read.
    """

    def __init__(self, path: Path, *, limits: crdt.Limits = crdt.DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self._limits = limits
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise StoreError(f"store {self.path} is in use by another process") from exc
        try:
            self._records, self.recovery = self._recover()
            self._slots: list[tuple[bytes, int]] | None = None  # (author, seq) of each record, once known
            self._genesis_id: str | None = None  # the stored genesis's, once read or written
            self._wal = open(self.path / _WAL_FILE, "ab")  # noqa: SIM115 - owned until close()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- lifecycle --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush and release the directory. Idempotent."""
        if self._lock_fd < 0:
            return
        try:
            self._wal.close()
        finally:  # a close that fails (a full disk) must still release the directory
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery ---------------------------------------------------------------------------------------
    def _recover(self) -> tuple[list[bytes], RecoveryReport]:
        wal = self.path / _WAL_FILE
        data = wal.read_bytes() if wal.exists() else b""
        try:
            scan = crdt.scan_log(data)
        except crdt.ValidationError as exc:
            raise StoreError(f"{wal}: {exc}") from exc
        truncated = len(data) - scan.good_length
        if scan.good_length == 0:
            atomic_write(wal, crdt.LOG_HEADER)
        elif truncated:
            with open(wal, "r+b") as f:
                f.truncate(scan.good_length)
                f.flush()
                os.fsync(f.fileno())
        if truncated:
            log.warning(
                "store recovered path=%s kept_records=%d truncated_bytes=%d reason=%s",
                wal,
                len(scan.records),
                truncated,
                scan.error,
            )
        return scan.records, RecoveryReport(len(scan.records), truncated, scan.error)

    # -- reading ----------------------------------------------------------------------------------------
    def load_genesis(self) -> crdt.Genesis | None:
        """The stored genesis, or None for a new store.

        Raises:
            StoreError: the file fails its checksum or does not decode (whole files are written
                atomically, so this is disk corruption or a foreign file).
        """
        if not self.genesis_file.exists():
            return None
        genesis = read_genesis(self.genesis_file)
        self._genesis_id = genesis.id
        return genesis

    @property
    def genesis_file(self) -> Path:
        """The stored genesis, sealed: exactly what peers are served (a joiner installs it as fetched)."""
        return self.path / _GENESIS_FILE

    def install_genesis(self, path: Path, genesis: crdt.Genesis) -> None:
        """Make ``path``, a genesis file fetched from a peer and read back as ``genesis`` (its id is the
        one asked for), the stored genesis: moved into place, never rewritten.

        Raises:
            StoreError: a genesis is already stored (one directory = one run).
        """
        if self.genesis_file.exists():
            raise StoreError(f"{self.path} already holds a genesis")
        os.replace(path, self.genesis_file)
        fsync_dir(self.path)
        self._genesis_id = genesis.id

    def load_state(
        self, genesis: crdt.Genesis | None
    ) -> tuple[crdt.Snapshot | None, list[crdt.Contribution]]:
        """The latest snapshot and every WAL contribution by (seq, author), to rebuild the replica of
        ``genesis`` with ``crdt.ModelState.from_own_snapshot(genesis, snapshot, log=contributions)``.

        Raises:
            StoreError: a file fails its checksums or does not decode (a store of an older format
                version says so), or the snapshot belongs to another genesis.
        """
        snapshot = self._load_snapshot(genesis) if genesis is not None else None
        out: list[crdt.Contribution] = []
        for i, raw in enumerate(self._records):
            try:
                out.append(crdt.Contribution.decode(raw, limits=self._limits))
            except crdt.ValidationError as exc:
                raise StoreError(f"{self.path / _WAL_FILE}: record {i} does not decode: {exc}") from exc
        self._slots = [(c.author, c.seq) for c in out]
        out.sort(key=lambda c: (c.seq, c.author))
        return snapshot, out

    def _load_snapshot(self, genesis: crdt.Genesis) -> crdt.Snapshot | None:
        path = self.snapshot_file
        if not path.exists():
            return None
        try:  # our own file: read under the build's hard author cap, so a state this node held reloads
            return read_snapshot(path, genesis, max_authors=crdt.MAX_AUTHORS)
        except crdt.ValidationError as exc:
            raise StoreError(f"{path}: {exc}") from exc

    @property
    def snapshot_file(self) -> Path:
        """The latest snapshot, in the stream form peers are served (crdt.SnapshotReader reads it)."""
        return self.path / _SNAPSHOT_FILE

    def load_checkpoints(self) -> list[crdt.Checkpoint]:
        """The checkpoints held for the latest snapshot's state (its attestations, to serve with it)."""
        return self._read_blob(_CHECKPOINTS_FILE, _CHECKPOINTS_KIND, decode_checkpoints) or []

    def _read_blob(self, name: str, kind: bytes, decode: Callable[[bytes], T]) -> T | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return decode(crdt.unseal_blob(kind, path.read_bytes()))
        except crdt.ValidationError as exc:
            raise StoreError(f"{path}: {exc}") from exc

    def load_peer_vectors(self) -> dict[str, tuple[crdt.VersionVector, float]]:
        """The last version vector known of every run member and when it was heard (unix time; see
        :meth:`write_peer_vectors`)."""
        return self._read_blob(_PEERS_FILE, _PEERS_KIND, decode_peer_vectors) or {}

    def load_equivocations(self) -> list[tuple[crdt.Contribution, crdt.Contribution]]:
        """Every kept equivocation proof that still checks out (see :meth:`write_equivocation`). Evidence
        is advisory, so a file that does not is logged and skipped rather than stopping the node."""
        proofs = []
        for path in sorted((self.path / _EVIDENCE_DIR).glob("*.bin")):
            try:
                proofs.append(decode_equivocation(crdt.unseal_blob(_EVIDENCE_KIND, path.read_bytes())))
            except (OSError, crdt.CrdtError) as exc:
                log.warning("ignoring unreadable equivocation proof path=%s error=%s", path, exc)
        return proofs

    # -- writing ----------------------------------------------------------------------------------------
    def write_equivocation(self, first: crdt.Contribution, second: crdt.Contribution) -> Path:
        """Keep two validly signed records of one (author, seq) slot: proof, checkable by anyone with the
        author's public key, that the author equivocated. One proof per author is enough to exclude it,
        so an author that equivocates on every seq costs one file. Returns the file written."""
        directory = self.path / _EVIDENCE_DIR
        directory.mkdir(exist_ok=True)
        path = directory / f"{first.author.hex()}.bin"
        proof = msgpack.packb([first.encode(), second.encode()])
        atomic_write(path, crdt.seal_blob(_EVIDENCE_KIND, proof))
        return path

    def append(self, contribution: crdt.Contribution) -> None:
        """Append one contribution and fsync (durable when this returns).

        Raises:
            OSError: the write or the fsync failed (a full disk: ENOSPC). The log is cut back to where it
                was, so the next append does not follow a torn record; nothing was appended.
        """
        raw = contribution.encode()
        end = self._wal.tell()
        try:
            self._wal.write(crdt.frame_record(raw))
            self._wal.flush()
            os.fsync(self._wal.fileno())
        except OSError:
            self._reopen_at(end)
            raise
        slots = self._record_slots()  # before the new record joins the list: it is not decoded again
        self._records.append(raw)
        slots.append((contribution.author, contribution.seq))

    def _record_slots(self) -> list[tuple[bytes, int]]:
        """(author, seq) of each WAL record (decoded once, the first time they are needed)."""
        if self._slots is None:
            self._slots = []
            for raw in self._records:
                c = crdt.Contribution.decode(raw, limits=self._limits)
                self._slots.append((c.author, c.seq))
        return self._slots

    def _reopen_at(self, end: int) -> None:
        """After a failed append: drop the buffered bytes and cut the file back to ``end``. If even that
        fails, the torn tail is what recovery truncates at the next start."""
        with contextlib.suppress(OSError):
            self._wal.close()  # flushing the rest fails too, and is what we want to drop
        self._wal = open(self.path / _WAL_FILE, "ab")  # noqa: SIM115 - owned until close()
        with contextlib.suppress(OSError):
            os.truncate(self.path / _WAL_FILE, end)

    def write_peer_vectors(self, vectors: dict[str, tuple[crdt.VersionVector, float]]) -> None:
        """Persist what each member is known to hold and when it was heard, atomically. Compaction must
        never forget a member across a restart: a node that compacted by the vectors of only the peers it
        had heard from since starting could drop history a silent member still lacks, and two such nodes
        can then no longer serve each other (neither snapshot covers what the other compacted)."""
        payload = msgpack.packb(
            {peer: [vv.encode(), heard] for peer, (vv, heard) in sorted(vectors.items())}
        )
        atomic_write(self.path / _PEERS_FILE, crdt.seal_blob(_PEERS_KIND, payload))

    def write_genesis(self, genesis: crdt.Genesis) -> None:
        """Persist the genesis atomically. Writing the same genesis again is a no-op.

        Raises:
            StoreError: a *different* genesis is already stored (one directory = one run).
        """
        if self._genesis_id is None and (self.path / _GENESIS_FILE).exists():
            self.load_genesis()
        if self._genesis_id is not None:
            if self._genesis_id != genesis.id:
                raise StoreError(f"{self.path} already holds genesis {self._genesis_id[:16]}")
            return
        atomic_write(self.path / _GENESIS_FILE, crdt.seal_blob(GENESIS_KIND, genesis.encode()))
        self._genesis_id = genesis.id

    def write_snapshot(
        self,
        parts: Iterable[bytes],
        *,
        floor: crdt.VersionVector,
        checkpoints: Iterable[crdt.Checkpoint] = (),
    ) -> int:
        """Atomically replace the snapshot with ``parts`` (``ModelState.snapshot_parts()``) and the
        checkpoints held for its state, then drop the WAL records at or below the retention ``floor``
        (``ModelState.retention_floor``). Returns WAL records dropped."""
        return self.publish_snapshot(self.stage_snapshot(parts), floor=floor, checkpoints=checkpoints)

    def stage_snapshot(self, parts: Iterable[bytes]) -> Path:
        """The slow half of :meth:`write_snapshot` (encode, write, fsync), for a worker thread: the file
        is not served or loaded until :meth:`publish_snapshot`. One at a time (one staging name)."""
        return stage_write(self.snapshot_file, parts)

    def publish_snapshot(
        self, staged: Path, *, floor: crdt.VersionVector, checkpoints: Iterable[crdt.Checkpoint] = ()
    ) -> int:
        """The rest of :meth:`write_snapshot`, on the thread that owns the store."""
        publish_staged(staged, self.snapshot_file)
        self.write_checkpoints(checkpoints)
        return self._compact(floor)

    def write_checkpoints(self, checkpoints: Iterable[crdt.Checkpoint]) -> None:
        """Replace the checkpoints kept beside the snapshot (more signatures arrive after it is written)."""
        payload = msgpack.packb([c.encode() for c in checkpoints])
        atomic_write(self.path / _CHECKPOINTS_FILE, crdt.seal_blob(_CHECKPOINTS_KIND, payload))

    def _compact(self, floor: crdt.VersionVector) -> int:
        slots = self._record_slots()
        records = zip(self._records, slots, strict=True)
        kept = [(raw, slot) for raw, slot in records if slot[1] > floor.get(slot[0])]
        keep = [raw for raw, _ in kept]
        dropped = len(self._records) - len(keep)
        if dropped == 0:
            return 0
        wal = self.path / _WAL_FILE
        self._wal.close()
        atomic_write(wal, crdt.LOG_HEADER + b"".join(crdt.frame_record(r) for r in keep))
        self._wal = open(wal, "ab")  # noqa: SIM115 - owned until close()
        self._records = keep
        self._slots = [slot for _, slot in kept]
        return dropped

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's file system."""
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    @property
    def wal_records(self) -> int:
        return len(self._records)

    @property
    def wal_bytes(self) -> int:
        with contextlib.suppress(OSError):
            return (self.path / _WAL_FILE).stat().st_size
        return 0
