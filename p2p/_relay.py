"""Circuit Relay v2 *service* (trio side): who we relay for, when, and within which limits.

Theory of operation
-------------------
A publicly reachable node relays for peers behind NAT: they reserve a slot on it, advertise
``<relay>/p2p-circuit`` addresses, and other peers reach them through it until DCUtR punches a direct
connection (p2p/_nat.py). Two NATed peers that know only a public bootstrap node can connect at all only if
that node relays, so, as in kubo/go-libp2p, relaying is on by default *while AutoNAT says we are public*
(``relay_service = "auto"``); "on" relays regardless (a node that knows it is public), "off" never.

We serve the HOP protocol ourselves and hand each stream to py-libp2p's `CircuitV2Protocol` (built with
``allow_hop=False``, so libp2p registers no HOP handler of its own): the handler is registered once and
decides per stream, so "auto" follows reachability without re-registering handlers. While inactive it
answers PERMISSION_DENIED; a client retries later (p2p/_nat.py backs off per relay).

Limits (``NatConfig.relay_*``), enforced by libp2p's `RelayResourceManager` and circuit loop:
reservations held at once (beyond the cap: RESOURCE_LIMIT_EXCEEDED), circuits per reserving peer, and per
circuit a byte budget (both directions together) and a duration, after which both ends are reset. The
defaults are far above go-libp2p's (2 min, 128 KiB per circuit, meant for hole-punch coordination only):
here a peer behind a symmetric NAT stays in the run through the relay, so a circuit must carry sync
traffic; a cut circuit is simply redialled by discovery.

py-libp2p 0.8.1 bug worked around here: the circuit duration is checked only when data arrives, so an idle
circuit outlives its limit forever. Each HOP stream runs under our own deadline (duration plus a grace
second); when it fires, both streams of the circuit are reset. Tests: tests/p2p/test_nat.py (loopback),
tests/p2p/test_nat_netns.py (through NATs).
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import trio
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import write_delimited_msg

if TYPE_CHECKING:
    from collections.abc import Callable

    from libp2p.abc import IHost, INetStream
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

__all__ = ["RelayService"]

log = logging.getLogger(__name__)

CUT_GRACE_S = 1.0  # past the circuit duration: libp2p's own check gets the first chance to send its status
RESET_TIMEOUT_S = 2.0  # resetting the two streams of a cut circuit


class RelayService:
    """Serves HOP for one host per ``mode`` and the current reachability; counts what it did."""

    def __init__(
        self,
        host: IHost,
        protocol: CircuitV2Protocol,
        *,
        mode: str,
        circuit_duration_s: float,
        reachability: Callable[[], str],
    ) -> None:
        self.host = host
        self.protocol = protocol
        self.mode = mode
        self.circuit_duration_s = circuit_duration_s
        self._reachability = reachability
        self.circuits = 0  # HOP streams being served now (a CONNECT holds its stream for the circuit's life)
        self._cut: set[int] = set()  # ids of HOP streams whose circuit libp2p cut (and counted) itself
        self.counters = {
            "relay_refused_inactive": 0,
            "relay_reservations_refused": 0,
            "relay_circuits_cut_bytes": 0,
            "relay_circuits_cut_duration": 0,
        }
        self._count_libp2p_refusals()

    @property
    def active(self) -> bool:
        return self.mode == "on" or (self.mode == "auto" and self._reachability() == "public")

    def register(self) -> None:
        """(Trio thread) install the HOP handler, unless the mode is "off" (then we do not speak HOP)."""
        if self.mode != "off":
            self.host.set_stream_handler(HOP_PROTOCOL_ID, self.serve_hop)

    def reservations(self) -> int:
        manager: Any = self.protocol.resource_manager
        with suppress(Exception):
            manager._clean_expired()
        return len(getattr(manager, "_reservations", {}))

    def describe(self) -> dict[str, Any]:
        limits = self.protocol.limits
        return {
            "mode": self.mode,
            "active": self.active,
            "reservations": self.reservations(),
            "circuits": self.circuits,
            "limits": {
                "max_reservations": limits.max_reservations,
                "max_circuits_per_peer": limits.max_circuit_conns,
                "circuit_duration_s": limits.duration,
                "circuit_bytes": limits.data,
            },
            "counters": dict(self.counters),
        }

    # ------------------------------------------------------------------ HOP

    async def serve_hop(self, stream: INetStream) -> None:
        if not self.active:
            self.counters["relay_refused_inactive"] += 1
            with trio.move_on_after(RESET_TIMEOUT_S), suppress(Exception):
                status = to_proto_status(StatusCode.PERMISSION_DENIED)
                await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=status))
                await stream.close()
            return
        self.circuits += 1
        try:
            with trio.move_on_after(self.circuit_duration_s + CUT_GRACE_S) as deadline:
                await self.protocol._handle_hop_stream(stream)
            if deadline.cancelled_caught:
                # An idle circuit past its duration (bug in the module docstring); or one libp2p cut itself
                # whose other direction still waits on its read: then it is counted already.
                if id(stream) not in self._cut:
                    self.counters["relay_circuits_cut_duration"] += 1
                await self._reset_circuit(stream)
        finally:
            self.circuits -= 1
            self._cut.discard(id(stream))

    async def _reset_circuit(self, source: INetStream) -> None:
        streams: list[Any] = [source]
        active: dict[ID, tuple[Any, Any]] = self.protocol._active_relays
        for peer, (src, dst) in list(active.items()):
            if src is source:
                streams.append(dst)
                active.pop(peer, None)
        with trio.CancelScope(shield=True), trio.move_on_after(RESET_TIMEOUT_S):
            for s in streams:
                if s is not None:
                    with suppress(Exception):
                        await s.reset()

    def _count_libp2p_refusals(self) -> None:
        """Count the limits libp2p enforces itself (reservation cap, circuit bytes and duration)."""
        manager: Any = self.protocol.resource_manager
        can_accept = manager.can_accept_reservation

        def can_accept_reservation(peer_id: ID) -> bool:
            ok = bool(can_accept(peer_id))
            if not ok:
                self.counters["relay_reservations_refused"] += 1
            return ok

        manager.can_accept_reservation = can_accept_reservation
        send_status = self.protocol._send_status

        async def counting_send_status(
            stream: Any, code: StatusCode, message: str, *rest: Any, **kw: Any
        ) -> None:
            reason = message.lower()
            if code == StatusCode.RESOURCE_LIMIT_EXCEEDED and ("data" in reason or "duration" in reason):
                kind = "bytes" if "data" in reason else "duration"
                self.counters[f"relay_circuits_cut_{kind}"] += 1
                active: dict[Any, tuple[Any, Any]] = self.protocol._active_relays
                hop = next((src for src, dst in list(active.values()) if stream in (src, dst)), None)
                if hop is not None:  # the circuit's HOP stream, which serve_hop knows it by
                    self._cut.add(id(hop))
            await send_status(stream, code, message, *rest, **kw)

        self.protocol._send_status = counting_send_status  # type: ignore[method-assign]
