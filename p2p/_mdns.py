"""LAN discovery by multicast DNS: peers announced on the local network are dialed.

py-libp2p's mDNS (zeroconf) only adds what it hears to the peerstore and calls the handlers of the
process-global ``peerDiscovery`` registry, from a zeroconf thread. It dials nobody (and we turn its
auto-connector off: who we connect to is discovery's decision). So this module registers a handler that
hands each discovered peer to the trio thread through the trio token, and a trio task dials it.

Rejected: dialing from the zeroconf thread (libp2p is trio-only) and polling the peerstore (every
DHT-learned peer is in it too). The registry is global, so every Host of a process hears every
discovery; each one dials only peers it is not connected to, and unregisters its handler on close.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, PeerInfo
from libp2p.discovery.events.peerDiscovery import peerDiscovery

__all__ = ["run_mdns_dialer"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # discoveries waiting to be dialed; more are dropped (zeroconf repeats announcements)


async def run_mdns_dialer(host: IHost, dial: Callable[[PeerInfo], Awaitable[None]]) -> None:
    """Dial every peer mDNS discovers, until cancelled."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[PeerInfo](QUEUE_SIZE)

    def on_discovered(info: PeerInfo) -> None:  # zeroconf thread
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(_offer, send, info)

    peerDiscovery.register_peer_discovered_handler(on_discovered)
    try:
        async for info in receive:
            if info.peer_id == host.get_id() or host.get_network().connections.get(info.peer_id):
                continue
            try:
                await dial(info)
                log.info("mDNS: connected peer=%s", info.peer_id)
            except Exception as exc:  # a LAN peer that went away is routine
                log.info("mDNS: dial failed peer=%s error=%s", info.peer_id, exc)
    finally:
        peerDiscovery.unregister_peer_discovered_handler(on_discovered)


def _offer(send: trio.MemorySendChannel[PeerInfo], info: PeerInfo) -> None:
    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
        send.send_nowait(info)
