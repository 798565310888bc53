"""daemon.node.snapshot_install: a late joiner catches up through a snapshot fetched as a blob from the
peers that offer it, and junk from one of them is its fault alone."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from node_testlib import (
    HIST,
    FakeNet,
    G,
    attested,
    host_for,
    node_config,
    running_node,
    until,
)

import crdt
from daemon.node import offers, wire
from daemon.node.attestation import Attestations
from daemon.status import JoinStatus


def founder_config() -> object:
    return node_config(training={"max_rounds": 4}, sync={"snapshot_every": 2})


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
            # Compact now rather than at the next snapshot_every (there is none after the last round),
            # unless a node already did when the last checkpoint arrived (then there is nothing left to
            # drop, and waiting for a compaction that drops something would time out: a flake under load).
            async def compacted_one() -> bool:
                for n in (first, second):
                    if n.status().retained_contributions == 0 or await n.parts.replica.snapshot_and_compact():
                        return True
                return False

            async with asyncio.timeout(10):
                while not await compacted_one():
                    await asyncio.sleep(0.01)
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
