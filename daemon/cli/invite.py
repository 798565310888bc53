"""Invite tokens: everything a new machine needs to join a run, in one copy-paste-safe line.

``meshtrain invite`` (on a member) prints a token; ``meshtrain init --join TOKEN`` (on the new machine)
writes a config.toml from it. The token carries the run's name, its genesis id (pinned: the joiner
refuses any other genesis, ``daemon/node/genesis.py``), the task and its ``[task]`` options (which the
genesis fixes too), and the member's dialable addresses with its peer id. It never carries a secret: not
the swarm key of a private run (it only says the run is private, so ``init --join`` can say a key is
needed), nor anything of the member's identity but its public peer id.

Format::

    mtinv1-<base64url, no padding, of: msgpack([run, genesis(32 bytes), task, task_options, peer_id,
            [binary multiaddr without /p2p, ...], private]) || blake2b-32(that msgpack)>

The version is in the prefix, so a later format is told apart before anything is decoded ("made by a
newer meshtrain"). base64url needs no quoting in any shell and survives mail and chat; the decoder drops
whitespace and line breaks a paste may add, and surrounding quotes or angle brackets. The 4-byte checksum
catches a truncated or mistyped token (it is no signature: nothing here is secret, and the genesis pin is
what protects the joiner from a wrong run). Multiaddrs go in binary (8 bytes for ip4+tcp against ~25
characters), the peer id once: a token is 150-350 characters.

A token is untrusted input: its size is bounded before decoding, it is decoded into a fixed typed shape
(msgspec), and every value is validated as the config file would be (run name, genesis id, multiaddrs,
TOML-able task options) before anything is written. A task named by a plug-in path runs code on the
joiner's machine, from a file or module that must already be there: ``init --join`` says so.

Rejected: JSON in base64 (twice the size of msgpack with binary addresses), base58 (no ``-`` or ``_``,
but its quadratic encoder and 37 % over raw bytes buy nothing base64url lacks for pasting), a signed
token (a member's signature proves little a joiner can check; the pinned genesis is the check that
matters), and putting the swarm key in it (a token gets pasted into chats).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from typing import Any

import msgspec
from multiaddr import Multiaddr

from daemon.config import Config, ConfigError

__all__ = ["Invite", "InviteError", "decode_invite", "encode_invite", "invite_from_node"]

PREFIX = "mtinv1-"
VERSION_PREFIX = re.compile(r"^mtinv(\d+)-")
CHECKSUM_BYTES = 4  # blake2b-32: catches a mangled paste (1 in 4 billion slips through), not an attacker
MAX_TOKEN_CHARS = 8192  # real tokens are a few hundred characters; bound the work before decoding
MAX_ADDRS = 16  # a member has a handful of addresses; more is not a token we made
STRIP = " \t\r\n\"'<>`"  # what mail, chat and shells wrap a pasted token in


class InviteError(ValueError):
    """The token is not a usable invite; the message says what to do (copy it again, upgrade)."""


class Invite(msgspec.Struct, frozen=True, kw_only=True):
    """What a joiner needs: ``init --join`` writes these into config.toml."""

    run: str
    genesis: str
    """The run's genesis id, 64 hex digits: ``[node] genesis``."""
    task: str
    task_options: dict[str, Any]
    """The ``[task]`` table."""
    bootstrap: list[str]
    """Multiaddrs ending in /p2p/<peer id>: ``[node] bootstrap``."""
    private: bool = False
    """The run needs a swarm key (the token does not carry it)."""


class _Wire(msgspec.Struct, array_like=True, frozen=True):
    run: str
    genesis: bytes
    task: str
    task_options: dict[str, Any]
    peer_id: str
    addrs: list[bytes]
    private: bool


def encode_invite(invite: Invite) -> str:
    """The token of ``invite`` (whose addresses all end in the same /p2p/<peer id>)."""
    peer_ids = {addr.rpartition("/p2p/")[2] for addr in invite.bootstrap}
    if len(peer_ids) != 1:
        raise InviteError("an invite names one peer: every address must end in the same /p2p/<peer id>")
    peer_id = peer_ids.pop()
    try:
        addrs = [Multiaddr(addr.rpartition("/p2p/")[0]).to_bytes() for addr in invite.bootstrap]
    except ValueError as exc:  # py-multiaddr's ParseError family
        raise InviteError(f"not a multiaddr: {exc}") from None
    wire = _Wire(invite.run, bytes.fromhex(invite.genesis), invite.task, invite.task_options, peer_id,
                 addrs, invite.private)
    payload = msgspec.msgpack.encode(wire)
    return PREFIX + _b64(payload + _checksum(payload))


