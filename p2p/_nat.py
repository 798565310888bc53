"""NAT traversal (trio side): AutoNAT, Circuit Relay v2 (service and client) and DCUtR on one libp2p host.

Theory of operation
-------------------
A node behind a NAT can dial out but cannot be dialled. Three protocols fix that, all from py-libp2p 0.8.1:

* **AutoNAT v1** (p2p/_autonat.py) tells a node whether it is publicly reachable ("public"/"private").
* **Circuit Relay v2**: a public node relays (p2p/_relay.py; by default while AutoNAT says it is public,
  within limits). A node with ``use_relays`` that AutoNAT finds private (or that runs without AutoNAT)
  reserves a slot on up to ``max_relays`` connected relays and advertises
  ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<me>`` (through the host's addrs, so identify and the DHT
  provider records carry it). Peers that cannot dial us directly dial that address (`dial_relayed`).
* **DCUtR** (``/libp2p/dcutr``): over a relayed connection both sides exchange their predicted public
  addresses (the relay-observed WAN IP with our *listen* port, since hole-punch dials leave from the listen
  port with SO_REUSEPORT) and dial each other at the same time (TCP simultaneous open). When it works, the
  direct connection replaces the relayed one; py-libp2p's service drives this for every relayed peer.

All knobs live in one exported type, `NatConfig` (``HostConfig.nat``), whose defaults suit a node on the
internet: AutoNAT, relay use, hole punching on; relay service "auto".

py-libp2p 0.8.1 bugs worked around here (see tests/p2p/test_nat.py; AutoNAT's and the relay's own bugs are
in their modules):

1. The swarm drops every ``/p2p-circuit`` address in ``dial_peer`` ("this node has no relay transport"),
   even when one exists, so ``host.connect()`` can never dial a relayed address. We dial those through the
   circuit transport ourselves (`dial_relayed`).
2. `CircuitV2Transport.dial` upgrades the relayed stream with ``host.upgrade_outbound_connection``, which
   skips the swarm key, while the receiving side's upgrade (``upgrade_inbound_raw_conn``) applies it: with a
   swarm key no relayed connection ever completes. We open the circuit, wrap it like the swarm wraps its
   own connections, then upgrade.
3. Outbound relayed connections are not tagged as relayed (only inbound ones are), so DCUtR's auto-drive
   never sees them; we tag them (``set_transport_info``) after the dial.
4. ``BasicHost.get_addrs`` mangles every ``/p2p-circuit`` address an ``addrs_factory`` returns into a
   direct address of the relay with our peer id (`_install_addrs_factory`), so identify and DHT provider
   records never carried a circuit. We wrap ``get_addrs`` instead.
5. With the transport's CLIENT role, every relayed dial first takes a reservation on the relay for the
   *dialer*, using up the relay's reservation slots; we leave that role out and reserve explicitly.
6. DCUtR's auto-drive initiates a hole punch from *both* ends of every relayed connection, on a 2 s tick.
   When the ticks line up (the relayed connection appears on both sides in the same tick, and the 10 s
   unilateral-dial timeout that precedes each session keeps them lined up), both sessions dial the same
   address pair from the same listen port at once and every punch fails (seen in
   tests/netns/test_nat_netns.py: no direct link in 45 s). We drive it ourselves, from one end only: the
   peer with the smaller id (`_drive_hole_punches`); the other end answers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.network.connection.raw_connection import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2p._autonat import AutoNAT, conn_kind, protect
from p2p._relay import RelayService

if TYPE_CHECKING:
    from libp2p.abc import IHost

__all__ = ["RELAY_SERVICE_MODES", "NatConfig", "NatService", "is_relayed_addr"]

log = logging.getLogger(__name__)

RELAY_SERVICE_MODES = ("auto", "on", "off")
RESERVE_TIMEOUT_S = 10.0
HOLE_PUNCH_DRIVE_S = 2.0  # how often relayed-only peers are looked for (libp2p's auto-drive period)
NOT_A_RELAY_RETRY_S = (10.0, 300.0)  # a peer that refused HOP is asked again after 10 s, doubling to 5 min
MAX_TRACKED_REFUSALS = 1024  # relay refusals remembered (then forgotten wholesale: bounded memory)


@dataclass(frozen=True, slots=True, kw_only=True)
class NatConfig:
    """NAT traversal of a Host (``HostConfig.nat``; see p2p/_nat.py). Defaults suit a node on the internet."""

    autonat: bool = True
    """Ask connected peers to dial us back (AutoNAT v1) to learn our reachability; serve their dial-backs."""
    autonat_confirmations: int = 1
    """Distinct AutoNAT servers that must agree before reachability flips (libp2p's default: 4)."""
    relay_service: str = "auto"
    """Relay (Circuit Relay v2) for peers behind NAT: "auto" (while AutoNAT says public), "on" or "off"."""
    relay_max_reservations: int = 32
    """Peers holding a relay slot on us at once; more are refused (go-libp2p: 128, for nodes of any run)."""
    relay_max_circuits: int = 8
    """Relayed connections at once to one peer holding a slot (go-libp2p: 16)."""
    relay_circuit_duration_s: int = 1800
    """A relayed connection is cut after this long (then redialled; hole punching usually replaced it)."""
    relay_circuit_bytes: int = 128 * 1024 * 1024
    """... or after this many bytes, both directions together (a few sync rounds of a small model)."""
    use_relays: bool = True
    """When AutoNAT says private (or AutoNAT is off): reserve relay slots, advertise and dial /p2p-circuit."""
    hole_punch: bool = True
    """Upgrade relayed connections to direct ones with DCUtR (TCP simultaneous open)."""
    max_relays: int = 2
    """Relays to hold a reservation on at once."""
    interval_s: float = 5.0
    """Period of the NAT round (AutoNAT queries, relay reservations)."""

    def __post_init__(self) -> None:
        if self.relay_service not in RELAY_SERVICE_MODES:
            modes = ", ".join(RELAY_SERVICE_MODES)
            raise ValueError(f"nat.relay_service must be one of {modes}, got {self.relay_service!r}")
        for name in ("autonat_confirmations", "relay_max_reservations", "relay_max_circuits", "max_relays"):
            if getattr(self, name) < 1:
                raise ValueError(f"nat.{name} must be >= 1")
        for name in ("relay_circuit_duration_s", "relay_circuit_bytes", "interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"nat.{name} must be positive")

    @property
    def enabled(self) -> bool:
        return self.autonat or self.relay_service != "off" or self.use_relays or self.hole_punch

    def relay_limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.relay_circuit_duration_s,
            data=self.relay_circuit_bytes,
            max_circuit_conns=self.relay_max_circuits,
            max_reservations=self.relay_max_reservations,
        )


def is_relayed_addr(addr: object) -> bool:
    return "/p2p-circuit" in str(addr)


class NatService:
    """Runs AutoNAT, the relay service and client, and DCUtR for one host; owned by the node's nursery."""

    def __init__(self, host: IHost, config: NatConfig) -> None:
        self.host = host
        self.config = config
        self.autonat = AutoNAT(host, confirmations=config.autonat_confirmations)
        self._protocol = CircuitV2Protocol(host, limits=config.relay_limits(), allow_hop=False)
        self.relay = RelayService(
            host,
            self._protocol,
            mode=config.relay_service,
            circuit_duration_s=config.relay_circuit_duration_s,
            reachability=lambda: self.status,
        )
        self.relay_addrs: list[str] = []  # our advertised /p2p-circuit addrs (without /p2p/<me>)
        self.reservations: dict[ID, str] = {}  # relay -> circuit addr
        self._refused: dict[ID, tuple[float, float]] = {}  # peer -> (retry after, current backoff)
        self.counters = {
            "relay_dials_ok": 0,
            "relay_dials_failed": 0,
            "reservations": 0,
            "reservations_refused": 0,
        }
        self._transport: CircuitV2Transport | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def status(self) -> str:
        """AutoNAT's verdict: "public", "private" or "unknown"."""
        return self.autonat.status

    @property
    def needs_relay(self) -> bool:
        return self.config.use_relays and (
            self.status == "private" or (self.status == "unknown" and not self.config.autonat)
        )

    def describe(self) -> dict[str, Any]:
        """The NAT part of `Host.nat_status()` (config, relay service state and limits, counters)."""
        return {
            "relay_addrs": list(self.relay_addrs),
            "relays": sorted(p.to_base58() for p in list(self.reservations)),
            "autonat_verdicts": {p.to_base58(): v for p, v in self.autonat.verdicts().items()},
            "relay_service": self.relay.describe(),
            "config": dataclasses.asdict(self.config),
            "counters": {**self.counters, **self.autonat.counters},
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        if cfg.autonat:
            self.host.set_stream_handler(AUTONAT_PROTOCOL_ID, self.autonat.serve)
        self._install_addrs_factory()
        async with background_trio_service(self._protocol), trio.open_nursery() as nursery:
            self.relay.register()  # the protocol (allow_hop=False) registered only STOP
            self._nursery = nursery
            roles = RelayRole.STOP  # bug 5: no CLIENT role
            self._transport = CircuitV2Transport(
                self.host, self._protocol, RelayConfig(roles=roles, limits=cfg.relay_limits())
            )
            if cfg.hole_punch:
                dcutr = DCUtRProtocol(self.host)
                dcutr._auto_drive_loop = lambda: self._drive_hole_punches(dcutr)  # type: ignore[method-assign]
                nursery.start_soon(_run_service, dcutr)  # bug 6
            task_status.started()
            while True:
                try:
                    await self._round()
                except Exception as exc:  # a bad round (a peer vanished mid-query) must not end NAT traversal
                    log.debug("nat round failed error=%r", exc)
                await trio.sleep(cfg.interval_s)

    async def _round(self) -> None:
        if self.config.autonat:
            await self.autonat.round()
        if self.needs_relay:
            await self._reserve_round()
        elif self.reservations:
            self.reservations.clear()  # publicly reachable: stop advertising relayed addrs
            self.relay_addrs = []

    async def _drive_hole_punches(self, dcutr: DCUtRProtocol) -> None:
        """Initiate DCUtR toward relayed-only peers whose id is larger than ours (bug 6)."""
        me = self.host.get_id().to_bytes()
        while True:
            await trio.sleep(HOLE_PUNCH_DRIVE_S)
            for peer_id, conns in list(self.host.get_network().connections.items()):
                conns = conns if isinstance(conns, list) else [conns]
                relayed_only = bool(conns) and all(conn_kind(c) == "relayed" for c in conns)
                if relayed_only and me < peer_id.to_bytes() and peer_id not in dcutr._in_progress:
                    try:
                        await dcutr.initiate_hole_punch(peer_id)
                    except Exception as exc:  # the peer went away mid-session: try the next one
                        log.debug("hole punch failed peer=%s error=%r", peer_id, exc)

    # ------------------------------------------------------------------ connections

    def peer_connections(self) -> dict[str, str]:
        """peer id -> "direct" | "relayed" (a peer with both counts as direct: streams prefer it)."""
        out: dict[str, str] = {}
        network = self.host.get_network()
        for peer_id, conns in list(getattr(network, "connections", {}).items()):
            conns = conns if isinstance(conns, list) else [conns]
            kinds = {conn_kind(c) for c in conns}
            if kinds:
                out[peer_id.to_base58()] = "direct" if "direct" in kinds else "relayed"
        return out

    async def dial_relayed(self, peer_id: ID, addrs: Sequence[multiaddr.Multiaddr]) -> bool:
        """Dial ``peer_id`` through one of its ``/p2p-circuit`` addrs (bugs 1-3 in the module docstring)."""
        if self._transport is None:
            return False
        # No /p2p-circuit addr known (DHT provider records may carry none): try the relays we hold a
        # reservation on; in a run that shares a bootstrap relay, the peer most likely holds one there too.
        own = [
            multiaddr.Multiaddr(f"{circuit}/p2p/{peer_id.to_base58()}")
            for relay, circuit in list(self.reservations.items())
            if relay != peer_id
        ]
        for addr in [*addrs, *own]:
            if not is_relayed_addr(addr):
                continue
            if addr.get_peer_id() != peer_id.to_base58():
                addr = addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id.to_base58()}"))
            try:
                with trio.fail_after(RESERVE_TIMEOUT_S):
                    conn = await self._dial_circuit(self._transport, addr, peer_id)
            except Exception as exc:
                self.counters["relay_dials_failed"] += 1
                log.debug("relayed dial failed peer=%s addr=%s error=%r", peer_id, addr, exc)
                continue
            with suppress(Exception):  # bug 3: tag it so peer_connections() and DCUtR's auto-drive see it
                conn.set_transport_info([addr], ConnectionType.RELAYED)
            self.counters["relay_dials_ok"] += 1
            log.info("connected via relay peer=%s addr=%s", peer_id, addr)
            return True
        return False

    async def _dial_circuit(
        self, transport: CircuitV2Transport, addr: multiaddr.Multiaddr, peer_id: ID
    ) -> Any:
        """`CircuitV2Transport.dial` with the swarm key applied before the upgrade (bug 2)."""
        relay_addr, _dest = transport.parse_circuit_ma(addr)
        relay = PeerInfo(ID.from_base58(str(relay_addr.get_peer_id())), [relay_addr])
        raw = await transport.dial_peer_info(dest_info=PeerInfo(peer_id, [addr]), relay_info=relay)
        return await self.host.upgrade_outbound_connection(protect(self.host, raw), peer_id)

    # ------------------------------------------------------------------ relay client

    def _install_addrs_factory(self) -> None:
        """Append our relayed addrs to what the host advertises (identify, DHT provider records; bug 4).

        Not through libp2p's ``addrs_factory``: ``BasicHost.get_addrs`` strips "any existing /p2p/ component"
        from the factory's output by decapsulating at the *first* /p2p/, which turns
        ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit`` into ``/ip4/R/tcp/P/p2p/<me>``: a wrong direct address (the
        relay's socket with our id) in identify and in the DHT, and no circuit address at all. So we wrap
        the instance's ``get_addrs`` and append the circuits, with our ``/p2p/<me>``, after that step.
        """
        original: Callable[[], list[multiaddr.Multiaddr]] = self.host.get_addrs
        me = multiaddr.Multiaddr(f"/p2p/{self.host.get_id().to_base58()}")

        def get_addrs() -> list[multiaddr.Multiaddr]:
            return list(original()) + [multiaddr.Multiaddr(a).encapsulate(me) for a in self.relay_addrs]

        self.host.get_addrs = get_addrs  # type: ignore[method-assign]

    async def _reserve_round(self) -> None:
        assert self._transport is not None and self._nursery is not None
        network = self.host.get_network()
        now = time.monotonic()
        for relay in list(self.reservations):
            if relay not in network.connections:
                del self.reservations[relay]  # relay gone: reserve elsewhere
        for peer_id, conns in list(network.connections.items()):
            if len(self.reservations) >= self.config.max_relays:
                break
            if peer_id in self.reservations or now < self._refused.get(peer_id, (0.0, 0.0))[0]:
                continue
            conns = conns if isinstance(conns, list) else [conns]
            direct = [c for c in conns if conn_kind(c) == "direct"]
            relay_addr = _remote_addr(direct[0]) if direct else None
            if relay_addr is None:
                continue
            if await self._reserve(peer_id):
                circuit = f"{relay_addr}/p2p/{peer_id.to_base58()}/p2p-circuit"
                self.reservations[peer_id] = circuit
                self._refused.pop(peer_id, None)
                self.counters["reservations"] += 1
                log.info("relay reservation ok relay=%s addr=%s", peer_id, circuit)
            else:
                self.counters["reservations_refused"] += 1
                backoff = min(NOT_A_RELAY_RETRY_S[1], 2 * self._refused.get(peer_id, (0.0, 0.0))[1])
                backoff = max(backoff, NOT_A_RELAY_RETRY_S[0])
                if len(self._refused) >= MAX_TRACKED_REFUSALS:
                    self._refused.clear()
                self._refused[peer_id] = (now + backoff, backoff)
        self.relay_addrs = sorted(set(self.reservations.values()))

    async def _reserve(self, peer_id: ID) -> bool:
        assert self._transport is not None and self._nursery is not None
        try:
            with trio.fail_after(RESERVE_TIMEOUT_S):
                stream = await self.host.new_stream(peer_id, [HOP_PROTOCOL_ID])
                try:
                    return bool(await self._transport.reserve(stream, peer_id, self._nursery))
                finally:
                    with suppress(Exception):
                        await stream.close()
        except Exception as exc:  # no HOP protocol, or it went away
            log.debug("peer is not a relay for us peer=%s error=%r", peer_id, exc)
            return False


# ---------------------------------------------------------------------------------------------- helpers


async def _run_service(service: Any) -> None:
    async with background_trio_service(service):
        await trio.sleep_forever()


def _remote_addr(conn: Any) -> str | None:
    """The relay's address as we reach it (ip4/tcp of a direct connection), or None."""
    with suppress(Exception):
        for addr in conn.get_transport_addresses():
            names = {p.name for p in addr.protocols()}
            if {"ip4", "tcp"} <= names and not is_relayed_addr(addr):
                return f"/ip4/{addr.value_for_protocol('ip4')}/tcp/{addr.value_for_protocol('tcp')}"
    with suppress(Exception):
        host, port = conn.muxed_conn.secured_conn.get_remote_address()
        return f"/ip4/{host}/tcp/{port}"
    return None
