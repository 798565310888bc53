"""daemon.cli.invite: tokens round-trip, survive a messy paste, and any damage is caught with a message
that says what to do; addresses are chosen for a joiner on another machine."""

from __future__ import annotations

import base64
import hashlib
import random

import msgspec
import pytest

from daemon.cli.invite import (
    MAX_TOKEN_CHARS,
    PREFIX,
    Invite,
    InviteError,
    _Wire,
    decode_invite,
    encode_invite,
    invite_from_node,
)

PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
RELAY = "12D3KooWMyYvyryoxi4pXasjhBPU6L2w1MsziTr2LkipoBTNtozu"
GENESIS = "0f" * 32


def _info(**overrides: object) -> dict:
    return {
        "run": "myrun",
        "genesis": GENESIS,
        "task": "digits",
        "task_options": {"hidden": 64, "val_fraction": 0.25, "dims": [1, 2]},
        "peer_id": PEER,
        "listen_addrs": [f"/ip4/{ip}/tcp/4001/p2p/{PEER}" for ip in ("127.0.0.1", "0.0.0.0", "192.168.1.5",
                                                                     "198.51.100.0", "8.8.4.4")],
        "relay_addrs": [f"/ip4/8.8.8.8/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"],
        "private": False,
    } | overrides


def test_addresses_global_first_no_loopback_no_wildcard_relays_last() -> None:
    invite = invite_from_node(_info())
    assert invite.bootstrap == [
        f"/ip4/8.8.4.4/tcp/4001/p2p/{PEER}",
        f"/ip4/192.168.1.5/tcp/4001/p2p/{PEER}",
        f"/ip4/198.51.100.0/tcp/4001/p2p/{PEER}",  # documentation range: not global
        f"/ip4/8.8.8.8/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
    ]
    with_loopback = invite_from_node(_info(), include_loopback=True, extra_addrs=("/dns4/mt.example/tcp/9",))
    assert with_loopback.bootstrap[0] == f"/dns4/mt.example/tcp/9/p2p/{PEER}"
    assert f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}" in with_loopback.bootstrap


def test_a_loopback_only_node_says_what_to_pass() -> None:
    with pytest.raises(InviteError, match=r"--addr .* --include-loopback"):
        invite_from_node(_info(listen_addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"], relay_addrs=[]))


def test_round_trip_and_messy_paste() -> None:
    invite = invite_from_node(_info(private=True))
    token = encode_invite(invite)
    assert token.startswith(PREFIX) and len(token) < 350
    assert set(token[len(PREFIX):]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_invite(token) == invite
    wrapped = "  <" + "\n> ".join(token[i:i + 40] for i in range(0, len(token), 40)) + ">\n"
    assert decode_invite(wrapped.replace("> ", "")) == invite
    assert decode_invite(f'"{token}"') == invite


def test_any_single_character_change_or_cut_is_caught() -> None:
    token = encode_invite(invite_from_node(_info()))
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for index in range(len(PREFIX), len(token)):
        others = [c for c in alphabet if c != token[index]]
        for changed in rng.sample(others, 3) if index < len(token) - 1 else others:  # all at the end
            with pytest.raises(InviteError, match=r"copy the whole token again|malformed"):
                decode_invite(token[:index] + changed + token[index + 1:])
    for cut in (1, 2, 5, len(token) // 2):
        with pytest.raises(InviteError, match="copy the whole token again"):
            decode_invite(token[:-cut])


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("hello", "not a meshtrain invite"),
        ("mtinv2-AAAA", "format 2, newer .* upgrade meshtrain"),
        (PREFIX + "A*B", "characters an invite never has"),
        (PREFIX + "A" * MAX_TOKEN_CHARS, "not an invite"),
    ],
)
def test_not_an_invite(token: str, message: str) -> None:
    with pytest.raises(InviteError, match=message):
        decode_invite(token)


def _forge(wire: object) -> str:
    """A token with a valid checksum around any payload: what an attacker can paste."""
    payload = msgspec.msgpack.encode(wire)
    digest = hashlib.blake2b(payload, digest_size=4).digest()
    return PREFIX + base64.urlsafe_b64encode(payload + digest).rstrip(b"=").decode()


ADDR = bytes.fromhex("04c0a80105060fa1")  # /ip4/192.168.1.5/tcp/4001


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (_Wire("bad run!", bytes(32), "digits", {}, PEER, [ADDR], False), "node.run"),
        (_Wire("r", bytes(31), "digits", {}, PEER, [ADDR], False), "31 bytes"),
        (_Wire("r", bytes(32), "digits", {}, "not-a-peer", [ADDR], False), "no config accepts"),
        (_Wire("r", bytes(32), "digits", {}, PEER, [], False), "0 addresses"),
        (_Wire("r", bytes(32), "digits", {}, PEER, [ADDR] * 17, False), "17 addresses"),
        (_Wire("r", bytes(32), "digits", {"x": None}, PEER, [ADDR], False), "task.x is NoneType"),
        (_Wire("r", bytes(32), "digits", {"x": [b"\0"]}, PEER, [ADDR], False), r"task.x\[0\] is bytes"),
        (_Wire("r", bytes(32), "", {}, PEER, [ADDR], False), "training.task"),
        (_Wire("r", bytes(32), "digits", {}, PEER, [b"\xff\x01"], False), "not a multiaddr"),
    ],
)
def test_forged_values_are_refused_like_a_config_file_would(wire: _Wire, message: str) -> None:
    with pytest.raises(InviteError, match=message):
        decode_invite(_forge(wire))


def test_a_forged_payload_of_another_shape_is_malformed() -> None:
    with pytest.raises(InviteError, match="malformed"):
        decode_invite(_forge({"run": "r"}))


def test_one_peer_per_invite() -> None:
    invite = Invite(run="r", genesis=GENESIS, task="digits", task_options={},
                    bootstrap=[f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}", f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}"])
    with pytest.raises(InviteError, match="one peer"):
        encode_invite(invite)
