"""Who else is in the run and how they are doing: heartbeats, goodbyes, peer info.

A node gossips a :class:`~daemon.node.wire.Heartbeat` on its run's heartbeat topic (its round, training
state, reachability, task, device and throughput); the latest one heard from each peer is shown in status
(``peer_info``). Every few seconds it looks at its heartbeat and sends it only when its state changed
(training state, reachability, task, device), when HEARTBEAT_REFRESH_S passed since the last one sent, or
every few seconds for a while after its connected peers changed (a newcomer learns of it at once).
Round, contribution count and throughput change all the time but never trigger one: a peer's progress
reaches everyone anyway, in its contributions (the version vector counts them). Both periods stretch with
the mesh so that a large run carries about one check a second: gossipsub costs CPU per message at every
node.

Measured on a training 4-node cluster (``python -m bench.convergence``, 333 s): 39 heartbeats published
in all, where a beat every 5 s from each node would have been about 266 (each one forwarded through the
gossip mesh to every member).
Rejected: dropping heartbeats (the dashboard and ``meshtrain peers`` show them; a stopped or paused peer
must be told apart from a slow one) and per-peer request/response pings (N - 1 messages each, and gossip
reaches members that are not connected directly).

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
from daemon.status import PeerInfo, TrainingState

__all__ = ["Membership"]

HEARTBEAT_S = 5  # how soon a changed state is told, with up to HEARTBEAT_PEERS peers
HEARTBEAT_REFRESH_S = 60  # an unchanged heartbeat still goes out this often: the peer is alive
HEARTBEAT_SETTLE_S = 30  # after the connected peers change, every HEARTBEAT_S for this long: newcomers learn
HEARTBEAT_MIN_S = 1.0  # a change of training state is told at once, but not more often than this
HEARTBEAT_PEERS = 5  # beyond, both periods grow with the peer count
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
        self._sent: tuple[int, float, tuple[str, ...] | None] = (0, time.monotonic(), None)
        """Bytes moved, time and state at the last heartbeat sent (state None: none sent yet)."""
        self._peers: frozenset[str] = frozenset()
        self._peers_changed = time.monotonic()
        """The connected peers at the last check, and when they last changed."""
        self._state_changed = asyncio.Event()  # set by state_changed(): check at once

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

    def heard_members(self) -> set[str]:
        """Peers heard within three heartbeat refresh periods that have not said goodbye: whom a new
        contribution must reach (daemon/node/sync.py announces it unless pushes reached them all)."""
        oldest = time.monotonic() - 3 * HEARTBEAT_REFRESH_S * self._stretch()
        leaving = TrainingState.LEAVING.value
        beats = self.heartbeats.items()
        return {peer for peer, (seen, beat) in beats if seen >= oldest and beat.training != leaving}

    def training_peers(self, within_s: float) -> set[str]:
        """Peers whose latest heartbeat, heard within ``within_s``, says they are training: DiLoCo's N
        counts them before their first contribution lands (peers that start together would otherwise
        each see a run of one or two, and bound staleness by that)."""
        oldest = time.monotonic() - within_s
        running = TrainingState.RUNNING.value
        beats = self.heartbeats.items()
        return {peer for peer, (seen, beat) in beats if seen >= oldest and beat.training == running}

    async def run(self, heartbeats: asyncio.Queue[p2p.GossipMessage]) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen(heartbeats), name="heartbeats-in")
            tasks.create_task(self._send_periodically(), name="heartbeats-out")

    def state_changed(self) -> None:
        """This node's training state changed: check at once instead of within HEARTBEAT_S (peers that
        start training together wait in lockstep only for peers whose heartbeat says they train, and a
        round here is a few seconds)."""
        self._state_changed.set()

    async def _send_periodically(self) -> None:
        while True:
            self._state_changed.clear()
            await self.tick(time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_S * self._stretch() * random.uniform(0.8, 1.2)):
                    await self._state_changed.wait()
                await asyncio.sleep(HEARTBEAT_MIN_S)  # a state flapping through the API: one a second

    async def tick(self, now: float) -> bool:
        """Gossip this node's heartbeat if its state changed since the last one sent, or the last one is
        HEARTBEAT_S old within HEARTBEAT_SETTLE_S of a change of connected peers (a new peer's gossip mesh
        forms a little after its connection), else HEARTBEAT_REFRESH_S old; periods stretched with the
        mesh. True if it went out. Its throughput is over the time since the last one sent."""
        stats = self.host.stats()
        total = int(stats["bytes_sent"]) + int(stats["bytes_received"])
        peers = frozenset(self.host.connected_peers())
        if peers != self._peers:
            self._peers, self._peers_changed = peers, now
        moved, last, told = self._sent
        beat = self._beat(int(max(0, total - moved) / max(now - last, 1e-3)))
        settling = now - self._peers_changed < HEARTBEAT_SETTLE_S
        period = (HEARTBEAT_S if settling else HEARTBEAT_REFRESH_S) * self._stretch()
        if _state(beat) == told and now - last < period:
            return False
        if not await self._gossip(beat.encode()):
            return False
        self._sent = (total, now, _state(beat))
        return True

    def _stretch(self) -> float:
        return max(1.0, len(self.host.connected_peers()) / HEARTBEAT_PEERS)

    async def _gossip(self, beat: bytes) -> bool:
        try:
            await self.host.publish(wire.heartbeat_topic(self.run_name), beat)
        except p2p.P2PError:  # no mesh peers yet: nobody to tell
            return False
        return True

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


def _state(beat: wire.Heartbeat) -> tuple[str, ...]:
    """What a heartbeat says that its peers cannot learn otherwise: a change is told at once."""
    return beat.training, beat.reachability, beat.task, beat.device
