"""daemon.node.replica: the one door (accept, log, count), retention by what members hold, snapshot
adoption."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
from node_testlib import HIST, SIGNER, G, attested, history, signer, state_of

import crdt
from daemon.node import replica as replica_module
from daemon.node.replica import DISK_ROOM_BYTES, DiskFull, Replica
from daemon.node.store import Store


def _open_replica(path: Path, *, snapshot_every: int = 1000) -> Replica:
    """A replica of the run's checkpoint signer: its own snapshots are attested, so what members hold
    decides its compaction (a non-signer waits for attestations: see the test below)."""
    return Replica.open(Store(path), G, snapshot_every=snapshot_every, signer=SIGNER)


def _hold_snapshot_writes(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Make the replica's snapshot writes (in its worker thread) wait: (writing, release) events."""
    writing, release = threading.Event(), threading.Event()
    stage = replica.store.stage_snapshot

    def slow_stage(parts: Iterable[bytes]) -> Path:
        writing.set()
        release.wait(10)
        return stage(parts)

    monkeypatch.setattr(replica.store, "stage_snapshot", slow_stage)
    return writing, release


async def test_replica_logs_what_it_accepts_and_compacts_only_what_every_member_holds(tmp_path: Path) -> None:
    authors = sorted({c.author for c in HIST})
    replica = _open_replica(tmp_path, snapshot_every=len(HIST) - 1)
    assert replica.accept(HIST[0]) is crdt.ApplyOutcome.APPLIED
    assert replica.accept(HIST[0]) is crdt.ApplyOutcome.DUPLICATE
    for c in HIST[1:-1]:  # the (len - 1)-th new one writes a snapshot, compacting nothing:
        replica.accept(c)  # no member heard from yet, so nobody else holds anything
    await replica.settle()
    assert replica.store.wal_records == len(HIST) - 1 and replica.counters.snapshots_written == 1
    assert replica.state.retained_count == len(HIST) - 1
    member = crdt.VersionVector.from_dict({a: 2 for a in authors})
    replica.holdings.note_vector("peerA", member)
    replica.accept(HIST[-1])
    assert await replica.snapshot_and_compact() == len(authors) * 2
    assert replica.state.retention_floor == member
    assert not replica.state.can_serve(crdt.VersionVector()) and replica.state.can_serve(member)
    replica.store.close()
    reopened = _open_replica(tmp_path)  # a restart: same state, same floor, the member remembered
    assert reopened.state.state_hash == state_of(HIST).state_hash
    assert reopened.state.retention_floor == member and reopened.holdings.get("peerA") == member
    reopened.store.close()


async def test_replica_adopts_a_snapshot_only_when_it_loses_nothing(tmp_path: Path) -> None:
    authors = sorted({c.author for c in HIST})
    ahead = state_of(HIST)
    ahead.compact(crdt.VersionVector.from_dict({a: 3 for a in authors}))
    mine = [c for c in HIST if c.seq <= 2 or c.author == authors[0]]  # behind, except on one author
    replica = _open_replica(tmp_path / "behind")
    for c in mine:
        replica.accept(c)
    assert not ahead.can_serve(replica.state.version_vector)  # so it must take a snapshot
    older = state_of([c for c in HIST if c.seq <= 3])  # lacks authors[0]'s seq 4, held here
    forged, _ = attested(state_of(HIST[:1]))
    with pytest.raises(crdt.AttestationError):  # a snapshot nobody of the run vouches for
        await replica.adopt(forged, [])
    assert await replica.adopt(*attested(older))
    assert replica.state.version_vector == crdt.VersionVector.from_dict(
        {a: (4 if a == authors[0] else 3) for a in authors}
    )
    # authors[0]'s records below the snapshot stay servable; the others' seq 3 was never held here
    assert replica.state.retention_floor == crdt.VersionVector.from_dict({a: 3 for a in authors[1:]})
    replica.store.close()
    assert _open_replica(tmp_path / "behind").state.state_hash == replica.state.state_hash

    lossy = Replica.open(Store(tmp_path / "lossy"), G, snapshot_every=1000, signer=SIGNER)
    for c in mine:
        lossy.accept(c)
    lossy.holdings.note_vector("peerA", lossy.state.version_vector)
    await lossy.snapshot_and_compact()  # forgets everything: now authors[0]'s seq 4 exists only in the state
    assert lossy.state.retention_floor == lossy.state.version_vector
    before = lossy.state.state_hash
    assert not await lossy.adopt(*attested(older))  # adopting would drop authors[0]'s seq 4
    assert lossy.state.state_hash == before and lossy.counters.snapshots_installed == 0
    lossy.store.close()


