"""NAT traversal (trio side): AutoNAT v1, Circuit Relay v2 and DCUtR hole punching on one libp2p host.

Theory of operation
-------------------
A node behind a NAT can dial out but cannot be dialled. Three protocols fix that, all from py-libp2p 0.8.1:

* **AutoNAT v1** (``/libp2p/autonat/1.0.0``) tells a node whether it is publicly reachable: it asks
  connected peers to dial it back. Every node with ``autonat`` on also *serves* dial-backs. Verdicts:
  OK = reachable, E_DIAL_ERROR = not reachable; refusals (relayed connection, address not on the
  requester's observed IP) carry no information and are ignored. The status flips to ``public``/``private``
  once ``confirmations`` distinct servers agree (py-libp2p's default is 4, the spec's "more than three";
  a training run often has only one or two public peers, so ours defaults to 1 and is configurable: a lying
  server can only make us reserve a relay slot we did not need, or skip one we did).
* **Circuit Relay v2**: a node with ``relay_service`` serves HOP (limits in `RelayLimits` below). A node with
  ``use_relays`` whose reachability is not ``public`` reserves a slot on up to ``max_relays`` connected relays
  and advertises ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<me>`` (through the host's addrs factory, so
  identify and the DHT provider records carry it). Peers that cannot dial us directly dial that address.
* **DCUtR** (``/libp2p/dcutr``): over a relayed connection both sides exchange their predicted public
  addresses (the relay-observed WAN IP with our *listen* port, since hole-punch dials leave from the listen
  port with SO_REUSEPORT) and dial each other at the same time (TCP simultaneous open). When it works, the
  direct connection replaces the relayed one; py-libp2p's service drives this for every relayed peer.

py-libp2p 0.8.1 bugs worked around here (see tests/p2p/test_nat.py):

1. AutoNAT's server dials back with ``host.connect()``, which returns at once when a connection to the peer
   exists - and the requester is always connected (it just opened the stream). So every dial-back
   "succeeds" and a node behind NAT is told it is public. We serve our own handler that makes a fresh
   transport dial plus Noise handshake (proving the peer id) outside the swarm, then closes it.
2. AutoNAT's client advertises ``host.get_addrs()``: behind NAT those are private addresses that never match
   the server's observed IP, so every server refuses and the status stays UNKNOWN forever. We add the
   predicted public address (observed WAN IP + listen port), which is what a dial-back must test.
3. The swarm drops every ``/p2p-circuit`` address in ``dial_peer`` ("this node has no relay transport"),
   even when one exists, so ``host.connect()`` can never dial a relayed address. We dial those through
   `CircuitV2Transport.dial` ourselves (`dial_relayed`) and tag the connection as relayed.
4. Outbound relayed connections are not tagged as relayed (only inbound ones are), so DCUtR's auto-drive
   never sees them; we tag them (``set_transport_info``) after the dial.
5. ``BasicHost.get_addrs`` mangles every ``/p2p-circuit`` address an ``addrs_factory`` returns into a
   direct address of the relay with our peer id (`_install_addrs_factory`), so identify and DHT provider
   records never carried a circuit. We wrap ``get_addrs`` instead.
6. Kademlia ``find_providers`` answers from the local store whenever it is non-empty, and ``provide``
   puts our own record there: a node never asks the network again (worked around in p2p/_discovery.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService, _addr_ip, _is_relayed_stream
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.network.connection.raw_connection import ConnectionType
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

if TYPE_CHECKING:
    from libp2p.abc import IHost

__all__ = ["NatConfig", "NatService", "is_relayed_addr"]

log = logging.getLogger(__name__)

AUTONAT_MAX_MSG_BYTES = 64 * 1024
AUTONAT_QUERY_TIMEOUT_S = 15.0
DIAL_BACK_TIMEOUT_S = 5.0
RESERVE_TIMEOUT_S = 10.0
NOT_A_RELAY_RETRY_S = 300.0  # a peer that refused HOP is asked again after this long


@dataclass(frozen=True, slots=True, kw_only=True)
class NatConfig:
    """What NAT traversal a node does (see the module docstring). All off by default: opt in per host."""

    autonat: bool = False
    relay_service: bool = False
    use_relays: bool = False
    hole_punch: bool = False
    autonat_confirmations: int = 1
    max_relays: int = 2
    interval_s: float = 5.0
    relay_max_circuits: int = 16
    relay_max_reservations: int = 64
    relay_circuit_duration_s: int = 3600
    relay_circuit_bytes: int = 256 * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.autonat or self.relay_service or self.use_relays or self.hole_punch


def is_relayed_addr(addr: object) -> bool:
    return "/p2p-circuit" in str(addr)


class NatService:
    """Runs AutoNAT, relay (service and client) and DCUtR for one host; owned by the node's nursery."""

    def __init__(self, host: IHost, config: NatConfig) -> None:
        self.host = host
        self.config = config
        self.status = "unknown"  # "public" | "private" | "unknown"
        self.verdicts: dict[ID, bool] = {}  # autonat server -> reachable?
        self.relay_addrs: list[str] = []  # our advertised /p2p-circuit addrs (without /p2p/<me>)
        self.reservations: dict[ID, str] = {}  # relay -> circuit addr
        self.not_relays: dict[ID, float] = {}  # peer -> monotonic time it refused HOP
        self.counters = {
            "autonat_queries": 0,
            "relay_dials_ok": 0,
            "relay_dials_failed": 0,
            "reservations": 0,
        }
        self._transport: CircuitV2Transport | None = None
        self._dcutr: DCUtRProtocol | None = None
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        limits = RelayLimits(
            duration=cfg.relay_circuit_duration_s,
            data=cfg.relay_circuit_bytes,
            max_circuit_conns=cfg.relay_max_circuits,
            max_reservations=cfg.relay_max_reservations,
        )
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if cfg.relay_service else RelayRole(0))
        protocol = CircuitV2Protocol(self.host, limits=limits, allow_hop=cfg.relay_service)
        if cfg.autonat:
            self.host.set_stream_handler(AUTONAT_PROTOCOL_ID, self._serve_autonat)
        self._install_addrs_factory()
        async with background_trio_service(protocol), trio.open_nursery() as nursery:
            self._nursery = nursery
            self._transport = CircuitV2Transport(self.host, protocol, RelayConfig(roles=roles, limits=limits))
            if cfg.hole_punch:
                self._dcutr = DCUtRProtocol(self.host)
                nursery.start_soon(_run_service, self._dcutr)
            task_status.started()
            while True:
                try:
                    await self._round()
                except (
                    Exception
                ) as exc:  # one bad round (a peer vanished mid-query) must not end NAT traversal
                    log.debug("nat round failed error=%r", exc)
                await trio.sleep(cfg.interval_s)

    async def _round(self) -> None:
        if self.config.autonat:
            await self._autonat_round()
        if self.config.use_relays and self.status != "public":
            await self._reserve_round()
        elif self.reservations and self.status == "public":
            self.reservations.clear()  # publicly reachable: stop advertising relayed addrs
            self.relay_addrs = []

    # ------------------------------------------------------------------ connections

    def peer_connections(self) -> dict[str, str]:
        """peer id -> "direct" | "relayed" (a peer with both counts as direct: streams prefer it)."""
        out: dict[str, str] = {}
        network = self.host.get_network()
        for peer_id, conns in list(getattr(network, "connections", {}).items()):
            conns = conns if isinstance(conns, list) else [conns]
            kinds = {_conn_kind(c) for c in conns}
            if kinds:
                out[peer_id.to_base58()] = "direct" if "direct" in kinds else "relayed"
        return out

    async def dial_relayed(self, peer_id: ID, addrs: Sequence[multiaddr.Multiaddr]) -> bool:
        """Dial ``peer_id`` through one of its ``/p2p-circuit`` addrs (bug 3 in the module docstring)."""
        transport = self._transport
        if transport is None:
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
                    conn = await transport.dial(addr)
            except Exception as exc:
                self.counters["relay_dials_failed"] += 1
                log.debug("relayed dial failed peer=%s addr=%s error=%r", peer_id, addr, exc)
                continue
            with suppress(
                Exception
            ):  # bug 4: tag it so peer_connections() and DCUtR's auto-drive see "relayed"
                conn.set_transport_info([addr], ConnectionType.RELAYED)  # type: ignore[attr-defined]
            self.counters["relay_dials_ok"] += 1
            log.info("connected via relay peer=%s addr=%s", peer_id, addr)
            return True
        return False

    # ------------------------------------------------------------------ relay client

    def _install_addrs_factory(self) -> None:
        """Append our relayed addrs to what the host advertises (identify, DHT provider records; bug 5).

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
            if peer_id in self.reservations or now - self.not_relays.get(peer_id, -1e9) < NOT_A_RELAY_RETRY_S:
                continue
            conns = conns if isinstance(conns, list) else [conns]
            direct = [c for c in conns if _conn_kind(c) == "direct"]
            if not direct:
                continue
            relay_addr = _remote_addr(direct[0])
            if relay_addr is None:
                continue
            try:
                with trio.fail_after(RESERVE_TIMEOUT_S):
                    stream = await self.host.new_stream(peer_id, [HOP_PROTOCOL_ID])
                    try:
                        ok = await self._transport.reserve(stream, peer_id, self._nursery)
                    finally:
                        with suppress(Exception):
                            await stream.close()
            except Exception as exc:
                log.debug("peer is not a relay for us peer=%s error=%r", peer_id, exc)
                ok = False
            if not ok:
                self.not_relays[peer_id] = now
                continue
            circuit = f"{relay_addr}/p2p/{peer_id.to_base58()}/p2p-circuit"
            self.reservations[peer_id] = circuit
            self.counters["reservations"] += 1
            log.info("relay reservation ok relay=%s addr=%s", peer_id, circuit)
        self.relay_addrs = sorted(set(self.reservations.values()))

    # ------------------------------------------------------------------ AutoNAT client

    def _predicted_public_addrs(self) -> list[multiaddr.Multiaddr]:
        """Observed WAN IPs (even from a single observer) with our TCP listen ports (bug 2)."""
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return []
        ports = {int(a.value_for_protocol("tcp")) for a in self.host.get_transport_addrs() if _has(a, "tcp")}
        out: list[multiaddr.Multiaddr] = []
        with suppress(Exception):
            for obs in manager.addrs(min_observers=1):
                if is_relayed_addr(obs) or not _has(obs, "ip4"):
                    continue
                ip = obs.value_for_protocol("ip4")
                out.extend(multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}") for port in sorted(ports))
        return out

    async def _autonat_round(self) -> None:
        network = self.host.get_network()
        addrs = [a for a in self.host.get_transport_addrs() if not is_relayed_addr(a)]
        addrs += self._predicted_public_addrs()
        raw = list(dict.fromkeys(a.to_bytes() for a in addrs))
        for peer_id, conns in list(network.connections.items()):
            conns = conns if isinstance(conns, list) else [conns]
            if not any(_conn_kind(c) == "direct" for c in conns):
                continue  # servers refuse requests over relayed connections
            verdict = await self._query(peer_id, raw)
            if verdict is not None:
                self.verdicts[peer_id] = verdict
        ok = sum(self.verdicts.values())
        bad = len(self.verdicts) - ok
        need = self.config.autonat_confirmations
        if ok >= need and ok >= bad:
            self.status = "public"
        elif bad >= need and bad > ok:
            self.status = "private"

    async def _query(self, peer_id: ID, raw_addrs: list[bytes]) -> bool | None:
        request = Message()
        request.type = Message.DIAL
        request.dial.peer.id = self.host.get_id().to_bytes()
        request.dial.peer.addrs.extend(raw_addrs)
        self.counters["autonat_queries"] += 1
        stream: INetStream | None = None
        try:
            with trio.fail_after(AUTONAT_QUERY_TIMEOUT_S):
                stream = await self.host.new_stream(peer_id, [AUTONAT_PROTOCOL_ID])
                await stream.write(encode_varint_prefixed(request.SerializeToString()))
                data = await read_varint_prefixed_bytes_limited(stream, AUTONAT_MAX_MSG_BYTES)
        except Exception as exc:  # peer without autonat, or it went away: no verdict
            log.debug("autonat query failed peer=%s error=%r", peer_id, exc)
            return None
        finally:
            if stream is not None:
                with suppress(Exception):
                    await stream.close()
        response = Message()
        response.ParseFromString(data)
        status = response.dialResponse.status
        if status == Message.OK:
            return True
        if status == Message.E_DIAL_ERROR:
            return False
        return None  # refused / bad request / internal error: says nothing about us

    # ------------------------------------------------------------------ AutoNAT server

    async def _serve_autonat(self, stream: INetStream) -> None:
        """Our AutoNAT v1 server: a real, fresh dial-back (bug 1 in the module docstring)."""
        try:
            with trio.fail_after(AUTONAT_QUERY_TIMEOUT_S):
                data = await read_varint_prefixed_bytes_limited(stream, AUTONAT_MAX_MSG_BYTES)
                request = Message()
                request.ParseFromString(data)
                response = Message()
                response.type = Message.DIAL_RESPONSE
                observed = AutoNATService._observed_ip(stream)
                if request.type != Message.DIAL:
                    response.dialResponse.status = Message.E_BAD_REQUEST
                elif _is_relayed_stream(stream) or observed is None:
                    response.dialResponse.status = Message.E_DIAL_REFUSED
                else:
                    peer_id = stream.muxed_conn.peer_id
                    candidates = [
                        multiaddr.Multiaddr(a)
                        for a in AutoNATService._filter_by_observed_ip(
                            list(request.dial.peer.addrs), observed
                        )
                    ]
                    candidates = [a for a in candidates if _addr_ip(a) == observed and not is_relayed_addr(a)]
                    if not candidates:
                        response.dialResponse.status = Message.E_DIAL_REFUSED
                    else:
                        reached = await self._dial_back(peer_id, candidates[:4])
                        if reached is None:
                            response.dialResponse.status = Message.E_DIAL_ERROR
                        else:
                            response.dialResponse.status = Message.OK
                            response.dialResponse.addr = reached.to_bytes()
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as exc:
            log.debug("autonat request failed error=%r", exc)
        finally:
            with suppress(Exception):
                await stream.close()

    async def _dial_back(self, peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> multiaddr.Multiaddr | None:
        """A fresh TCP dial + Noise handshake to ``peer_id``, not registered in the swarm, then closed."""
        network: Any = self.host.get_network()
        for addr in addrs:
            raw = None
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT_S):
                    transport = network.transport_manager.transport_for_dialing(addr)
                    raw = await transport.dial(addr)
                    secured = await network.upgrader.upgrade_security(raw, True, peer_id)
                    await secured.close()
                return addr
            except Exception as exc:
                log.debug("autonat dial-back failed peer=%s addr=%s error=%r", peer_id, addr, exc)
                if raw is not None:
                    with suppress(Exception):
                        await raw.close()
        return None


# ---------------------------------------------------------------------------------------------- helpers


async def _run_service(service: Any) -> None:
    async with background_trio_service(service):
        await trio.sleep_forever()


def _conn_kind(conn: Any) -> str:
    with suppress(Exception):
        if any(is_relayed_addr(a) for a in conn.get_transport_addresses()):
            return "relayed"
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return "relayed"
    return "direct"


def _remote_addr(conn: Any) -> str | None:
    """The relay's address as we reach it (ip4/tcp of a direct connection), or None."""
    with suppress(Exception):
        for addr in conn.get_transport_addresses():
            if _has(addr, "ip4") and _has(addr, "tcp") and not is_relayed_addr(addr):
                return f"/ip4/{addr.value_for_protocol('ip4')}/tcp/{addr.value_for_protocol('tcp')}"
    with suppress(Exception):
        host, port = conn.muxed_conn.secured_conn.get_remote_address()  # type: ignore[attr-defined]
        return f"/ip4/{host}/tcp/{port}"
    return None


def _has(addr: multiaddr.Multiaddr, proto: str) -> bool:
    return any(p.name == proto for p in addr.protocols())
