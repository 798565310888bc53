"""daemon.node.offers: the genesis and snapshots offered by request and moved as blobs, over the in-memory
host (whose blob fetch checks and blames like the real one). Joiners finish from the honest peers when
others stall, send bad chunks, or offer one genesis and serve another; snapshots are served from hard
links that outlive compaction; downloads resume from their part files."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_testlib import (
    HIST,
    SIGNER,
    FakeNet,
    G,
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
        join = node_config(node={"bootstrap": [f.host.addr], "rebuild_genesis": False},
                           training={"enabled": False})
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
        pinned = {"bootstrap": [f.host.addr], "genesis": honest.id, "rebuild_genesis": False}
        join = node_config(node=pinned, training={"enabled": False})
        async with running_node(joiner, net, join) as j:
            await until(lambda: liar.peer_id in j.status().join.refused)
            assert "served genesis" in j.status().join.refused[liar.peer_id]
            net.link(f.host.peer_id, j.host.peer_id)
            await until(lambda: j.status().genesis == honest.id)
            assert j.status().counters.rejected_reasons == {"GenesisRefused": 1}


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
