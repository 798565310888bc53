"""Gossip with validators and peer scoring through real libp2p hosts on 127.0.0.1 (p2p/_gossip.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from types import SimpleNamespace

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX, Pubsub

from p2p import GossipMessage, Host, HostConfig, Identity, PeerLimits, _libp2p
from p2p._gossip import GossipValidators
from p2p._libp2p import _stock_handle_dead_peer
from p2p._security import PeerGate

pytestmark = pytest.mark.timeout(90)

TOPIC = "meshtrain/test/announce"


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def hosts(n: int) -> AsyncIterator[list[Host]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Host(Identity.generate())) for _ in range(n)]


async def mesh_ready(publisher: Host, queues: dict[str, asyncio.Queue[GossipMessage]]) -> None:
    """Publish probes until every queue has one (the mesh is grafted on a 1 s heartbeat), then drain."""
    async with asyncio.timeout(15):
        while not all(q.qsize() for q in queues.values()):
            await publisher.publish(TOPIC, b"ann:probe")
            await asyncio.sleep(0.2)
    for q in queues.values():
        while not q.empty():
            q.get_nowait()


def announcement_schema(from_peer: str, data: bytes) -> bool:
    """What the daemon's validator does, in miniature: a prefix and a size bound."""
    return data.startswith(b"ann:") and len(data) <= 256


async def test_burst_from_three_publishers_reaches_every_subscriber() -> None:
    async with hosts(4) as hs:
        for h in hs:
            h.set_topic_validator(TOPIC, announcement_schema)
        queues = {h.peer_id: h.subscribe(TOPIC) for h in hs}
        for a, b in itertools.combinations(hs, 2):
            await a.connect(b.listen_addrs()[0])
        await wait_for(lambda: all(len(h.gossip_peers(TOPIC)) == 3 for h in hs))
        for p in hs[:3]:
            await mesh_ready(p, {k: q for k, q in queues.items() if k != p.peer_id})

        rate_per_s, seconds = 20, 3  # the daemon announces far less; 3 x 20/s is a generous burst

        async def publish(h: Host) -> None:
            for i in range(rate_per_s * seconds):
                await h.publish(TOPIC, f"ann:{h.peer_id[-6:]}:{i}".encode())
                await asyncio.sleep(1 / rate_per_s)

        await asyncio.gather(*(publish(h) for h in hs[:3]))
        expected = {f"ann:{h.peer_id[-6:]}:{i}".encode() for h in hs[:3] for i in range(rate_per_s * seconds)}
        for h in hs:
            want = {m for m in expected if not m.startswith(f"ann:{h.peer_id[-6:]}:".encode())}
            got: set[bytes] = set()
            async with asyncio.timeout(30):
                while not want <= got:
                    got.add((await queues[h.peer_id].get()).data)
            assert got == want  # every message, nothing else (no duplicates would show as extra items)
            stats = h.stats()
            assert stats["gossip_dropped_queue_full"] == 0 and stats["gossip_rejected_invalid"] == 0


async def test_invalid_message_is_not_forwarded() -> None:
    async with hosts(3) as (a, b, c):
        for h in (b, c):  # a (the offender) validates nothing: it publishes whatever it likes
            h.set_topic_validator(TOPIC, announcement_schema)
        queues = {h.peer_id: h.subscribe(TOPIC) for h in (a, b, c)}
        await b.connect(a.listen_addrs()[0])
        await c.connect(b.listen_addrs()[0])  # a and c are not connected: only b can forward
        await wait_for(lambda: {a.peer_id, c.peer_id} <= set(b.gossip_peers(TOPIC)))
        await mesh_ready(a, {b.peer_id: queues[b.peer_id], c.peer_id: queues[c.peer_id]})
        await a.publish(TOPIC, b"evil: not an announcement")
        await wait_for(lambda: b.stats()["gossip_rejected_invalid"] == 1)
        await a.publish(TOPIC, b"ann:after")  # a is penalised (P4) but still above the publish threshold
        seen: list[bytes] = []
        async with asyncio.timeout(15):
            while b"ann:after" not in seen:
                seen.append((await queues[c.peer_id].get()).data)
        assert all(m.startswith(b"ann:") for m in seen)
        assert c.stats()["gossip_rejected_invalid"] == 0  # it never even reached c
        assert all(m.data.startswith(b"ann:") for m in _drain(queues[b.peer_id]))