async def test_records_accepted_while_an_adopted_snapshot_is_written_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adopted state is written in a worker thread while the node goes on accepting records (a 100M
    state held the event loop for seconds): they end up in the adopted state and on disk, and the
    node's own periodic snapshot waits for the adoption."""
    authors = sorted({c.author for c in HIST})
    older = state_of([c for c in HIST if c.seq <= 2])
    replica = _open_replica(tmp_path, snapshot_every=1)  # would write a snapshot on every record
    writing, release = _hold_snapshot_writes(replica, monkeypatch)
    adopting = asyncio.create_task(replica.adopt(*attested(older)))
    while not writing.is_set():
        await asyncio.sleep(0.01)
    late = [c for c in HIST if c.seq <= 3 and c.author == authors[0]]  # seq 3 is new to the snapshot
    for c in late:
        replica.accept(c)  # the loop is free: the write runs in a thread
    assert replica.counters.snapshots_written == 0  # our own snapshot waits for the adoption
    release.set()
    assert await adopting
    expected = state_of([c for c in HIST if c.seq <= 2] + late[2:])
    assert replica.state.version_vector == expected.version_vector
    assert replica.state.state_hash == expected.state_hash
    replica.store.close()
    assert _open_replica(tmp_path).state.state_hash == expected.state_hash  # the late record was logged


async def test_records_accepted_while_our_snapshot_is_written_stay_live_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our periodic snapshot is hashed, encoded and written in a worker thread from a frozen state: the
    loop goes on accepting records (the live state moves on, the snapshot file is of the frozen one),
    the WAL keeps the late records above the snapshot's floor, and a restart has them all."""
    authors = sorted({c.author for c in HIST})
    first = [c for c in HIST if c.seq <= 2]
    late = [c for c in HIST if c.seq == 3]
    replica = _open_replica(tmp_path, snapshot_every=len(first))
    replica.holdings.note_vector("peerA", crdt.VersionVector.from_dict({a: 3 for a in authors}))  # holds all
    writing, release = _hold_snapshot_writes(replica, monkeypatch)
    for c in first:
        replica.accept(c)  # the last one starts the snapshot in the background
    while not writing.is_set():
        await asyncio.sleep(0.01)
    for c in late:
        assert replica.accept(c) is crdt.ApplyOutcome.APPLIED  # the loop is free meanwhile
    assert replica.counters.snapshots_written == 0
    release.set()
    await replica.settle()
    assert replica.counters.snapshots_written == 1
    assert replica.file_state == (state_of(first).version_vector, state_of(first).state_hash)
    assert replica.state.state_hash == state_of(first + late).state_hash  # the live state moved on
    # compacted up to the snapshot (peerA holds more, but the file has only the frozen state)
    assert replica.state.retention_floor == state_of(first).version_vector
    assert replica.store.wal_records == len(late)
    replica.store.close()
    assert _open_replica(tmp_path).state.state_hash == state_of(first + late).state_hash


