"""Who else is in the run and how they are doing: heartbeats, goodbyes, peer info.

Every few seconds a node gossips a :class:`~daemon.node.wire.Heartbeat` on its run's heartbeat topic (its
round, training state, reachability, task, device and throughput); the latest one heard from each peer is
shown in status (``peer_info``). The period stretches with the mesh so the whole run carries about one
heartbeat a second: gossipsub costs CPU per message at every node.

At shutdown a last heartbeat says "leaving". It is gossiped for peers reached only through the mesh, and
sent straight to each connected peer over ``/meshtrain/goodbye/1``, which does not depend on gossip having
a mesh path at that moment (a CI run once caught two connected nodes whose gossip had stopped flowing one
way). A goodbye from a peer never heard before changes nothing: a stranger cannot plant members.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import p2p
from daemon.node import wire
from daemon.status import PeerInfo

__all__ = ["Membership"]

HEARTBEAT_S = 5  # period of the per-run heartbeat with up to HEARTBEAT_PEERS peers
HEARTBEAT_PEERS = 5  # beyond, the period grows with the peer count
GOODBYE_TIMEOUT_S = 1.0  # bound on the last heartbeat during shutdown (the drain has its own bound)


class Membership:
    """Heartbeats out and in, and the goodbye. ``beat(throughput_bps)`` builds this node's heartbeat."""

    def __init__(
        self,
        host: p2p.Host,
        *,
        run: str,
        beat: Callable[[int], wire.Heartbeat],
        reject: Callable[[str, Exception], None],
    ) -> None:
        self.host = host
        self.run_name = run
        self._beat = beat
        self._reject = reject
        self.heartbeats: dict[str, tuple[float, wire.Heartbeat]] = {}
        """The latest heartbeat of each peer, with its arrival time (monotonic)."""

    def install(self, counting: Callable[..., object]) -> asyncio.Queue[p2p.GossipMessage]:
        """Register the goodbye handler (wrapped by ``counting``) and the heartbeat topic."""
        self.host.set_request_handler(wire.GOODBYE_PROTOCOL, counting(self._serve_goodbye))
        topic = wire.heartbeat_topic(self.run_name)
        self.host.set_topic_validator(topic, wire.valid_gossip(wire.Heartbeat.decode))
        return self.host.subscribe(topic)

    def peer_info(self) -> dict[str, PeerInfo]:
        now = time.monotonic()
        return {
            peer: PeerInfo(
                round=beat.round,
                contributions=beat.contributions,
                training=beat.training,
                reachability=beat.reachability,
                task=beat.task,
                device=beat.device,
                throughput_bps=beat.throughput_bps,
                age_s=round(now - seen, 1),
            )
            for peer, (seen, beat) in self.heartbeats.items()
        }

    async def run(self, heartbeats: asyncio.Queue[p2p.GossipMessage]) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen(heartbeats), name="heartbeats-in")
            tasks.create_task(self._send_periodically(), name="heartbeats-out")

    async def _send_periodically(self) -> None:
        moved, last = 0, time.monotonic()
        while True:
            stats = self.host.stats()
            total = int(stats["bytes_sent"]) + int(stats["bytes_received"])
            throughput = int(max(0, total - moved) / max(time.monotonic() - last, 1e-3))
            moved, last = total, time.monotonic()
            await self._gossip(self._beat(throughput).encode())
            period = HEARTBEAT_S * max(1.0, len(self.host.connected_peers()) / HEARTBEAT_PEERS)
            await asyncio.sleep(period * random.uniform(0.8, 1.2))

    async def _gossip(self, beat: bytes) -> None:
        with contextlib.suppress(p2p.P2PError):  # no mesh peers yet: nobody to tell
            await self.host.publish(wire.heartbeat_topic(self.run_name), beat)

    async def _listen(self, queue: asyncio.Queue[p2p.GossipMessage]) -> None:
        while True:
            message = await queue.get()
            try:
                heartbeat = wire.Heartbeat.decode(message.data)
            except wire.WireError as exc:  # the validator let it through: count it like any junk
                self._reject(message.from_peer, exc)
                continue
            self.heartbeats[message.from_peer] = (time.monotonic(), heartbeat)

    async def _serve_goodbye(self, peer: str, data: bytes) -> bytes:
        heartbeat = wire.Heartbeat.decode(data)
        if peer in self.heartbeats:  # a member of this run heard before; a stranger changes nothing
            self.heartbeats[peer] = (time.monotonic(), heartbeat)
        return b""

    async def say_goodbye(self) -> None:
        """Send the last heartbeat (the caller's state says "leaving"), bounded by GOODBYE_TIMEOUT_S."""
        beat = self._beat(0).encode()

        async def tell(peer: str) -> None:
            with contextlib.suppress(p2p.P2PError):
                await self.host.request(peer, wire.GOODBYE_PROTOCOL, beat, timeout_s=GOODBYE_TIMEOUT_S)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOODBYE_TIMEOUT_S), asyncio.TaskGroup() as tasks:
                tasks.create_task(self._gossip(beat))
                for peer in self.host.connected_peers():
                    tasks.create_task(tell(peer))