def _drain(q: asyncio.Queue[GossipMessage]) -> list[GossipMessage]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def _pair(a: Host, b: Host) -> tuple[asyncio.Queue[GossipMessage], asyncio.Queue[GossipMessage]]:
    qa, qb = a.subscribe(TOPIC), b.subscribe(TOPIC)
    await b.connect(a.listen_addrs()[0])
    await wait_for(lambda: a.peer_id in b.gossip_peers(TOPIC) and b.peer_id in a.gossip_peers(TOPIC))
    await mesh_ready(a, {b.peer_id: qb})
    return qa, qb


async def test_validator_exception_rejects() -> None:
    async with hosts(2) as (a, b):
        _, qb = await _pair(a, b)

        def buggy(from_peer: str, data: bytes) -> bool:
            if data == b"ann:boom":
                raise RuntimeError("daemon validator bug")
            return True

        b.set_topic_validator(TOPIC, buggy)
        await a.publish(TOPIC, b"ann:boom")
        await wait_for(lambda: b.stats()["gossip_validator_errors"] == 1)
        await a.publish(TOPIC, b"ann:fine")
        assert (await asyncio.wait_for(qb.get(), 10)).data == b"ann:fine"  # b survived
        assert b.stats()["gossip_rejected_invalid"] == 1


async def test_libp2p_raising_validator_kills_the_host() -> None:
    """Documents the py-libp2p 0.8.1 bug p2p/_gossip.py works around (if this fails, libp2p fixed it)."""
    async with hosts(2) as (a, b):
        await _pair(a, b)

        def boom(forwarder: object, msg: object) -> bool:
            raise RuntimeError("raw libp2p validator")

        pubsub = b._node._pubsub
        assert pubsub is not None and pubsub.strict_signing  # and strict signing is on
        b._bridge.call_soon_in_trio(pubsub.set_topic_validator, TOPIC, boom, False)
        await wait_for(lambda: TOPIC in pubsub.topic_validators)
        await a.publish(TOPIC, b"ann:x")
        await wait_for(lambda: not b._bridge.is_open, timeout_s=10)  # b's whole libp2p stack went down


# ---------------------------------------------------------------------------------------------- stream loss


async def _reset_pubsub_stream(src: Host, dst: Host) -> None:
    """Reset ``src``'s outbound pubsub stream to ``dst``; the connection between them stays up."""

    async def reset() -> None:
        pubsub = src._node._pubsub
        assert pubsub is not None
        await pubsub.peers[ID.from_base58(dst.peer_id)].reset()

    await src._bridge.run(reset)


async def _flows(publisher: Host, queue: asyncio.Queue[GossipMessage], tag: bytes, timeout_s: float) -> bool:
    """Publish ``tag:<n>`` until one arrives in ``queue`` (True) or ``timeout_s`` passes (False)."""
    try:
        async with asyncio.timeout(timeout_s):
            for n in itertools.count():
                await publisher.publish(TOPIC, b"%s:%d" % (tag, n))
                with contextlib.suppress(TimeoutError):
                    while True:
                        message = await asyncio.wait_for(queue.get(), 0.2)
                        if message.data.startswith(tag):
                            return True
    except TimeoutError:
        return False
    raise AssertionError("unreachable")


async def test_gossip_flows_both_ways_after_a_pubsub_stream_reset() -> None:
    """Regression for the one-way loss that p2p/_libp2p.py works around (keeping subscriptions)."""
    async with hosts(2) as (a, b):
        qa, qb = await _pair(a, b)
        await _reset_pubsub_stream(b, a)
        assert await _flows(b, qa, b"ann:b-after-reset", 15)
        assert await _flows(a, qb, b"ann:a-after-reset", 15)
        await _reset_pubsub_stream(a, b)
        assert await _flows(a, qb, b"ann:a-after-second-reset", 15)
        assert await _flows(b, qa, b"ann:b-after-second-reset", 15)
        assert a.peer_id in b.gossip_peers(TOPIC) and b.peer_id in a.gossip_peers(TOPIC)


async def test_stock_pubsub_loses_a_connected_peer_after_a_stream_reset() -> None:
    """Documents the py-libp2p 0.8.1 bug (if this fails, libp2p fixed it and the workaround can go)."""
    async with hosts(2) as (a, b):
        qa, _ = await _pair(a, b)
        pubsub = b._node._pubsub
        assert pubsub is not None
        pubsub._handle_dead_peer = functools.partial(_stock_handle_dead_peer, pubsub)  # type: ignore[method-assign]
        old = pubsub.peers[ID.from_base58(a.peer_id)]
        await _reset_pubsub_stream(b, a)
        await b.publish(TOPIC, b"ann:notices-the-reset")  # b's writer fails and reopens its stream to a
        await wait_for(lambda: pubsub.peers.get(ID.from_base58(a.peer_id)) not in (None, old))
        assert a.peer_id not in b.gossip_peers(TOPIC)  # the bug: a's subscription is forgotten...
        assert not await _flows(b, qa, b"ann:lost", 3)  # ...so b never sends a anything again


