"""NAT traversal on loopback (no namespaces): p2p/_nat.py, p2p/_autonat.py, p2p/_relay.py.

The py-libp2p 0.8.1 bugs those modules (and p2p/_discovery.py) work around: each test shows the stock
behaviour (the bug) next to our workaround, so that an upgrade that fixes the bug makes the "bug" half fail:
then the workaround can go. The comments are drafts for upstream reports. Then our own mechanics: AutoNAT's
rate limits, the relay service's "auto" mode and its limits. The real-NAT tests are
tests/p2p/test_nat_netns.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.tools.anyio_service import background_trio_service

import p2p._libp2p
from p2p._autonat import AutoNAT, conn_kind
from p2p._discovery import run_key
from p2p._identity import Identity
from p2p._libp2p import _stock_psk_transport_addresses, build_host
from p2p._nat import NatConfig, NatService

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def _hosts(n: int, *, swarm_key: bytes | None = None) -> AsyncIterator[list[IHost]]:
    async with AsyncExitStack() as stack:
        hosts = []
        for _ in range(n):
            addrs = [multiaddr.Multiaddr(LOOPBACK)]
            host = build_host(Identity.generate(), addrs, swarm_key=swarm_key)
            await stack.enter_async_context(host.run(addrs))
            hosts.append(host)
        yield hosts


async def _connect(a: IHost, b: IHost) -> None:
    await a.connect(PeerInfo(b.get_id(), b.get_addrs()))


def _closed_port_addr() -> bytes:
    """An address on 127.0.0.1 where nobody listens: a dial-back to it must fail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}").to_bytes()


def info_id(identity: Identity) -> ID:
    return ID.from_base58(identity.peer_id)


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def test_stock_autonat_server_says_reachable_for_an_undialable_connected_peer() -> None:
    # Upstream report draft: "AutoNAT v1 server: dial-back uses host.connect(), which returns the existing
    # connection (the requester is always connected: it opened the stream), so every DIAL request gets OK,
    # even for addresses nobody listens on; NATed nodes are told they are public. Dial-backs must use a
    # fresh connection (go-libp2p uses a separate dialer host)."
    async def main() -> None:
        async with _hosts(2) as (server, client):
            await _connect(client, server)
            asker = AutoNAT(client, confirmations=1)
            undialable = [_closed_port_addr()]

            AutoNATService(server)  # stock server: registers its handler
            assert await asker.query(server.get_id(), undialable) is True  # the bug: "reachable"

            ours = AutoNAT(server, confirmations=1)
            server.set_stream_handler(AUTONAT_PROTOCOL_ID, ours.serve)
            assert await asker.query(server.get_id(), undialable) is False  # fresh dial-back: not reachable

    _run(main)


def test_swarm_refuses_to_dial_p2p_circuit_addrs() -> None:
    # Upstream report draft: "Swarm.dial_peer drops every /p2p-circuit address ('no relay transport') even
    # when CircuitV2Transport is set up, so host.connect() to a peer known only by its relayed address fails.
    # Expected: the swarm hands /p2p-circuit addrs to the circuit transport." Workaround:
    # NatService.dial_relayed (exercised through a real relay by tests/p2p/test_nat_netns.py).
    async def main() -> None:
        async with _hosts(2) as (relay, dialer):
            target = Identity.generate()
            circuit = multiaddr.Multiaddr(f"{relay.get_addrs()[0]}/p2p-circuit/p2p/{target.peer_id}")
            with pytest.raises(Exception) as info:  # the swarm raises a generic SwarmException
                with trio.fail_after(10):
                    await dialer.connect(PeerInfo(info_id(target), [circuit]))
            assert "circuit" in str(info.value).lower() or "address" in str(info.value).lower()

    _run(main)


