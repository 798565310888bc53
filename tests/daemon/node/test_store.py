"""daemon.node.store: durability, recovery of torn tails, atomic snapshots, WAL compaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_testlib import HIST, G, genesis, signer, state_of

import crdt
from daemon.node.store import Store, StoreError


def _restore(store: Store) -> crdt.ModelState:
    g = store.load_genesis()
    snap, logged = store.load_state(g)
    assert g is not None
    return crdt.ModelState.from_own_snapshot(g, snap, log=logged)


def test_empty_store(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as st:
        assert st.load_genesis() is None
        assert st.load_state(None) == (None, [])
        assert st.recovery.truncated_bytes == 0


def test_append_reopen(tmp_path: Path) -> None:
    with Store(tmp_path) as st:
        st.write_genesis(G)
        st.write_genesis(G)  # idempotent
        for c in reversed(HIST):
            st.append(c)
    with Store(tmp_path) as st:
        g = st.load_genesis()
        snap, logged = st.load_state(g)
        assert g == G and snap is None and len(logged) == len(HIST)
        assert _restore(st).state_hash == state_of(HIST).state_hash
        with pytest.raises(StoreError, match="already holds"):
            st.write_genesis(genesis(seed=9))


def test_lock(tmp_path: Path) -> None:
    with Store(tmp_path), pytest.raises(StoreError, match="in use"):
        Store(tmp_path)
    Store(tmp_path).close()  # released


def test_snapshot_compacts_wal(tmp_path: Path) -> None:
    with Store(tmp_path) as st:
        st.write_genesis(G)
        for c in HIST:
            st.append(c)
        first = state_of(HIST[:6])
        dropped = st.write_snapshot(first.snapshot_parts(), floor=first.version_vector)
        assert dropped == sum(1 for c in HIST if c.seq <= first.version_vector.get(c.author))
        assert st.wal_records == len(HIST) - dropped
    with Store(tmp_path) as st:
        assert _restore(st).state_hash == state_of(HIST).state_hash


def test_restart_keeps_what_the_node_still_serves(tmp_path: Path) -> None:
    """A restart must not compact: history retained above the floor stays servable after reopening.

    Regression: the WAL used to keep only what the snapshot did not cover, so every restart raised the
    retention floor to the snapshot's vector; two restarted nodes could then each lack what the other had
    compacted, and neither could serve or adopt the other's snapshot (the soak's final agreement hung).
    """
    authors = sorted({c.author for c in HIST})
    behind = crdt.VersionVector.from_dict({a: 1 for a in authors})  # a peer that has seq 1 of everyone
    with Store(tmp_path) as st:
        st.write_genesis(G)
        for c in HIST:
            st.append(c)
        live = state_of(HIST)
        live.compact(behind)
        st.write_snapshot(live.snapshot_parts(), floor=live.retention_floor)
        assert st.wal_records == len(HIST) - len(authors)
    with Store(tmp_path) as st:
        restored = _restore(st)
    assert restored.state_hash == live.state_hash
    assert restored.retention_floor == live.retention_floor == behind
    assert restored.can_serve(behind)
    sent = restored.contributions_missing_for(behind, max_count=100)
    assert sorted(c.id for c in sent) == sorted(c.id for c in HIST if c.seq > 1)


def test_torn_tail_every_offset(tmp_path: Path) -> None:
    """Cut the WAL at every byte offset: open recovers a valid prefix and reports what it cut."""
    src = tmp_path / "src"
    with Store(src) as st:
        st.write_genesis(G)
        for c in HIST[:4]:
            st.append(c)
    full = (src / "wal.log").read_bytes()
    ends = {len(crdt.LOG_HEADER)}
    pos = len(crdt.LOG_HEADER)
    for rec in crdt.scan_log(full).records:
        pos += 8 + len(rec)
        ends.add(pos)
    step = 7  # every offset would be ~4k opens; a prime stride plus all record edges covers each case
    cuts = sorted(set(range(0, len(full) + 1, step)) | ends | {e - 1 for e in ends} | {e + 1 for e in ends})
    d = tmp_path / "cut"
    d.mkdir()
    (d / "genesis.bin").write_bytes((src / "genesis.bin").read_bytes())
    for cut in (c for c in cuts if c <= len(full)):
        (d / "wal.log").write_bytes(full[:cut])
        with Store(d) as st:
            kept = max(e for e in ends | {0} if e <= cut)
            assert st.recovery.truncated_bytes == (cut - kept if cut >= len(crdt.LOG_HEADER) else cut)
            _, logged = st.load_state(None)
            assert [c.id for c in logged] == [
                c.id for c in sorted(HIST[: st.recovery.records], key=lambda c: (c.seq, c.author))
            ]
            st.append(HIST[5])  # appending after recovery works
        with Store(d) as st:
            assert st.recovery.truncated_bytes == 0


def test_garbage_tail_and_foreign(tmp_path: Path) -> None:
    with Store(tmp_path) as st:
        st.append(HIST[0])
    with open(tmp_path / "wal.log", "ab") as f:
        f.write(b"\xff" * 50)
    with Store(tmp_path) as st:
        assert st.recovery.truncated_bytes == 50 and "exceeds" in (st.recovery.error or "")
        assert len(st.load_state(None)[1]) == 1
    (tmp_path / "wal.log").write_bytes(b"not a wal at all")
    with pytest.raises(StoreError, match="magic"):
        Store(tmp_path)
    (tmp_path / "wal.log").write_bytes(crdt.LOG_HEADER)
    (tmp_path / "snapshot.bin").write_bytes(b"junk")
    with Store(tmp_path) as st:
        st.write_genesis(G)
        with pytest.raises(StoreError):
            st.load_state(st.load_genesis())


def test_peer_vectors_survive_a_restart_and_corruption_is_reported(tmp_path: Path) -> None:
    vectors = {
        "peerA": (crdt.VersionVector.from_dict({b"a" * 32: 3}), 1700000000.5),
        "peerB": (crdt.VersionVector.from_dict({}), 1700000001.123),
    }
    with Store(tmp_path) as st:
        assert st.load_peer_vectors() == {}
        st.write_peer_vectors(vectors)
    with Store(tmp_path) as st:
        assert st.load_peer_vectors() == vectors
    path = tmp_path / "peers.bin"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with Store(tmp_path) as st, pytest.raises(StoreError):
        st.load_peer_vectors()


def test_equivocation_proofs_survive_a_restart_and_bad_ones_are_skipped(tmp_path: Path) -> None:
    first = HIST[0]
    author = signer(0)  # HIST[0]'s author
    second = crdt.make_contribution(
        author, genesis_id=G.id, seq=first.seq, fragment=first.fragment, codec=first.codec,
        payload=first.payload, weight=0.5, base_version=first.base_version,
    )
    with pytest.raises(crdt.ConflictError) as conflict:
        state_of([first, second])
    with Store(tmp_path) as st:
        assert st.load_equivocations() == []
        proof = st.write_equivocation(*conflict.value.evidence)
        not_a_proof = st.write_equivocation(HIST[4], HIST[4])  # one record twice proves nothing
        not_a_proof = not_a_proof.rename(not_a_proof.with_name("z-1.bin"))
    torn = proof.with_name("y-1.bin")
    torn.write_bytes(proof.read_bytes()[:-3])
    with Store(tmp_path) as st:
        ((a, b),) = st.load_equivocations()  # the torn copy and the non-proof are logged and skipped
    assert (a.id, b.id) == (first.id, second.id)