async def test_gossip_rpcs_carry_the_sender_record_only_in_the_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-libp2p 0.8.1 builds every gossip RPC with the sender's signed peer record (the first assertion
    documents it: if it fails, libp2p stopped and the workaround can go); p2p/_libp2p.py drops it from all
    but subscription changes (the hello, written directly, keeps it). Gossip still flows without it."""
    built: list[tuple[bool, bool, bool]] = []  # (subscriptions, publish, record) as libp2p built each RPC
    written: list[tuple[bool, bool, bool]] = []  # ... and as it went to the stream
    patched, stock = Pubsub.write_msg, _libp2p._stock_write_msg

    def shape(rpc: rpc_pb2.RPC) -> tuple[bool, bool, bool]:
        return bool(rpc.subscriptions), bool(rpc.publish), rpc.HasField("senderRecord")

    async def record_built(self: Pubsub, stream: object, rpc: rpc_pb2.RPC) -> bool:
        built.append(shape(rpc))
        return await patched(self, stream, rpc)

    async def record_written(self: Pubsub, stream: object, rpc: rpc_pb2.RPC) -> bool:
        written.append(shape(rpc))
        return await stock(self, stream, rpc)

    monkeypatch.setattr(Pubsub, "write_msg", record_built)
    monkeypatch.setattr(_libp2p, "_stock_write_msg", record_written)
    async with hosts(2) as (a, b):
        _, qb = await _pair(a, b)
        assert await _flows(a, qb, b"ann:without-record", 15)
        peerstore = b._node.host.get_peerstore()
        assert peerstore.get_peer_record(ID.from_base58(a.peer_id)) is not None  # from identify and the hello
    assert any(publish and record for _, publish, record in built)  # the library's habit
    assert not any(record for subscriptions, _, record in written if not subscriptions)
    assert sum(publish for _, publish, _ in written) >= 2


# ---------------------------------------------------------------------------------------------- admission


class _Scorer:
    def __init__(self) -> None:
        self.invalid: list[tuple[ID, str]] = []

    def on_invalid_message(self, peer: ID, topic: str) -> None:
        self.invalid.append((peer, topic))


class _FakePubsub:
    """What GossipValidators.attach touches on libp2p's Pubsub; ``push_msg`` is what forwards."""

    def __init__(self, me: ID) -> None:
        self.my_id = me
        self.strict_signing = True
        self.seen: set[bytes] = set()
        self.router = SimpleNamespace(scorer=_Scorer())
        self.pushed: list[bytes] = []

    def _is_msg_seen(self, msg: rpc_pb2.Message) -> bool:
        return msg.seqno in self.seen

    async def push_msg(self, forwarder: ID, msg: rpc_pb2.Message) -> None:
        self.pushed.append(msg.data)


def _signed(key_pair: KeyPair, data: bytes, seqno: int) -> rpc_pb2.Message:
    msg = rpc_pb2.Message(
        from_id=ID.from_pubkey(key_pair.public_key).to_bytes(),
        data=data,
        seqno=seqno.to_bytes(8, "big"),
        topicIDs=[TOPIC],
    )
    msg.signature = key_pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = key_pair.public_key.serialize()
    return msg