def test_get_addrs_mangles_circuit_addrs_from_addrs_factory() -> None:
    # Upstream report draft: "BasicHost.get_addrs strips 'any existing /p2p/ component' from the
    # addrs_factory's output with decapsulate(/p2p/<first p2p value>), which cuts a relayed address
    # /ip4/R/tcp/P/p2p/<relay>/p2p-circuit down to /ip4/R/tcp/P and then appends /p2p/<me>: identify and DHT
    # provider records advertise the relay's socket under our peer id, and no circuit at all."
    async def main() -> None:
        async with _hosts(2) as (host, relay):
            relay_circuit = f"{relay.get_addrs()[0]}/p2p-circuit"
            relay_socket = str(relay.get_addrs()[0]).split("/p2p/")[0]
            me = host.get_id().to_base58()

            host._addrs_factory = lambda c: [*c, multiaddr.Multiaddr(relay_circuit)]  # type: ignore[attr-defined]
            stock = [str(a) for a in host.get_addrs()]
            assert not any("/p2p-circuit" in a for a in stock)  # the bug: the circuit is gone...
            assert f"{relay_socket}/p2p/{me}" in stock  # ...and the relay's socket is advertised as ours
            host._addrs_factory = None  # type: ignore[attr-defined]

            nat = NatService(host, NatConfig(use_relays=True))
            nat._install_addrs_factory()
            nat.relay_addrs = [relay_circuit]
            assert f"{relay_circuit}/p2p/{me}" in [str(a) for a in host.get_addrs()]

    _run(main)


def test_find_providers_never_asks_the_network_once_we_provide() -> None:
    # Upstream report draft: "ProviderStore.find_providers returns the local provider store when it is
    # non-empty, and provide() always adds our own record there first: after one provide() a node never
    # queries the network again and only ever finds itself (and peers that managed to ADD_PROVIDER to it).
    # Expected: merge local records with a network lookup." Workaround: p2p/_discovery.py asks every
    # connected peer with GET_PROVIDERS.
    async def main() -> None:
        async with _hosts(2) as (x, y):
            key = run_key("bug")
            raw = bytes.fromhex(key)
            other = Identity.generate()
            dht_x, dht_y = KadDHT(x, DHTMode.SERVER), KadDHT(y, DHTMode.SERVER)
            async with background_trio_service(dht_x), background_trio_service(dht_y):
                await _connect(x, y)
                await dht_x.add_peer(y.get_id())
                await dht_y.add_peer(x.get_id())
                other_addr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")
                dht_y.provider_store.add_provider(raw, PeerInfo(info_id(other), [other_addr]))
                dht_x.provider_store.add_provider(
                    raw, PeerInfo(x.get_id(), x.get_addrs())
                )  # as provide() does

                with trio.fail_after(15):
                    stock = await dht_x.find_providers(key, 20)
                assert {p.peer_id for p in stock} == {x.get_id()}  # the bug: y's record is never asked for

                with trio.fail_after(15):
                    found, _closer = await dht_x.provider_store._get_providers_from_peer_with_closers(
                        y.get_id(), raw
                    )
                assert info_id(other) in {p.peer_id for p in found}  # what our discovery round does

    _run(main)


# ---------------------------------------------------------------------------------------------- swarm key


def test_stock_relayed_dial_fails_with_a_swarm_key() -> None:
    # Upstream report draft: "CircuitV2Transport.dial upgrades the relayed stream with
    # host.upgrade_outbound_connection, which does not apply the swarm's pre-shared key, while the target's
    # upgrade_inbound_raw_conn does: in a private network (psk) no relayed connection ever completes."
    # Workaround: NatService._dial_circuit wraps the circuit like the swarm wraps its own connections.
    async def main() -> None:
        async with _hosts(3, swarm_key=os.urandom(32)) as (relay, target, dialer), trio.open_nursery() as n:
            r = await _nat(n, relay, NatConfig(autonat=False, relay_service="on", use_relays=False))
            t = await _nat(n, target, _CLIENT)
            d = await _nat(n, dialer, _CLIENT)
            await _connect(target, relay)
            await _connect(dialer, relay)
            assert await t._reserve(relay.get_id())
            circuit = multiaddr.Multiaddr(f"{relay.get_addrs()[0]}/p2p-circuit/p2p/{target.get_id()}")
            assert d._transport is not None
            with pytest.raises(SwarmException), trio.fail_after(20):  # the bug: the handshake fails
                await d._transport.dial(circuit)
            assert target.get_id().to_base58() not in d.peer_connections()
            assert await d.dial_relayed(target.get_id(), [circuit])
            assert d.peer_connections()[target.get_id().to_base58()] == "relayed"
            assert r.relay.describe()["reservations"] == 1
            n.cancel_scope.cancel()

    _run(main)


