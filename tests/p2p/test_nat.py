"""py-libp2p 0.8.1 bugs that p2p/_nat.py and p2p/_discovery.py work around, shown on loopback (no namespaces).

Each test shows the stock behaviour (the bug) next to our workaround, so that an upgrade that fixes the bug
makes the "bug" half fail: then the workaround can go. The comments are drafts for upstream reports.
The real-NAT end-to-end test is tests/p2p/test_nat_netns.py.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.abc import IHost
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from p2p._discovery import run_key
from p2p._identity import Identity
from p2p._libp2p import build_host
from p2p._nat import NatConfig, NatService

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def _hosts(n: int) -> AsyncIterator[list[IHost]]:
    async with AsyncExitStack() as stack:
        hosts = []
        for _ in range(n):
            addrs = [multiaddr.Multiaddr(LOOPBACK)]
            host = build_host(Identity.generate(), addrs)
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
            asker = NatService(client, NatConfig(autonat=True))
            undialable = [_closed_port_addr()]

            AutoNATService(server)  # stock server: registers its handler
            assert await asker._query(server.get_id(), undialable) is True  # the bug: "reachable"

            ours = NatService(server, NatConfig(autonat=True))
            server.set_stream_handler(AUTONAT_PROTOCOL_ID, ours._serve_autonat)
            assert await asker._query(server.get_id(), undialable) is False  # fresh dial-back: not reachable

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
