"""The discovery bounds (p2p/_providers.py): what DHT answers can make a node dial, on a fake clock."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2p._providers import (
    BACKOFF_S,
    MAX_DIALS_PER_REPORTER,
    MAX_DIALS_PER_ROUND,
    MAX_NEW_PER_ANSWER,
    MAX_PROVIDERS,
    PROVIDER_TTL_S,
    ProviderBook,
    dialable,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pid(n: int) -> ID:
    """A deterministic peer id (Ed25519 from a seed)."""
    key = create_new_key_pair(hashlib.sha256(b"peer%d" % n).digest())
    return ID.from_pubkey(key.public_key)


def public(n: int, port: int = 4001) -> Multiaddr:
    return Multiaddr(f"/ip4/198.51.{n // 250}.{n % 250 + 1}/tcp/{port}")  # global (not a reserved range)


def info(n: int, *addrs: Multiaddr) -> PeerInfo:
    return PeerInfo(pid(n), list(addrs))


def book(clock: Clock, *, allow_private: bool = False) -> ProviderBook:
    return ProviderBook(allow_private=allow_private, clock=clock)


@pytest.mark.parametrize(
    ("addr", "private_ok", "public_ok"),
    [
        ("/ip4/198.51.0.7/tcp/4001", True, True),
        ("/ip6/2001:4860::8888/tcp/4001", True, True),
        ("/ip4/127.0.0.1/tcp/4001", True, False),
        ("/ip4/10.0.0.1/tcp/4001", True, False),
        ("/ip4/192.168.1.5/tcp/4001", True, False),
        ("/ip4/169.254.1.1/tcp/4001", True, False),
        ("/ip4/100.64.0.1/tcp/4001", True, False),  # carrier-grade NAT
        ("/ip6/::1/tcp/4001", True, False),
        ("/ip6/fe80::1/tcp/4001", True, False),
        ("/dns4/internal.example/tcp/4001", False, False),  # resolved locally: could name anything
        ("/ip4/198.51.0.7/udp/4001/quic-v1", False, False),
        ("/ip4/198.51.0.7/tcp/4001/ws", False, False),
    ],
)
def test_dialable_addresses(addr: str, private_ok: bool, public_ok: bool) -> None:
    assert dialable(Multiaddr(addr), pid(1), allow_private=True) is private_ok
    assert dialable(Multiaddr(addr), pid(1), allow_private=False) is public_ok


def test_dialable_checks_peer_ids_and_relays() -> None:
    me, other, relay = pid(1), pid(2), pid(3)
    assert dialable(Multiaddr(f"/ip4/198.51.0.7/tcp/1/p2p/{me}"), me, allow_private=False)
    assert not dialable(Multiaddr(f"/ip4/198.51.0.7/tcp/1/p2p/{other}"), me, allow_private=False)
    circuit = f"/ip4/198.51.0.9/tcp/1/p2p/{relay}/p2p-circuit"
    assert dialable(Multiaddr(circuit), me, allow_private=False)
    assert dialable(Multiaddr(f"{circuit}/p2p/{me}"), me, allow_private=False)
    assert not dialable(Multiaddr(f"{circuit}/p2p/{other}"), me, allow_private=False)
    private_relay = f"/ip4/10.1.1.1/tcp/1/p2p/{relay}/p2p-circuit"
    assert not dialable(Multiaddr(private_relay), me, allow_private=False)
    assert dialable(Multiaddr(private_relay), me, allow_private=True)
    assert dialable(Multiaddr(f"/p2p/{relay}/p2p-circuit"), me, allow_private=False)  # an existing link


def test_one_answer_adds_a_bounded_number_of_providers() -> None:
    clock = Clock()
    b = book(clock)
    liar = pid(0)
    b.observe(liar, [info(n, public(n), Multiaddr("/ip4/10.0.0.1/tcp/1")) for n in range(1, 101)])
    assert len(b.members()) == MAX_NEW_PER_ANSWER
    assert b.refused_providers == 100 - MAX_NEW_PER_ANSWER
    assert b.refused_addrs == 100  # every private address, even of providers refused for the bound
    b.observe(liar, [info(n, public(n)) for n in range(1, MAX_NEW_PER_ANSWER + 1)])  # known: no new slots
    assert len(b.members()) == MAX_NEW_PER_ANSWER
    many = [info(n, *(public(n, port) for port in range(1, 20))) for n in range(200, 201)]
    b.observe(liar, many)
    assert len(b.plan(connected=set(), relay_fallback=False)[0].addrs) <= 4


def test_book_size_is_bounded() -> None:
    clock = Clock()
    b = book(clock)
    for reporter in range(MAX_PROVIDERS // MAX_NEW_PER_ANSWER + 8):
        clock.now += 1
        b.observe(
            pid(10_000 + reporter), [info(reporter * 100 + n, public(n)) for n in range(MAX_NEW_PER_ANSWER)]
        )
    assert len(b.members()) == MAX_PROVIDERS


def test_a_round_dials_a_bounded_number_ranked_by_reporters() -> None:
    clock = Clock()
    b = book(clock)
    b.observe(pid(900), [info(n, public(n)) for n in range(1, 17)])  # 16 known from one reporter only
    b.observe(pid(901), [info(n, public(n)) for n in range(17, 21)])
    b.observe(pid(902), [info(n, public(n)) for n in range(17, 21)])  # 4 confirmed by two reporters
    plan = b.plan(connected={pid(20)}, relay_fallback=False)  # pid(20) is connected already
    assert [p.peer_id for p in plan] == [pid(n) for n in (17, 18, 19, *range(1, MAX_DIALS_PER_REPORTER + 1))]
    assert len(plan) <= MAX_DIALS_PER_ROUND
    for n in range(30, 60):  # many providers, each confirmed twice: the round bound holds
        b.observe(pid(903), [info(n, public(n))])
        b.observe(pid(904), [info(n, public(n))])
    assert len(b.plan(connected=set(), relay_fallback=False)) == MAX_DIALS_PER_ROUND


def test_never_two_direct_dials_to_one_ip_in_a_round() -> None:
    clock = Clock()
    b = book(clock)
    target = "198.51.7.7"
    for n in range(1, 6):  # five "providers" on one host, from five different reporters
        b.observe(pid(800 + n), [info(n, Multiaddr(f"/ip4/{target}/tcp/{4000 + n}"))])
    assert len(b.plan(connected=set(), relay_fallback=False)) == 1


def test_failed_addresses_back_off_exponentially() -> None:
    clock = Clock()
    b = book(clock)
    target = Multiaddr("/ip4/198.51.7.7/tcp/80")
    dials_at: list[float] = []
    for rounds in range(60):  # ten minutes of 10 s rounds; fresh fake providers every round
        clock.now = 1000.0 + 10 * rounds
        b.observe(pid(700 + rounds), [info(5000 + rounds, target)])
        for planned in b.plan(connected=set(), relay_fallback=False):
            assert target in planned.addrs
            dials_at.append(clock.now - 1000.0)
            b.dialed(planned, ok=False)
    waits = [later - earlier for earlier, later in itertools.pairwise(dials_at)]
    assert dials_at[0] == 0 and waits == [BACKOFF_S[0] * 2**i for i in range(len(waits))]
    assert len(dials_at) <= 5  # 0, 30, 90, 210, 450 s


def test_success_clears_backoff_and_providers_expire() -> None:
    clock = Clock()
    b = book(clock)
    peer = info(1, public(1))
    b.observe(pid(9), [peer])
    (planned,) = b.plan(connected=set(), relay_fallback=False)
    b.dialed(planned, ok=False)
    assert b.plan(connected=set(), relay_fallback=False) == []
    clock.now += BACKOFF_S[0]
    (planned,) = b.plan(connected=set(), relay_fallback=False)
    b.dialed(planned, ok=True)
    assert len(b.plan(connected=set(), relay_fallback=False)) == 1  # no backoff left
    b.observe(pid(9), [peer])  # reported again: its age starts over
    clock.now += PROVIDER_TTL_S - 1
    assert pid(1).to_base58() in b.members()
    clock.now += 1
    assert b.members() == frozenset() and b.plan(connected=set(), relay_fallback=False) == []


def test_addressless_providers_only_with_a_relay_fallback() -> None:
    clock = Clock()
    b = book(clock)
    b.observe(pid(9), [info(1), info(2, Multiaddr("/ip4/10.0.0.1/tcp/1"))])  # none usable
    assert b.plan(connected=set(), relay_fallback=False) == []
    assert [p.peer_id for p in b.plan(connected=set(), relay_fallback=True)] == [pid(1), pid(2)]