def test_stock_psk_conn_hides_its_transport() -> None:
    # Upstream report draft: "PskConn subclasses RawConnection without calling its __init__, so on every
    # connection of a private network get_transport_addresses() raises (no _actual_addresses) and AutoNAT
    # servers refuse every request as relayed (fail-closed)." Workaround: p2p/_libp2p.py delegates.
    async def main() -> None:
        async with _hosts(2, swarm_key=os.urandom(32)) as (a, b):
            await _connect(a, b)
            conn = a.get_network().get_connections(b.get_id())[0]
            raw: object = conn.muxed_conn.secured_conn  # type: ignore[attr-defined]
            for _ in range(4):  # secure session -> noise read/writer -> ... -> the raw connection
                raw = raw if isinstance(raw, PskConn) else getattr(raw, "conn", None)
            assert isinstance(raw, PskConn)
            with pytest.raises(AttributeError):
                _stock_psk_transport_addresses(raw)  # the bug
            assert [str(x) for x in raw.get_transport_addresses()] == [str(b.get_transport_addrs()[0])]
            assert conn_kind(conn) == "direct"

    _run(main)


def test_stock_responder_dial_wraps_the_swarm_key_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # Upstream report draft: "Swarm.dial_addr_as_responder applies the PSK to the raw connection, then calls
    # upgrade_inbound_raw_conn, which applies it again: in a private network the DCUtR responder sends two
    # nonces and every hole punch stalls in the Noise handshake." Workaround: p2p/_libp2p.py unwraps one.
    async def main() -> None:
        async with _hosts(2, swarm_key=os.urandom(32)) as (a, b):
            network = a.get_network()
            handed: list[object] = []

            async def capture(raw_conn: object, maddr: object) -> None:
                handed.append(raw_conn)
                raise RuntimeError("stop before the handshake")

            network.upgrade_inbound_raw_conn = capture  # type: ignore[method-assign]
            with pytest.raises(Exception, match="stop before"), trio.fail_after(10):
                await network.dial_addr_as_responder(b.get_transport_addrs()[0], b.get_id())
            (wrapped,) = handed
            assert isinstance(wrapped, PskConn)  # the bug: wrapped already, and the upgrade wraps again
            del network.upgrade_inbound_raw_conn  # back to the (patched) class method
            upgraded: list[object] = []

            async def stock(swarm: object, raw_conn: object, maddr: object) -> None:
                upgraded.append(raw_conn)

            monkeypatch.setattr(p2p._libp2p, "_stock_upgrade_inbound_raw_conn", stock)
            await network.upgrade_inbound_raw_conn(wrapped, b.get_transport_addrs()[0])
            assert upgraded == [wrapped._conn]  # ours: the stock upgrade wraps the bare connection once
            await wrapped.close()

    _run(main)


def test_autonat_dial_back_with_a_swarm_key_and_its_rate_limit() -> None:
    async def main() -> None:
        async with _hosts(3, swarm_key=os.urandom(32)) as (server, client, other):
            ours = AutoNAT(server, confirmations=1)
            server.set_stream_handler(AUTONAT_PROTOCOL_ID, ours.serve)
            await _connect(client, server)
            await _connect(other, server)
            reachable = [a.to_bytes() for a in client.get_transport_addrs()]
            assert await AutoNAT(client, confirmations=1).query(server.get_id(), reachable) is True
            again = AutoNAT(client, confirmations=1)
            assert await again.query(server.get_id(), reachable) is None  # within 20 s: refused, no verdict
            others = [a.to_bytes() for a in other.get_transport_addrs()]
            assert await AutoNAT(other, confirmations=1).query(server.get_id(), others) is True  # per peer
            assert ours.counters == {"autonat_queries": 0, "autonat_served": 2, "autonat_refused_busy": 1}

    _run(main)


# ---------------------------------------------------------------------------------------------- relay service

_CLIENT = NatConfig(autonat=False, relay_service="off", use_relays=False, hole_punch=False)
SINK = TProtocol("/meshtrain/test-sink/1")


async def _nat(nursery: trio.Nursery, host: IHost, config: NatConfig) -> NatService:
    service = NatService(host, config)
    await nursery.start(service.run)
    return service


async def _until(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)


async def _sink(stream: INetStream) -> None:
    with suppress(Exception):
        while await stream.read(65536):
            pass


