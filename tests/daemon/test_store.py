"""daemon.store and daemon.replica: durability, recovery of torn tails, atomic snapshots, WAL compaction,
retention by what members hold, and snapshot adoption."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest

import crdt
from daemon.replica import Replica
from daemon.store import Store, StoreError


def genesis(length: int = 96, n_fragments: int = 3, seed: int = 0) -> crdt.Genesis:
    params = np.random.default_rng(seed).standard_normal(length).astype(np.float32)
    step = length // n_fragments
    bounds = [*[*range(0, length - step + 1, step)][:n_fragments], length]
    return crdt.Genesis(params, tuple(itertools.pairwise(bounds)), {"run": "t"})


def history(g: crdt.Genesis, n_authors: int, per_author: int) -> list[crdt.Contribution]:
    out = []
    for a in range(n_authors):
        signer = crdt.Signer.from_seed(hashlib.sha256(b"store-%d" % a).digest())
        for seq in range(1, per_author + 1):
            rng = np.random.default_rng([a, seq])
            frag = int(rng.integers(len(g.fragments)))
            n = g.fragment_length(frag)
            idx = np.sort(rng.choice(n, size=n // 4, replace=False)).astype(np.uint32)
            payload = crdt.encode_payload("sparse-q8", n, idx, rng.standard_normal(idx.size) * 0.01)
            out.append(
                crdt.make_contribution(
                    signer,
                    genesis_id=g.id,
                    seq=seq,
                    fragment=frag,
                    codec="sparse-q8",
                    payload=payload,
                    weight=1.0,
                    base_version=b"\0" * 32,
                )
            )
    return out


G = genesis(length=96, n_fragments=3)
HIST = history(G, n_authors=3, per_author=4)


def _state(cs) -> crdt.ModelState:
    s = crdt.ModelState(G)
    for c in cs:
        s.apply(c)
    return s


def _restore(store: Store) -> crdt.ModelState:
    g, snap, logged = store.load()
    assert g is not None
    return crdt.ModelState.from_snapshot(g, snap, log=logged)


def test_empty_store(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as st:
        assert st.load() == (None, None, [])
        assert st.recovery.truncated_bytes == 0


def test_append_reopen(tmp_path: Path) -> None:
    with Store(tmp_path) as st:
        st.write_genesis(G)
        st.write_genesis(G)  # idempotent
        for c in reversed(HIST):
            st.append(c)
    with Store(tmp_path) as st:
        g, snap, logged = st.load()
        assert g == G and snap is None and len(logged) == len(HIST)
        assert _restore(st).state_hash == _state(HIST).state_hash
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
        first = _state(HIST[:6])
        dropped = st.write_snapshot(first.snapshot(), floor=first.version_vector)
        assert dropped == sum(1 for c in HIST if c.seq <= first.version_vector.get(c.author))
        assert st.wal_records == len(HIST) - dropped
    with Store(tmp_path) as st:
        assert _restore(st).state_hash == _state(HIST).state_hash


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
        live = _state(HIST)
        live.compact(behind)
        st.write_snapshot(live.snapshot(), floor=live.retention_floor)
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
            _, _, logged = st.load()
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
        assert len(st.load()[2]) == 1
    (tmp_path / "wal.log").write_bytes(b"not a wal at all")
    with pytest.raises(StoreError, match="magic"):
        Store(tmp_path)
    (tmp_path / "wal.log").write_bytes(crdt.LOG_HEADER)
    (tmp_path / "snapshot.bin").write_bytes(b"junk")
    with Store(tmp_path) as st, pytest.raises(StoreError):
        st.load()


def test_peer_vectors_survive_a_restart_and_corruption_is_reported(tmp_path: Path) -> None:
    vectors = {
        "peerA": crdt.VersionVector.from_dict({b"a" * 32: 3}),
        "peerB": crdt.VersionVector.from_dict({}),
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
    signer = crdt.Signer.from_seed(hashlib.sha256(b"store-0").digest())  # HIST[0]'s author
    second = crdt.make_contribution(
        signer, genesis_id=G.id, seq=first.seq, fragment=first.fragment, codec=first.codec,
        payload=first.payload, weight=0.5, base_version=first.base_version,
    )
    with pytest.raises(crdt.ConflictError) as conflict:
        _state([first, second])
    with Store(tmp_path) as st:
        assert st.load_equivocations() == []
        proof = st.write_equivocation(*conflict.value.evidence)
        not_a_proof = st.write_equivocation(HIST[1], HIST[1])  # one record twice proves nothing
        not_a_proof = not_a_proof.rename(not_a_proof.with_name("z-1.bin"))
    torn = proof.with_name("y-1.bin")
    torn.write_bytes(proof.read_bytes()[:-3])
    with Store(tmp_path) as st:
        ((a, b),) = st.load_equivocations()  # the torn copy and the non-proof are logged and skipped
    assert (a.id, b.id) == (first.id, second.id)


def _open_replica(path: Path, *, snapshot_every: int = 1000) -> Replica:
    store = Store(path)
    store.write_genesis(G)
    return Replica(store, _restore(store), snapshot_every=snapshot_every)


def test_replica_logs_what_it_accepts_and_compacts_only_what_every_member_holds(tmp_path: Path) -> None:
    authors = sorted({c.author for c in HIST})
    replica = _open_replica(tmp_path, snapshot_every=len(HIST) - 1)
    assert replica.accept(HIST[0]) is crdt.ApplyOutcome.APPLIED
    assert replica.accept(HIST[0]) is crdt.ApplyOutcome.DUPLICATE
    for c in HIST[1:-1]:  # the (len - 1)-th new one writes a snapshot, compacting nothing:
        replica.accept(c)  # no member heard from yet, so nobody else holds anything
    assert replica.store.wal_records == len(HIST) - 1 and replica.snapshots_written == 1
    assert replica.state.retained_count == len(HIST) - 1
    member = crdt.VersionVector.from_dict({a: 2 for a in authors})
    replica.note_vector("peerA", member)
    replica.accept(HIST[-1])
    assert replica.snapshot_and_compact() == len(authors) * 2
    assert replica.state.retention_floor == member
    assert not replica.state.can_serve(crdt.VersionVector()) and replica.state.can_serve(member)
    replica.store.close()
    reopened = _open_replica(tmp_path)  # a restart: same state, same floor, the member remembered
    assert reopened.state.state_hash == _state(HIST).state_hash
    assert reopened.state.retention_floor == member and reopened.peer_vectors == {"peerA": member}
    reopened.store.close()


def test_replica_adopts_a_snapshot_only_when_it_loses_nothing(tmp_path: Path) -> None:
    authors = sorted({c.author for c in HIST})
    ahead = _state(HIST)
    ahead.compact(crdt.VersionVector.from_dict({a: 3 for a in authors}))
    mine = [c for c in HIST if c.seq <= 2 or c.author == authors[0]]  # behind, except on one author
    replica = _open_replica(tmp_path / "behind")
    for c in mine:
        replica.accept(c)
    assert not ahead.can_serve(replica.state.version_vector)  # so it must take a snapshot
    older = _state([c for c in HIST if c.seq <= 3]).snapshot()  # lacks authors[0]'s seq 4, held here
    assert replica.adopt(older)
    assert replica.state.version_vector == crdt.VersionVector.from_dict(
        {a: (4 if a == authors[0] else 3) for a in authors}
    )
    # authors[0]'s records below the snapshot stay servable; the others' seq 3 was never held here
    assert replica.state.retention_floor == crdt.VersionVector.from_dict({a: 3 for a in authors[1:]})
    replica.store.close()
    assert _open_replica(tmp_path / "behind").state.state_hash == replica.state.state_hash

    lossy = _open_replica(tmp_path / "lossy")
    for c in mine:
        lossy.accept(c)
    lossy.note_vector("peerA", lossy.state.version_vector)
    lossy.snapshot_and_compact()  # forgets everything: now authors[0]'s seq 4 exists only in the state
    before = lossy.state.state_hash
    assert not lossy.adopt(older)  # adopting would drop authors[0]'s seq 4
    assert lossy.state.state_hash == before and lossy.snapshots_installed == 0
    lossy.store.close()