def _trace_decodes(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(seq, thread name) of each record ``replica.state.decode`` decodes from now on."""
    calls: list[tuple[int, str]] = []
    decode = replica.state.decode

    def traced(c: crdt.Contribution) -> crdt.Decoded:
        calls.append((c.seq, threading.current_thread().name))
        return decode(c)

    monkeypatch.setattr(replica.state, "decode", traced)
    return calls


async def test_received_records_are_decoded_in_a_worker_and_refused_as_accept_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = _open_replica(tmp_path)
    calls = _trace_decodes(replica, monkeypatch)
    outcomes = [await replica.receive(c) for c in HIST]
    assert set(outcomes) <= {crdt.ApplyOutcome.APPLIED, crdt.ApplyOutcome.BUFFERED}
    assert replica.state.state_hash == state_of(HIST).state_hash
    assert calls and all(name.startswith("replica-decode") for _, name in calls)
    plain = _open_replica(tmp_path / "plain")
    for c in HIST:
        plain.accept(c)
    assert replica.suspects.stats() == plain.suspects.stats()  # measured in the worker, recorded the same
    plain.close()
    decoded = len(calls)
    assert await replica.receive(HIST[0]) is crdt.ApplyOutcome.DUPLICATE
    assert len(calls) == decoded  # a record already held is not decoded again
    ahead = history(G, n_authors=1, per_author=3, first=7)[2]  # seq 3 of a new author: buffered
    assert await replica.receive(ahead) is crdt.ApplyOutcome.BUFFERED
    assert await replica.receive(ahead) is crdt.ApplyOutcome.DUPLICATE
    assert len(calls) == decoded + 1  # a buffered record sent again is not decoded again either
    # A second record for a held slot with a payload that does not decode: named an equivocation, as a
    # plain accept names it (the decode failed in the worker; accept checked the slot first).
    first = HIST[0]
    bad = crdt.make_contribution(signer(0), genesis_id=G.id, seq=first.seq, fragment=first.fragment,
                                 codec=first.codec, payload=b"\xff" * 8, weight=first.weight,
                                 base_version=first.base_version)
    with pytest.raises(crdt.ConflictError):
        await replica.receive(bad)
    replica.close()


async def test_buffered_records_drained_by_a_received_one_were_decoded_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records that arrived ahead of their author's prefix wait in the buffer; the record that fills the
    gap drains them. They are decoded (and measured) in the worker with it, not on the loop at the drain.
    A forged record for the gap costs no decode at all: its signature is checked first."""
    replica = _open_replica(tmp_path)
    calls = _trace_decodes(replica, monkeypatch)
    mine = sorted((c for c in HIST if c.author == HIST[0].author), key=lambda c: c.seq)
    for c in reversed(mine[1:]):
        assert await replica.receive(c) is crdt.ApplyOutcome.BUFFERED
    calls.clear()
    forged = dataclasses.replace(mine[0], signature=b"\1" * 64)
    with pytest.raises(crdt.SignatureError):
        await replica.receive(forged)
    assert calls == []
    assert await replica.receive(mine[0]) is crdt.ApplyOutcome.APPLIED
    assert sorted(seq for seq, _ in calls) == [c.seq for c in mine]  # each once, successors included
    assert all(name.startswith("replica-decode") for _, name in calls)
    assert replica.state.state_hash == state_of(mine).state_hash
    plain = _open_replica(tmp_path / "plain")
    for c in mine:
        plain.accept(c)
    assert replica.suspects.stats() == plain.suspects.stats()  # measured in the worker, recorded the same
    plain.close()
    replica.close()


async def test_successors_decoded_ahead_are_bounded_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past AHEAD_DECODED_BYTES of decoded successors, the rest are decoded one by one as they drain
    (a buffered author may hold 64 MiB of payload: decoding all of it at once would multiply that)."""
    monkeypatch.setattr(replica_module, "AHEAD_DECODED_BYTES", 1)
    replica = _open_replica(tmp_path)
    mine = sorted((c for c in HIST if c.author == HIST[0].author), key=lambda c: c.seq)
    assert len(mine) >= 3
    for c in reversed(mine[1:]):
        await replica.receive(c)
    calls = _trace_decodes(replica, monkeypatch)
    assert await replica.receive(mine[0]) is crdt.ApplyOutcome.APPLIED
    in_worker = [seq for seq, name in calls if name.startswith("replica-decode")]
    assert in_worker == [mine[0].seq, mine[1].seq]  # the record and one successor, then the bound
    assert sorted(seq for seq, _ in calls) == [c.seq for c in mine]
    assert replica.state.state_hash == state_of(mine).state_hash
    replica.close()


def test_a_full_disk_refuses_contributions_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = _open_replica(tmp_path)
    replica.accept(HIST[0])
    real_append = replica.store.append

    def full(contribution: crdt.Contribution) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(replica.store, "append", full)
    monkeypatch.setattr(replica.store, "free_bytes", lambda: 0)
    before = replica.state.state_hash
    with pytest.raises(DiskFull):
        replica.accept(HIST[1])
    assert replica.disk_full and not replica.can_write() and replica.counters.refused_disk_full == 1
    assert replica.state.state_hash == before and replica.store.wal_records == 1  # memory and log in step
    monkeypatch.setattr(replica.store, "append", real_append)
    monkeypatch.setattr(replica.store, "free_bytes", lambda: 10 * DISK_ROOM_BYTES)
    assert replica.can_write()
    replica.accept(HIST[1])
    assert not replica.disk_full and replica.store.wal_records == 2
    replica.close()
    assert _open_replica(tmp_path).state.state_hash == state_of(HIST[:2]).state_hash


def test_a_failed_append_leaves_no_torn_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replica = _open_replica(tmp_path)
    replica.accept(HIST[0])
    size = (tmp_path / "wal.log").stat().st_size

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("daemon.node.store.os.fsync", fsync_fails)
    with pytest.raises(DiskFull):
        replica.accept(HIST[1])
    monkeypatch.undo()
    assert (tmp_path / "wal.log").stat().st_size == size
    replica.accept(HIST[2])  # appended right after the last good record
    replica.close()
    assert Store(tmp_path).recovery.truncated_bytes == 0


async def test_members_far_behind_or_long_silent_do_not_pin_compaction(tmp_path: Path) -> None:
    now = [1000.0]
    replica = Replica.open(Store(tmp_path), G, snapshot_every=2, member_ttl_s=60.0, clock=lambda: now[0],
                           signer=SIGNER)
    authors = sorted({c.author for c in HIST})
    replica.holdings.note_vector("stranger", crdt.VersionVector())  # anyone with the genesis id
    replica.holdings.note_vector("member", crdt.VersionVector.from_dict({a: 1 for a in authors}))
    for c in sorted(HIST, key=lambda c: c.seq)[:6]:  # seqs 1 and 2 of every author
        replica.accept(c)
        await replica.settle()
    # the stranger lacks 6 > snapshot_every: it does not hold history back; the member (lacks 3) does
    assert replica.state.retention_floor == crdt.VersionVector.from_dict({a: 1 for a in authors})
    now[0] += 61.0  # the member falls silent; another one, up to date, is heard
    replica.holdings.note_vector("fresh", replica.state.version_vector)
    await replica.snapshot_and_compact()
    assert replica.state.retention_floor == replica.state.version_vector  # nobody else waits: compacted
    assert set(replica.holdings.vectors) == {"fresh"}  # the silent member and the stranger were forgotten


async def test_compaction_waits_for_a_quorum_of_signers_and_checkpoints_are_countersigned(
    tmp_path: Path,
) -> None:
    """A non-signer never compacts above the newest attested state: a joiner that adopts that snapshot
    must get the rest as records. The signer's checkpoint, once it arrives, lets it compact."""
    follower = Replica.open(Store(tmp_path / "follower"), G, snapshot_every=1000)
    leader = Replica.open(Store(tmp_path / "leader"), G, snapshot_every=1000, signer=SIGNER)
    published: list[crdt.Checkpoint] = []
    leader.on_checkpoint = published.append
    for replica in (follower, leader):
        for c in HIST:
            replica.accept(c)
        replica.holdings.note_vector("peer", replica.state.version_vector)
    assert await follower.snapshot_and_compact() == 0  # nobody attests anything yet: all of it stays
    assert follower.attested_snapshot() is None  # and its snapshot is not served
    assert await leader.snapshot_and_compact() == len(HIST) and len(published) == 1
    written = follower.counters.snapshots_written
    assert follower.offer_checkpoint(published[0].encode()) is None  # a follower does not countersign
    await follower.settle()
    # ...but compacts at once up to what the run now vouches for (an idle node has no next snapshot).
    assert follower.state.retained_count == 0 and follower.counters.snapshots_written == written + 1
    assert follower.offer_checkpoint(published[0].encode()) is None  # held already: nothing new
    assert follower.counters.snapshots_written == written + 1
    path, checkpoints = leader.attested_snapshot()
    assert path.exists() and checkpoints == published
    stranger = crdt.Signer.from_seed(b"\x07" * 32)
    with pytest.raises(crdt.ValidationError, match="not a checkpoint signer"):
        follower.offer_checkpoint(follower.state.checkpoint(stranger).encode())


async def test_a_digest_whose_hash_is_unknown_is_hashed_once_off_the_loop_for_all_who_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = _open_replica(tmp_path)
    for c in HIST[:3]:
        replica.accept(c)
    assert not replica.state.hash_known
    threads: list[str] = []
    freeze = crdt.ModelState.freeze

    def counting_freeze(state: crdt.ModelState) -> crdt.FrozenState:
        frozen = freeze(state)
        digest = frozen.digest

        def noting_thread() -> crdt.Digest:
            threads.append(threading.current_thread().name)
            return digest()

        monkeypatch.setattr(frozen, "digest", noting_thread)
        return frozen

    monkeypatch.setattr(crdt.ModelState, "freeze", counting_freeze)
    first, second = await asyncio.gather(replica.digest(), replica.digest())
    assert first == second == state_of(HIST[:3]).digest()
    assert len(threads) == 1 and threads[0] != threading.main_thread().name  # once, in a worker
    assert replica.state.hash_known  # kept: nothing changed meanwhile
    assert await replica.digest() == first and len(threads) == 1
    replica.accept(HIST[3])
    assert await replica.digest() == state_of(HIST[:4]).digest() and len(threads) == 2
    replica.close()