def test_auto_relay_serves_only_while_public_within_its_limits() -> None:
    limits = NatConfig(
        autonat=False,
        use_relays=False,
        hole_punch=False,
        relay_max_reservations=1,
        relay_circuit_bytes=256 * 1024,
        relay_circuit_duration_s=3,
    )

    async def main() -> None:
        async with _hosts(4) as (relay, target, dialer, late), trio.open_nursery() as n:
            r = await _nat(n, relay, limits)  # relay_service="auto", the default
            t, d, x = [await _nat(n, h, _CLIENT) for h in (target, dialer, late)]
            for h in (target, dialer, late):
                await _connect(h, relay)
            target.set_stream_handler(SINK, _sink)
            assert r.status == "unknown" and not await t._reserve(relay.get_id())  # not public: refused
            r.autonat.status = "public"  # what AutoNAT concludes on a public node (netns tests show it)
            assert await t._reserve(relay.get_id())
            assert not await x._reserve(relay.get_id())  # over relay_max_reservations=1
            counters = r.relay.describe()["counters"]
            assert counters["relay_refused_inactive"] == 1 and counters["relay_reservations_refused"] == 1
            circuit = multiaddr.Multiaddr(f"{relay.get_addrs()[0]}/p2p-circuit/p2p/{target.get_id()}")

            assert await d.dial_relayed(target.get_id(), [circuit])  # 1: cut by bytes
            stream = await dialer.new_stream(target.get_id(), [SINK])
            with suppress(Exception):
                for _ in range(32):  # 512 KiB > 256 KiB
                    await stream.write(b"x" * 16384)
            await _until(lambda: target.get_id().to_base58() not in d.peer_connections())
            await _until(lambda: r.relay.describe()["counters"]["relay_circuits_cut_bytes"] == 1)

            started = trio.current_time()  # 2: idle, cut by duration (the circuit is younger than this)
            assert await d.dial_relayed(target.get_id(), [circuit])
            await _until(lambda: target.get_id().to_base58() not in d.peer_connections(), timeout_s=15)
            assert trio.current_time() - started >= limits.relay_circuit_duration_s  # not before its time
            await _until(lambda: r.relay.describe()["counters"]["relay_circuits_cut_duration"] == 1)
            await _until(lambda: r.relay.circuits == 0)
            n.cancel_scope.cancel()

    _run(main)


def test_hole_punches_are_driven_from_one_end_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # libp2p's DCUtR auto-drive starts a session from both ends of a relayed connection; when their ticks
    # line up both punch at once from the same port and fail (p2p/_nat.py, bug 6). Ours: smaller id only.
    initiated: list[tuple[ID, ID]] = []

    async def record(self: DCUtRProtocol, peer_id: ID) -> bool:
        initiated.append((self.host.get_id(), peer_id))
        return False

    monkeypatch.setattr(DCUtRProtocol, "initiate_hole_punch", record)
    punching = NatConfig(autonat=False, relay_service="off", use_relays=False, hole_punch=True)

    async def main() -> None:
        async with _hosts(3) as (relay, x, y), trio.open_nursery() as n:
            await _nat(
                n, relay, NatConfig(autonat=False, relay_service="on", use_relays=False, hole_punch=False)
            )
            nx, ny = await _nat(n, x, punching), await _nat(n, y, punching)
            await _connect(x, relay)
            await _connect(y, relay)
            assert await ny._reserve(relay.get_id())
            circuit = multiaddr.Multiaddr(f"{relay.get_addrs()[0]}/p2p-circuit/p2p/{y.get_id()}")
            assert await nx.dial_relayed(y.get_id(), [circuit])
            await _until(lambda: y.get_id().to_base58() in nx.peer_connections())
            small, large = sorted((x.get_id(), y.get_id()), key=lambda p: p.to_bytes())
            await _until(lambda: len(initiated) >= 3, timeout_s=20)  # three 2 s ticks on both ends
            assert set(initiated) == {(small, large)}
            n.cancel_scope.cancel()

    _run(main)


def test_nat_config_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="relay_service"):
        NatConfig(relay_service="yes")
    with pytest.raises(ValueError, match="relay_max_reservations"):
        NatConfig(relay_max_reservations=0)
    with pytest.raises(ValueError, match="relay_circuit_bytes"):
        NatConfig(relay_circuit_bytes=0)
    assert not NatConfig(autonat=False, relay_service="off", use_relays=False, hole_punch=False).enabled
    assert NatConfig().enabled and NatConfig().relay_service == "auto"  # internet defaults
