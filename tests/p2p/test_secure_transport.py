"""Secure transport only: a Host refuses dialers that offer only plaintext or only secio.

Each dialer is a bare py-libp2p host (its own trio loop in a worker thread) whose ``sec_opt`` holds one
security transport. Controls prove the refusal comes from our Noise-only configuration, not from a broken
dialer: the same secio dialer connects to a bare libp2p listener that accepts secio, and a Noise dialer
connects to our Host.
"""

from __future__ import annotations

import asyncio

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secio.transport import ID as SECIO_ID
from libp2p.security.secio.transport import Transport as SecioTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from p2p import Host, Identity

pytestmark = pytest.mark.timeout(60)


def _sec_opt(kind: str, kp):  # type: ignore[no-untyped-def]
    if kind == "plaintext":
        return {PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}
    if kind == "secio":
        return {SECIO_ID: SecioTransport(kp)}
    return {NOISE_ID: NoiseTransport(kp, noise_privkey=x25519_pair().private_key)}


def _bare_host(kind: str):  # type: ignore[no-untyped-def]
    kp = create_new_key_pair()
    return new_host(
        key_pair=kp,
        sec_opt=_sec_opt(kind, kp),
        muxer_opt={YAMUX_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=5.0),
    )


async def _dial(host, maddr: str) -> str:  # type: ignore[no-untyped-def]
    try:
        with trio.fail_after(8):
            await host.connect(info_from_p2p_addr(Multiaddr(maddr)))
    except Exception as exc:
        return f"refused: {exc!r}"
    return "connected"


def dial(maddr: str, kind: str) -> str:
    """(Worker thread) dial ``maddr`` from a bare host offering only ``kind`` security."""

    async def main() -> str:
        host = _bare_host(kind)
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            return await _dial(host, maddr)

    return trio.run(main)


def dial_bare_listener(kind: str) -> str:
    """(Worker thread) control: a ``kind``-only dialer against a bare ``kind``-only libp2p listener."""

    async def main() -> str:
        listener, dialer = _bare_host(kind), _bare_host(kind)
        addr = Multiaddr("/ip4/127.0.0.1/tcp/0")
        async with listener.run([addr]), dialer.run([addr]):
            target = f"{listener.get_addrs()[0]}"
            if "/p2p/" not in target:
                target += f"/p2p/{listener.get_id().to_base58()}"
            return await _dial(dialer, target)

    return trio.run(main)


@pytest.mark.parametrize("kind", ["secio", "plaintext"])
async def test_insecure_dialers_are_turned_away(kind: str) -> None:
    assert (await asyncio.to_thread(dial_bare_listener, kind)) == "connected"  # the dialer itself works
    async with Host(Identity.generate()) as victim:
        addr = victim.listen_addrs()[0]
        assert (await asyncio.to_thread(dial, addr, "noise")) == "connected"  # control
        result = await asyncio.to_thread(dial, addr, kind)
        assert result.startswith("refused"), result
        assert victim.stats()["connected_peers"] <= 1  # only the Noise control dialer ever got in
