"""daemon.node.offers: the genesis and snapshots offered by request and moved as blobs, over the in-memory
host (whose blob fetch checks and blames like the real one). Joiners finish from the honest peers when
others stall, send bad chunks, or offer one genesis and serve another; snapshots are served from hard
links that outlive compaction; downloads resume from their part files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from node_testlib import (
    HIST,
    SIGNER,
    FakeNet,
    G,
    attested,
    host_for,
    node_config,
    running_node,
    signer,
    until,
)

import crdt
from daemon.node import offers, wire
from daemon.node.attestation import Attestations
from daemon.node.store import Store
from daemon.status import JoinStatus


def founder_config() -> object:
    return node_config(training={"max_rounds": 4}, sync={"snapshot_every": 2})


async def test_a_joiner_drops_a_peer_that_sends_bad_chunks_and_one_that_stalls(tmp_path: Path) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    async with running_node(founder, net, node_config()) as f:
        # Named to be asked first (peers are asked in order): the download must get past both.
        corrupt, stalled = net.add("12D3KooW11corrupt"), net.add("12D3KooW11stalled")
        for bad, fault in ((corrupt, "corrupt"), (stalled, "stall")):  # offer and serve the founder's file
            bad.handlers[wire.GENESIS_PROTOCOL] = f.host.handlers[wire.GENESIS_PROTOCOL]
            bad.blobs = f.host.blobs
            bad.blob_fault = fault
            net.link(bad.peer_id, host_for(joiner, net).peer_id)
        net.link(f.host.peer_id, host_for(joiner, net).peer_id)
        join = node_config(node={"bootstrap": [f.host.addr]}, training={"enabled": False})
        async with running_node(joiner, net, join) as j:
            await until(lambda: j.status().genesis == f.status().genesis)
            status = j.status()
            dropped = {corrupt.peer_id: "chunk 0 failed its digest", stalled.peer_id: "stalled"}
            assert status.join.dropped == dropped
            transfer = status.join.genesis_transfer
            assert transfer is not None and transfer.state == "done"
            assert transfer.bytes_done == transfer.bytes_total == f.store.genesis_file.stat().st_size
            assert status.counters.rejected == 0  # a bad chunk is dropped at once: nothing bad was adopted
        assert not list((joiner / "store" / "incoming").iterdir())  # installed, not copied


async def test_a_peer_that_serves_another_genesis_than_it_offered_is_refused(tmp_path: Path) -> None:
    net = FakeNet()
    founder, joiner = tmp_path / "f", tmp_path / "j"
    async with running_node(founder, net, node_config()) as f:
        honest = f.parts.replica.state.genesis
        other = crdt.Genesis(honest.params + 1, honest.fragments, dict(honest.meta))  # same run, new weights
        fake = tmp_path / "other.bin"
        fake.write_bytes(crdt.seal_blob(b"GENESIS", other.encode()))
        liar = net.add("12D3KooWliar")
        manifest = await liar.serve_file(b"genesis/x", fake)
        offer = wire.GenesisOffer(id=honest.id, meta=dict(honest.meta), fragments=honest.fragments,
                                  ref=wire.BlobRef(blob=b"genesis/x", root=manifest.root, size=manifest.size))

        async def lie(peer: str, data: bytes) -> bytes:
            return offer.encode()

        liar.set_request_handler(wire.GENESIS_PROTOCOL, lie)
        net.link(liar.peer_id, host_for(joiner, net).peer_id)
        pinned = {"bootstrap": [f.host.addr], "genesis": honest.id}
        join = node_config(node=pinned, training={"enabled": False})
        async with running_node(joiner, net, join) as j:
            await until(lambda: liar.peer_id in j.status().join.refused)
            assert "served genesis" in j.status().join.refused[liar.peer_id]
            net.link(f.host.peer_id, j.host.peer_id)
            await until(lambda: j.status().genesis == honest.id)
            assert j.status().counters.rejected_reasons == {"GenesisRefused": 1}


async def test_a_late_joiner_installs_a_snapshot_fetched_as_a_blob(tmp_path: Path) -> None:
    net = FakeNet()
    homes = [tmp_path / name for name in "abc"]
    a, b, c = (host_for(home, net).peer_id for home in homes)
    net.link(a, b)
    trains = founder_config()
    async with running_node(homes[0], net, trains) as first:
        join = trains.with_overrides("node", bootstrap=(first.host.addr,))
        async with running_node(homes[1], net, join) as second:
            await until(lambda: first.status().contributions == second.status().contributions == 8)
            # Compact now rather than at the next snapshot_every (there is none after the last round).
            await until(lambda: any(n.parts.replica.snapshot_and_compact() for n in (first, second)))
            compacted = min((first, second), key=lambda n: n.status().retained_contributions)
            net.link(compacted.host.peer_id, c)  # it holds no history: only its snapshot can help
            late = join.with_overrides("training", enabled=False)
            async with running_node(homes[2], net, late) as third:
                await until(lambda: third.status().state_hash == first.status().state_hash)
                status = third.status()
                assert status.counters.snapshots_installed == 1
                transfer = status.join.snapshot_transfer
                assert transfer is not None and transfer.state == "done" and transfer.bytes_done > 0
                assert compacted.status().counters.snapshots_served >= 1
            assert not [p for p in (homes[2] / "store" / "incoming").iterdir() if "snapshot" in p.name]


# -- the pieces --------------------------------------------------------------------------------------


def snapshot_file(tmp_path: Path, state: crdt.ModelState) -> Path:
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"".join(state.snapshot_parts()))
    return path


async def test_a_snapshot_comes_from_the_honest_source_and_junk_is_a_validation_error(tmp_path: Path) -> None:
    state = crdt.ModelState(G)
    for c in HIST:
        state.apply(c)
    _, checkpoints = attested(state)
    net = FakeNet()
    victim, honest, corrupt = net.add("12D3KooWvictim"), net.add("12D3KooWhonest"), net.add("12D3KooW11bad")
    for peer in (honest, corrupt):
        net.link(victim.peer_id, peer.peer_id)
    manifest = await honest.serve_file(b"snapshot/s", snapshot_file(tmp_path, state))
    corrupt.blobs, corrupt.blob_fault = honest.blobs, "corrupt"
    offer = wire.SnapshotOffer(tuple(c.encode() for c in checkpoints),
                               wire.BlobRef(blob=b"snapshot/s", root=manifest.root, size=manifest.size))
    attestations = Attestations(G, crdt.CheckpointPolicy.from_genesis(G), max_authors=64)
    fresh = crdt.ModelState(G)
    checked = offers.check_snapshot_offer(offer.encode(), fresh, attestations)
    join = JoinStatus()
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    snapshot, _ = await offers.fetch_snapshot(victim, {corrupt.peer_id: checked, honest.peer_id: checked},
                                              fresh, store_dir, join=join)
    assert snapshot.header.state_hash == state.state_hash
    assert join.dropped == {corrupt.peer_id: "chunk 0 failed its digest"}
    assert not list((store_dir / "incoming").iterdir())  # read, then removed

    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(1000))
    manifest = await honest.serve_file(b"snapshot/junk", junk)
    lie = wire.SnapshotOffer(offer.checkpoints, wire.BlobRef(b"snapshot/junk", manifest.root, manifest.size))
    with pytest.raises(crdt.ValidationError):
        checked = offers.check_snapshot_offer(lie.encode(), fresh, attestations)
        await offers.fetch_snapshot(victim, {honest.peer_id: checked}, fresh, store_dir, join=join)


def test_a_snapshot_offer_is_checked_before_a_byte_moves() -> None:
    state = crdt.ModelState(G)
    state.apply(HIST[0])
    attestations = Attestations(G, crdt.CheckpointPolicy.from_genesis(G), max_authors=64)
    ref = wire.BlobRef(blob=b"snapshot/s", root=bytes(32), size=100)
    stranger = wire.SnapshotOffer((state.checkpoint(signer(5)).encode(),), ref)
    with pytest.raises(crdt.ValidationError, match="not a checkpoint signer of this run"):
        offers.check_snapshot_offer(stranger.encode(), crdt.ModelState(G), attestations)
    huge = wire.SnapshotOffer((state.checkpoint(SIGNER).encode(),), wire.BlobRef(b"s", bytes(32), 10**12))
    with pytest.raises(wire.WireError, match="larger than any"):
        offers.check_snapshot_offer(huge.encode(), crdt.ModelState(G), attestations)


async def test_served_snapshots_outlive_compaction_and_only_two_are_kept(tmp_path: Path) -> None:
    host = FakeNet().add("12D3KooWserver")
    store = Store(tmp_path / "store")
    server = offers.SnapshotServer(host, store.path, pace=lambda n: None)
    state = crdt.ModelState(G)
    refs = []
    for c in HIST[:3]:
        state.apply(c)
        store.write_snapshot(state.snapshot_parts(), floor=crdt.VersionVector())  # replaces snapshot.bin
        refs.append(await server.offer(store.snapshot_file, state.state_hash))
        assert await server.offer(store.snapshot_file, state.state_hash) == refs[-1]  # hashed once
    assert set(host.blobs) == {refs[1].blob, refs[2].blob}  # the oldest is no longer served
    assert len(list((store.path / "served").iterdir())) == 2
    older = host.blobs[refs[1].blob]
    assert older.read_chunk(0)  # its file was replaced in the store, the link still reads it
    store.close()


def test_a_new_download_removes_the_part_file_of_another(tmp_path: Path) -> None:
    first = offers.transfer_dest(tmp_path, "snapshot", "aa")
    first.with_name(first.name + ".part").write_bytes(b"x")
    genesis = offers.transfer_dest(tmp_path, "genesis", "bb")
    genesis.with_name(genesis.name + ".part").write_bytes(b"x")
    assert offers.transfer_dest(tmp_path, "snapshot", "aa") == first
    assert first.with_name(first.name + ".part").exists()  # the same download: resumed
    offers.transfer_dest(tmp_path, "snapshot", "cc")
    assert sorted(p.name for p in (tmp_path / "incoming").iterdir()) == ["genesis-bb.part"]