def test_admission_refuses_before_libp2p_verifies_or_forwards() -> None:
    member, outsider, stranger = (create_new_key_pair() for _ in range(3))
    forwarder = ID.from_pubkey(create_new_key_pair().public_key)
    ids = {
        name: ID.from_pubkey(kp.public_key).to_base58()
        for name, kp in (("member", member), ("outsider", outsider), ("stranger", stranger))
    }
    gate = PeerGate(
        allow_peers=frozenset({ids["member"], ids["stranger"]}), limits=PeerLimits(gossip_burst=2)
    )
    gate.gossip_admission = lambda peer: peer != ids["stranger"]  # open-run hook: not in our run
    pubsub = _FakePubsub(ID.from_pubkey(create_new_key_pair().public_key))
    GossipValidators(gate).attach(pubsub)  # type: ignore[arg-type]
    scorer = pubsub.router.scorer

    def push(msg: rpc_pb2.Message, via: ID = forwarder) -> None:
        trio.run(pubsub.push_msg, via, msg)

    push(_signed(outsider, b"off the allowlist", 1))
    assert pubsub.pushed == [] and scorer.invalid == [(forwarder, TOPIC)]  # its forwarder is charged
    push(_signed(stranger, b"not in our run", 2))
    assert pubsub.pushed == [] and len(scorer.invalid) == 1  # refused, nobody charged
    forged = _signed(member, b"forged", 3)
    forged.data = b"tampered"
    push(forged)
    assert pubsub.pushed == []  # bad signature: refused before it could spend the member's budget
    push(_signed(member, b"one", 4))
    seen = _signed(member, b"seen", 5)
    pubsub.seen.add(seen.seqno)
    push(seen)  # a duplicate spends nothing either
    push(_signed(member, b"two", 6))
    push(_signed(member, b"three", 7))  # burst of 2 spent: dropped, uncharged
    assert pubsub.pushed == [b"one", b"two"] and len(scorer.invalid) == 1
    push(_signed(member, b"own", 8), via=pubsub.my_id)  # our own publish is never refused here
    assert pubsub.pushed[-1] == b"own"
    stats = gate.stats()
    assert stats["dropped_gossip_not_member"] == 1 and stats["dropped_gossip_not_admitted"] == 1
    assert stats["dropped_gossip_rate"] == 1


async def test_unadmitted_author_is_not_forwarded() -> None:
    async with hosts(3) as (a, b, c):
        queues = {h.peer_id: h.subscribe(TOPIC) for h in (a, b, c)}
        await b.connect(a.listen_addrs()[0])
        await c.connect(b.listen_addrs()[0])  # a and c are not connected: only b can forward
        await wait_for(lambda: {a.peer_id, c.peer_id} <= set(b.gossip_peers(TOPIC)))
        await mesh_ready(a, {b.peer_id: queues[b.peer_id], c.peer_id: queues[c.peer_id]})
        b.set_gossip_admission(lambda peer: peer != a.peer_id)
        await a.publish(TOPIC, b"ann:refused")
        await wait_for(lambda: b.stats()["gate"]["dropped_gossip_not_admitted"] == 1)
        await b.publish(TOPIC, b"ann:marker")  # b -> c after b dropped a's message
        assert (await asyncio.wait_for(queues[c.peer_id].get(), 10)).data == b"ann:marker"
        assert queues[c.peer_id].empty() and queues[b.peer_id].empty()  # neither delivered nor forwarded
        scorer = b._node._pubsub.router.scorer  # type: ignore[union-attr]
        assert sum(scorer.invalid_messages[ID.from_base58(a.peer_id)].values()) == 0  # a not charged
        b.set_gossip_admission(None)
        await a.publish(TOPIC, b"ann:admitted")
        assert (await asyncio.wait_for(queues[c.peer_id].get(), 10)).data == b"ann:admitted"


async def test_non_allowlisted_author_is_not_forwarded() -> None:
    outsider, member, gatekeeper, inner = (Identity.generate() for _ in range(4))
    allow = frozenset({member.peer_id, gatekeeper.peer_id, inner.peer_id})  # not the outsider
    async with AsyncExitStack() as stack:
        o = await stack.enter_async_context(Host(outsider))
        m = await stack.enter_async_context(Host(member))
        g = await stack.enter_async_context(Host(gatekeeper, config=HostConfig(allow_peers=allow)))
        i = await stack.enter_async_context(Host(inner))  # open: it would deliver whatever g forwards
        queues = {h.peer_id: h.subscribe(TOPIC) for h in (o, m, g, i)}
        await o.connect(m.listen_addrs()[0])  # outsider - member - gatekeeper - inner
        await m.connect(g.listen_addrs()[0])
        await i.connect(g.listen_addrs()[0])
        await wait_for(lambda: {m.peer_id, i.peer_id} <= set(g.gossip_peers(TOPIC)))
        await mesh_ready(m, {g.peer_id: queues[g.peer_id], i.peer_id: queues[i.peer_id]})
        await o.publish(TOPIC, b"ann:outsider")
        await wait_for(lambda: g.stats()["gate"]["dropped_gossip_not_member"] == 1)
        await g.publish(TOPIC, b"ann:marker")
        assert (await asyncio.wait_for(queues[i.peer_id].get(), 10)).data == b"ann:marker"
        assert queues[i.peer_id].empty() and queues[g.peer_id].empty()
        scorer = g._node._pubsub.router.scorer  # type: ignore[union-attr]
        assert sum(scorer.invalid_messages[ID.from_base58(m.peer_id)].values()) == 1  # m forwarded it
