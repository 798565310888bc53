"""Security end to end with real daemon processes (SECURITY.md).

* A private run (swarm key): an outsider daemon bootstrapping from a member can neither connect nor
  fetch the genesis, so it cannot contribute; the members train and converge without it.
* A hostile peer (a p2p.Host in this process, no swarm key on an open run) feeds a real daemon garbage
  sync requests, garbage gossip, and garbage or forged sync responses; the daemon stays up, its state hash
  does not move, and status counts each rejection by reason.
* An equivocating author (two signed records for one seq, one given to each of two daemons) is named,
  its proof kept, nobody else blamed, and the resulting divergence reported by both daemons.
* A forger answers pulls with "snapshot required" and offers a snapshot it made up (parameters at 1e6, an
  honest author credited with seq 1,000,000, the matching state hash, a checkpoint under its own key):
  the daemon refuses the offer before a byte moves, keeps its model, and still accepts the honest
  author's real seq 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import tomllib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import tomli_w

import crdt
import p2p
from crdt.snapshot import combine_state_hash, encode_snapshot, fragment_digest
from daemon.cli.cluster import Cluster, converged
from daemon.home import Home
from daemon.node import wire

pytestmark = pytest.mark.timeout(300)

DEADLINE_S = 200.0


def _patch_node_config(home: str, **values: object) -> None:
    config_file = Home(Path(home)).config_file
    config = tomllib.loads(config_file.read_text())
    config["node"].update(values)
    config_file.write_text(tomli_w.dumps(config))


def test_private_run_keeps_an_outsider_out(cluster_dir: Path, tmp_path: Path) -> None:
    members = Cluster(cluster_dir)
    infos = members.create(2, task="digits", training={"max_rounds": 2, "eval_every": 2})
    key_file = tmp_path / "swarm.key"
    p2p.write_swarm_key(key_file)
    for info in infos:
        _patch_node_config(info.home, swarm_key=str(key_file))
    outsider = Cluster(cluster_dir / "outsider")  # stopped in the finally below
    (outsider_info,) = outsider.create(1, task="digits", training={"max_rounds": 2})
    _patch_node_config(outsider_info.home, bootstrap=[infos[0].addr])  # same run, knows a member's address
    try:
        for info in infos:
            members.start(info.index)
        outsider.start(0)
        statuses = members.wait_until(
            lambda s: converged(s, contributions=4), timeout_s=DEADLINE_S, what="the members to converge"
        )
        # The outsider never gets the genesis, so it never loads a model (its control API answers while it
        # waits, so "ready" is no longer the sign of having joined).
        outsider_home = Home(Path(outsider_info.home))
        assert Cluster._running_pid(outsider_home) is not None, "the outsider daemon should still be trying"
        outsider_log = (outsider_home.path / "daemon.log").read_text()
        joined = "fetched genesis" in outsider_log or "model state loaded" in outsider_log
        assert not joined, outsider_log[-3000:]
        (outside,) = outsider.status()
        assert "error" in outside or outside["genesis"] is None, outside
        for status in statuses:
            assert outsider_info.peer_id not in status["peers"]
            assert outsider_info.peer_id not in status["version_vector"]
            assert set(status["version_vector"]) == {i.peer_id for i in infos}
    finally:
        outsider.down()


class Hostile:
    """Serves /meshtrain/sync/1 with a scripted list of bad responses, one per request."""

    def __init__(self, responses: list[bytes]) -> None:
        self.responses = list(responses)
        self.served = 0

    async def serve(self, peer: str, data: bytes) -> bytes:
        self.served += 1
        return self.responses.pop(0) if self.responses else b"\xc1"


def _response(*contributions: bytes, digest: bytes | None = None) -> bytes:
    empty = crdt.Digest(crdt.VersionVector.from_dict({}), "00" * 32, 0).encode()
    return wire.SyncResponse(digest=digest or empty, contributions=contributions).encode()


async def fetch_genesis(host: p2p.Host, peer: str, run: str) -> crdt.Genesis:
    """What a joiner does: ask for the offer, fetch the genesis file as a blob (anyone may)."""
    offer = wire.GenesisOffer.decode(
        await host.request(peer, wire.GENESIS_PROTOCOL, wire.GenesisRequest(run).encode(), timeout_s=30)
    )
    data = await host.fetch_blob(offer.ref.blob, peers=[peer], root=offer.ref.root, size=offer.ref.size)
    return crdt.Genesis.decode(crdt.unseal_blob(b"GENESIS", bytes(data)))


async def _attack(addr: str, genesis_run: str, statuses: callable) -> dict:  # type: ignore[valid-type]
    attacker = crdt.Signer.from_seed(os.urandom(32))
    identity = p2p.Identity.generate()
    async with p2p.Host(identity) as host:
        victim = await host.connect(addr)
        genesis = await fetch_genesis(host, victim, genesis_run)
        length = genesis.fragment_length(0)
        good_payload = crdt.encode_payload("dense-f32", length, None, np.full(length, 1e-3, np.float32))

        def signed(
            seq: int, *, fragment: int = 0, payload: bytes = good_payload, weight: float = 1.0
        ) -> bytes:
            return crdt.make_contribution(
                attacker,
                genesis_id=genesis.id,
                seq=seq,
                fragment=fragment,
                codec="dense-f32",
                payload=payload,
                weight=weight,
                base_version=b"\x00" * 32,
            ).encode()

        forged = crdt.Contribution.decode(signed(1))
        bad_signature = dataclasses.replace(forged, signature=b"\x01" * 64)
        one, nan = np.float32(1e-3).tobytes(), np.float32(np.nan).tobytes()
        nan_payload = good_payload.replace(one, nan)  # the encoder refuses NaN; a hostile peer does not
        script = [
            b"\x00garbage",  # not msgpack
            msgpack.packb({"v": 1, "digest": b"x", "contributions": [b"y"], "snapshot_required": False}),
            _response(b"\x93\x01\x02\x03"),  # a contribution that is not one
            _response(bad_signature.encode()),  # forged: signature does not verify
            _response(signed(10**9)),  # valid signature, enormous sequence gap
            _response(signed(1, fragment=10**6)),  # fragment not in this genesis
            _response(signed(1, payload=nan_payload)),  # NaN values
            _response(signed(1, weight=1e6)),  # norm far above the bound
        ]
        hostile = Hostile(script)
        host.set_request_handler(wire.SYNC_PROTOCOL, hostile.serve)
        topic = wire.announce_topic(genesis_run)
        host.subscribe(topic)
        deadline = time.monotonic() + 30
        while victim not in host.gossip_peers(topic) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Garbage requests straight at the daemon's handlers.
        for junk in (b"", b"\xc1", msgpack.packb({"v": 1, "genesis": 5, "digest": "x"}), os.urandom(300)):
            with pytest.raises(p2p.RemoteError):
                await host.request(victim, wire.SYNC_PROTOCOL, junk, timeout_s=10)
        await host.publish(topic, b"not an announcement")
        # A goodbye from a peer that never sent a heartbeat changes nothing; a malformed one is refused.
        leaving = wire.Heartbeat(
            round=0, contributions=0, training="leaving", reachability="unknown", task="digits", device="cpu",
            throughput_bps=0,
        )
        assert await host.request(victim, wire.GOODBYE_PROTOCOL, leaving.encode(), timeout_s=10) == b""
        with pytest.raises(p2p.RemoteError):
            await host.request(victim, wire.GOODBYE_PROTOCOL, b"\xc1", timeout_s=10)
        # Each announcement of an unknown (author, seq) makes the daemon pull from us: one script entry each.
        for seq in range(1, len(script) + 1):
            announcement = wire.Announcement(author=attacker.public_key, seq=seq, fragment=0, size=1, id="x")
            await host.publish(topic, announcement.encode())
            deadline = time.monotonic() + 20
            while hostile.served < seq and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # let the last pull's rejection be counted (checked by polling below)
        return {"served": hostile.served, "script": len(script), "peer_id": host.peer_id}


def test_hostile_peer_cannot_corrupt_a_daemon(cluster_dir: Path) -> None:
    group = Cluster(cluster_dir)
    # The attacker is no member, so its announcements are dropped: the daemon pulls from it on its
    # anti-entropy period, shortened here (the default 30 s would make each of the script's steps wait).
    (info,) = group.up(1, task="digits", training={"enabled": False}, sync={"interval_s": 1.0})
    before = group.wait_until(
        lambda s: s[0].get("state_hash") is not None, timeout_s=120, what="the daemon to load its state"
    )[0]
    result = asyncio.run(_attack(info.addr, "cluster", group.status))
    assert result["served"] >= result["script"], result
    after = group.wait_until(
        lambda s: s[0]["counters"]["rejected"] >= 12, timeout_s=30, what="every rejection to be counted"
    )[0]
    reasons = after["counters"]["rejected_reasons"]
    assert after["state_hash"] == before["state_hash"] and after["contributions"] == 0
    assert after["pid"] == before["pid"]  # still the same, running daemon
    assert result["peer_id"] not in after["peer_info"]  # its goodbye was not taken for a member's
    assert reasons.get("WireError", 0) >= 6, reasons  # 5 junk requests + junk gossip (+ junk responses)
    for reason in ("SignatureError", "GapTooLargeError", "GenesisMismatchError"):
        assert reasons.get(reason, 0) >= 1, reasons
    assert reasons.get("ValidationError", 0) >= 3, reasons  # not msgpack contribution, NaN, norm


class Equivocator:
    """Serves /meshtrain/sync/1 with the current phase's response for the requesting peer (empty if none).

    The same answer every time within a phase, so the daemons' periodic pulls cannot run the script
    ahead of the test (a repeated record is a duplicate, a repeated conflict is noted once)."""

    def __init__(self, responses: dict[tuple[int, str], bytes]) -> None:
        self.responses = responses
        self.phase = 1

    async def serve(self, peer: str, data: bytes) -> bytes:
        return self.responses.get((self.phase, peer), _response())


def test_an_equivocating_author_is_named_and_its_proof_kept(cluster_dir: Path) -> None:
    """The attacker signs two different records for its seq 1 and gives one to each of two partitioned
    daemons. Healed, they hold equal vectors but different states: both report it (anti-entropy cannot
    repair it). When node 0 is then offered the other version, it keeps a proof, names the author (not
    the peer that relayed it) and goes on with the rest of the batch; the name survives a restart."""
    group = Cluster(cluster_dir)
    infos = group.up(2, task="digits", training={"enabled": False}, sync={"interval_s": 1.0})
    group.partition([[0], [1]])
    attacker = crdt.Signer.from_seed(os.urandom(32))
    author = p2p.peer_id_from_public_key(attacker.public_key)

    def holding(count: int) -> list[dict]:
        return group.wait_until(
            lambda s: all(x["contributions"] == count for x in s), timeout_s=60, what=f"{count} each"
        )

    async def attack() -> None:
        async with p2p.Host(p2p.Identity.generate()) as host:
            for info in infos:
                await host.connect(info.addr)
            genesis = await fetch_genesis(host, infos[0].peer_id, "cluster")
            length = genesis.fragment_length(0)

            def record(seq: int, value: float) -> bytes:
                payload = crdt.encode_payload("dense-f32", length, None, np.full(length, value, np.float32))
                return crdt.make_contribution(
                    attacker, genesis_id=genesis.id, seq=seq, fragment=0, codec="dense-f32",
                    payload=payload, weight=1.0, base_version=b"\x00" * 32,
                ).encode()

            one, other, two = record(1, 1e-3), record(1, -1e-3), record(2, 1e-3)
            server = Equivocator({
                (1, infos[0].peer_id): _response(one),
                (1, infos[1].peer_id): _response(other),
                (2, infos[0].peer_id): _response(other, two),
            })
            host.set_request_handler(wire.SYNC_PROTOCOL, server.serve)
            topic = wire.announce_topic("cluster")
            host.subscribe(topic)
            deadline = time.monotonic() + 30
            ids = [i.peer_id for i in infos]
            while not set(ids) <= set(host.gossip_peers(topic)) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

            async def announce(seq: int) -> None:  # a daemon that lacks (author, seq) pulls from us
                message = wire.Announcement(author=attacker.public_key, seq=seq, fragment=0, size=1, id="x")
                await host.publish(topic, message.encode())

            await announce(1)
            await asyncio.to_thread(holding, 1)  # each its own version, while partitioned
            await asyncio.to_thread(group.heal)
            server.phase = 2
            await announce(2)
            await asyncio.to_thread(
                group.wait_until,
                lambda s: s[0]["counters"]["equivocations"] == 1 and all(x["contributions"] == 2 for x in s),
                timeout_s=60,
                what="node 0 to see both versions and both nodes to hold seq 2",
            )

    asyncio.run(attack())
    # (The attacker's own answers carry a made-up digest, so it may be listed as diverged too.)
    first, second = group.wait_until(
        lambda s: infos[1].peer_id in s[0]["diverged_from"] and infos[0].peer_id in s[1]["diverged_from"],
        timeout_s=60,
        what="both nodes to report the divergence",
    )
    assert first["state_hash"] != second["state_hash"]
    assert first["version_vector"] == second["version_vector"] == {author: 2}
    assert first["equivocators"] == {author: [1]} and author in first["suspects"]
    assert "ConflictError" not in first["counters"]["rejected_reasons"]
    assert infos[1].peer_id in first["peers"]  # nobody was penalized for relaying
    proofs = list((Path(infos[0].home) / "store" / "evidence").glob("*.bin"))
    assert [p.name for p in proofs] == [f"{attacker.public_key.hex()}.bin"]  # one proof per author
    group.stop(0)
    group.start(0)
    restarted = group.wait_until(
        lambda s: "error" not in s[0] and s[0].get("state_hash") is not None, timeout_s=120, what="restart"
    )[0]
    assert restarted["equivocators"] == {author: [1]} and restarted["state_hash"] == first["state_hash"]


class Forger:
    """Answers /meshtrain/sync/1 with a made-up digest and ``snapshot_required`` (until it turns honest
    relay: then with the records it was given), and /meshtrain/snapshot/2 with its forged offer."""

    def __init__(self, digest: bytes, offer: bytes) -> None:
        self.digest, self.offer = digest, offer
        self.relay: tuple[bytes, ...] = ()
        self.offers_served = 0

    async def sync(self, peer: str, data: bytes) -> bytes:
        if self.relay:
            return _response(*self.relay)
        return wire.SyncResponse(digest=self.digest, contributions=(), snapshot_required=True).encode()

    async def snapshot(self, peer: str, data: bytes) -> bytes:
        self.offers_served += 1
        return self.offer


def test_a_forged_snapshot_is_refused_over_the_wire(cluster_dir: Path, tmp_path: Path) -> None:
    group = Cluster(cluster_dir)
    (info,) = group.up(1, task="digits", training={"enabled": False}, sync={"interval_s": 1.0})
    before = group.wait_until(
        lambda s: s[0].get("state_hash") is not None, timeout_s=120, what="the daemon to load its state"
    )[0]
    forger_key, honest = crdt.Signer.from_seed(os.urandom(32)), crdt.Signer.from_seed(os.urandom(32))

    async def attack() -> int:
        async with p2p.Host(p2p.Identity.generate()) as host:
            victim = await host.connect(info.addr)
            genesis = await fetch_genesis(host, victim, "cluster")
            # The state it wants every replica to hold: parameters moved to 1e6, the honest author's slots
            # taken up to 1,000,000 (so its real records would be refused as duplicates), hash matching.
            acc = np.full(genesis.length, round(1e6 / crdt.QUANTUM), np.int64)
            vector = crdt.VersionVector.from_dict({honest.public_key: 10**6})
            hashes = [fragment_digest(acc[a:b]) for a, b in genesis.fragments]
            state_hash = combine_state_hash(genesis.id, vector, hashes)
            header = crdt.SnapshotHeader(genesis.id, vector, state_hash, True)
            snapshot_file = tmp_path / "forged.snapshot"
            snapshot_file.write_bytes(b"".join(encode_snapshot(genesis, header, acc)))
            manifest = await host.serve_file(b"snapshot/forged", snapshot_file)
            checkpoint = crdt.make_checkpoint(forger_key, genesis_id=genesis.id, version_vector=vector,
                                              state_hash=state_hash)
            offer = wire.SnapshotOffer(
                checkpoints=(checkpoint.encode(),),
                ref=wire.BlobRef(blob=b"snapshot/forged", root=manifest.root, size=manifest.size),
            )
            forger = Forger(crdt.Digest(vector, state_hash, 10**6).encode(), offer.encode())
            host.set_request_handler(wire.SYNC_PROTOCOL, forger.sync)
            host.set_request_handler(wire.SNAPSHOT_PROTOCOL, forger.snapshot)
            await asyncio.to_thread(
                group.wait_until,
                lambda s: s[0]["counters"]["rejected_reasons"].get("ValidationError", 0) >= 2,
                timeout_s=60,
                what="the forged offer to be refused twice (its signer is no checkpoint signer)",
            )
            # The honest author's real first record, relayed by anyone, is still accepted.
            length = genesis.fragment_length(0)
            payload = crdt.encode_payload("dense-f32", length, None, np.full(length, 1e-3, np.float32))
            forger.relay = (crdt.make_contribution(
                honest, genesis_id=genesis.id, seq=1, fragment=0, codec="dense-f32", payload=payload,
                weight=1.0, base_version=b"\x00" * 32,
            ).encode(),)
            await asyncio.to_thread(
                group.wait_until, lambda s: s[0]["contributions"] == 1, timeout_s=60,
                what="the honest record to be accepted",
            )
            return forger.offers_served

    offers_served = asyncio.run(attack())
    (after,) = group.status()
    honest_id = p2p.peer_id_from_public_key(honest.public_key)
    assert offers_served >= 2
    assert after["version_vector"] == {honest_id: 1}, after["version_vector"]
    assert after["state_hash"] != before["state_hash"] and after["pid"] == before["pid"]
    assert after["join"]["snapshot_transfer"] is None  # refused on the offer: not a byte was fetched


def test_a_burst_of_records_is_paced_by_the_influence_window(cluster_dir: Path) -> None:
    """The issue's attack on a run founded with an influence window: one author hands a real daemon 100
    signed records at once, each claiming as much progress of others as it may. Only the first applies
    (no other author has contributed: the rest wait in the bounded buffer), so the model moved by one
    clip, not 100; the daemon reports the window from its genesis."""
    group = Cluster(cluster_dir)
    (info,) = group.create(1, task="digits", training={"enabled": False}, sync={"interval_s": 1.0})
    _patch_node_config(info.home, clip_norm=0.3, influence_window=1)
    group.start(0)
    before = group.wait_until(
        lambda s: s[0].get("state_hash") is not None, timeout_s=120, what="the daemon to load its state"
    )[0]
    assert before["influence_window"] == 1 and before["clip_norm"] == 0.3
    attacker = crdt.Signer.from_seed(os.urandom(32))

    async def attack() -> None:
        async with p2p.Host(p2p.Identity.generate()) as host:
            victim = await host.connect(info.addr)
            genesis = await fetch_genesis(host, victim, "cluster")
            length = genesis.fragment_length(0)
            payload = crdt.encode_payload("dense-f32", length, None, np.full(length, 1.0, np.float32))
            burst = tuple(crdt.make_contribution(
                attacker, genesis_id=genesis.id, seq=seq, fragment=0, codec="dense-f32", payload=payload,
                weight=1.0, base_version=b"\x00" * 32, base_count=seq - 1,
            ).encode() for seq in range(1, 101))
            server = Equivocator({(1, victim): _response(*burst)})  # the same answer to every pull
            host.set_request_handler(wire.SYNC_PROTOCOL, server.serve)
            await asyncio.to_thread(
                group.wait_until, lambda s: s[0]["contributions"] >= 1, timeout_s=60, what="a first pull",
            )

    asyncio.run(attack())
    (after,) = group.status()
    author = p2p.peer_id_from_public_key(attacker.public_key)
    assert after["version_vector"] == {author: 1}, after["version_vector"]  # 99 wait for others' progress
    assert after["pid"] == before["pid"]