def decode_invite(token: str) -> Invite:
    """The invite in ``token`` (whitespace and wrapping quotes ignored), validated.

    Raises:
        InviteError: not an invite, a newer format, damaged (the checksum says so), or a value the
            config file would refuse.
    """
    text = "".join(token.split()).strip(STRIP)
    if len(text) > MAX_TOKEN_CHARS:
        raise InviteError(f"this is not an invite: {len(text)} characters (invites are a few hundred)")
    version = VERSION_PREFIX.match(text)
    if version is None:
        raise InviteError("this is not a meshtrain invite (it should start with mtinv1-)")
    if text[: version.end()] != PREFIX:
        raise InviteError(
            f"this invite has format {version[1]}, newer than this meshtrain reads (1): upgrade meshtrain"
        )
    body = text[version.end():]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InviteError(_DAMAGED + " (it has characters an invite never has)") from None
    if _b64(raw) != body:  # the last character's spare bits: a change there decodes to the same bytes
        raise InviteError(_DAMAGED + " (its last character is not one an invite ends with)")
    payload, checksum = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
    if len(raw) <= CHECKSUM_BYTES or _checksum(payload) != checksum:
        raise InviteError(_DAMAGED + " (its checksum does not match: cut short or mistyped?)")
    try:
        wire = msgspec.msgpack.decode(payload, type=_Wire)
    except msgspec.DecodeError as exc:
        raise InviteError(f"this invite is malformed although its checksum matches ({exc})") from None
    return _validate(wire)


_DAMAGED = "this invite is damaged: copy the whole token again"


def _validate(wire: _Wire) -> Invite:
    if len(wire.genesis) != 32:
        raise InviteError(f"the invite's genesis id has {len(wire.genesis)} bytes, not 32")
    if not 1 <= len(wire.addrs) <= MAX_ADDRS:
        raise InviteError(f"the invite names {len(wire.addrs)} addresses (1..{MAX_ADDRS} expected)")
    try:
        addrs = [f"{Multiaddr(raw)}/p2p/{wire.peer_id}" for raw in wire.addrs]
    except ValueError as exc:  # py-multiaddr's ParseError family
        raise InviteError(f"the invite holds an address that is not a multiaddr ({exc})") from None
    _check_toml_values("task", wire.task_options)
    invite = Invite(run=wire.run, genesis=wire.genesis.hex(), task=wire.task, task_options=wire.task_options,
                    bootstrap=addrs, private=wire.private)
    node = {"run": invite.run, "genesis": invite.genesis, "bootstrap": invite.bootstrap}
    try:
        Config.from_dict({"node": node, "training": {"task": invite.task}, "task": invite.task_options})
    except ConfigError as exc:
        raise InviteError(f"the invite holds a value no config accepts: {exc}") from None
    return invite


def _check_toml_values(key: str, value: Any) -> None:
    """Raise InviteError unless ``value`` is something a TOML file can hold (no null, no bytes)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_toml_values(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_toml_values(f"{key}[{i}]", v)
    elif not isinstance(value, str | int | float | bool):
        raise InviteError(f"the invite's option {key} is {type(value).__name__}, which a config cannot hold")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest()


# ------------------------------------------------------------------------------------ from a running node


def invite_from_node(
    info: dict[str, Any], *, include_loopback: bool = False, extra_addrs: tuple[str, ...] = ()
) -> Invite:
    """The invite of the node whose ``GET /v1/invite`` reply is ``info``: ``extra_addrs`` first (a DNS
    name or a forwarded port the node cannot know), then its listen addresses (global before private;
    loopback only when asked; never 0.0.0.0), then its relayed ones.

    Raises:
        InviteError: no address is left to put in it (the message says what to pass).
    """
    peer_id = info["peer_id"]
    suffix = f"/p2p/{peer_id}"
    listen = [a.removesuffix(suffix) for a in info["listen_addrs"]]
    ranked = sorted((r, a) for a in listen if (r := _rank(a, include_loopback)) is not None)
    relayed = [a.removesuffix(suffix) for a in info["relay_addrs"]]
    extra = [a.removesuffix(suffix) for a in extra_addrs]
    chosen = list(dict.fromkeys([*extra, *(a for _, a in ranked), *relayed]))[:MAX_ADDRS]
    if not chosen:
        raise InviteError(
            "the node has no address a joiner could dial (it listens on loopback only?): pass "
            "--addr /ip4/<public ip>/tcp/<port>, or --include-loopback for a joiner on this machine"
        )
    return Invite(run=info["run"], genesis=info["genesis"], task=info["task"],
                  task_options=info["task_options"], bootstrap=[a + suffix for a in chosen],
                  private=bool(info["private"]))


def _rank(addr: str, include_loopback: bool) -> int | None:
    """0 global, 1 private or named, 2 loopback (None: left out)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return 1
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return None
    if ip.is_unspecified or (ip.is_loopback and not include_loopback):
        return None
    return 2 if ip.is_loopback else 0 if ip.is_global else 1
