"""AutoNAT v1 (trio side): learn whether this node is publicly reachable, and answer peers who ask.

Theory of operation
-------------------
Client: ask directly connected peers to dial us back (``/libp2p/autonat/1.0.0``). Verdicts: OK =
reachable, E_DIAL_ERROR = not reachable; refusals (relayed connection, address not on the requester's
observed IP, server busy) carry no information and are ignored. The status flips to ``public``/``private``
once ``confirmations`` distinct servers agree (py-libp2p's default is 4, the spec's "more than three"; a
training run often has only one or two public peers, so ours defaults to 1: a lying server can only make
us reserve a relay slot we did not need, or skip one we did). A verdict is trusted for `VERDICT_TTL_S`,
each peer is asked at most once per `ASK_INTERVAL_S`, and at most `QUERIES_PER_ROUND` peers per round:
in a run of hundreds of peers a node makes a few dial-back requests a minute, not hundreds.

Server: a request costs us a TCP dial and a Noise handshake, so it is rate limited per requester
(`SERVE_INTERVAL_PER_PEER_S`) and globally (`SERVE_PER_MINUTE`, kubo's default); over either the answer is
E_DIAL_REFUSED. We only ever dial the requester's own observed IP (no reflection at third parties).

py-libp2p 0.8.1 bugs worked around here (tests: tests/p2p/test_nat.py):

1. The stock server dials back with ``host.connect()``, which returns at once when a connection exists -
   and the requester is always connected (it just opened the stream). So every dial-back "succeeds" and
   a node behind NAT is told it is public. We serve our own handler: a fresh transport dial plus Noise
   handshake (proving the peer id) outside the swarm, then closed.
2. The stock client advertises ``host.get_addrs()``: behind NAT those are private addresses that never
   match the server's observed IP, so every server refuses and the status stays UNKNOWN forever. We add the
   predicted public address (observed WAN IP + listen port), which is what a dial-back must test.
3. With a swarm key (private network), the swarm wraps every raw connection in the pre-shared-key cipher
   before the security handshake, inbound and outbound. A dial-back made outside the swarm must do the same
   (`protect`), or every dial-back fails and every node reads "private". (And libp2p's `PskConn` hides the
   transport addresses that servers check: patched in p2p/_libp2p.py.)
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService, _addr_ip, _is_relayed_stream
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.network.connection.raw_connection import ConnectionType
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

if TYPE_CHECKING:
    from collections.abc import Callable

    from libp2p.abc import IHost, INetStream, IRawConnection
    from libp2p.peer.id import ID

__all__ = ["AutoNAT", "conn_kind", "protect", "swarm_psk"]

log = logging.getLogger(__name__)

MAX_MSG_BYTES = 64 * 1024  # an AutoNAT message is a peer id and a few addresses
QUERY_TIMEOUT_S = 15.0
DIAL_BACK_TIMEOUT_S = 5.0
MAX_DIAL_BACK_ADDRS = 4  # addresses tried per request (all on the requester's observed IP)
VERDICT_TTL_S = 900.0  # kubo re-probes every 15 min once confident
ASK_INTERVAL_S = 60.0  # the same peer is asked at most this often
QUERIES_PER_ROUND = 3  # peers asked per round (in parallel)
MAX_VERDICTS = 64  # verdicts kept (the most recent); status needs only a few
SERVE_INTERVAL_PER_PEER_S = 20.0  # kubo: 3 dial-backs per peer per minute
SERVE_PER_MINUTE = 30  # kubo's global throttle
MAX_TRACKED_REQUESTERS = 1024  # per-peer serve timestamps kept (then forgotten wholesale: bounded memory)


class AutoNAT:
    """AutoNAT client and server of one host (see the module docstring); ``clock`` injectable for tests."""

    def __init__(
        self, host: IHost, *, confirmations: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.host = host
        self.confirmations = confirmations
        self.status = "unknown"  # "public" | "private" | "unknown"
        self._clock = clock
        self._verdicts: dict[ID, tuple[bool, float]] = {}  # server -> (reachable?, when)
        self._asked: dict[ID, float] = {}
        self._served: dict[ID, float] = {}
        self._serve_tokens = float(SERVE_PER_MINUTE)
        self._serve_stamp = clock()
        self.counters = {"autonat_queries": 0, "autonat_served": 0, "autonat_refused_busy": 0}

    def verdicts(self) -> dict[ID, bool]:
        """Verdicts still trusted (younger than `VERDICT_TTL_S`)."""
        now = self._clock()
        return {p: ok for p, (ok, at) in list(self._verdicts.items()) if now - at < VERDICT_TTL_S}

    # ------------------------------------------------------------------ client

    async def round(self) -> None:
        """Ask up to `QUERIES_PER_ROUND` directly connected peers without a fresh verdict, then decide."""
        now = self._clock()
        fresh = self.verdicts()
        candidates = [
            peer_id
            for peer_id, conns in list(self.host.get_network().connections.items())
            if peer_id not in fresh
            and now - self._asked.get(peer_id, -1e18) >= ASK_INTERVAL_S
            and any(conn_kind(c) == "direct" for c in (conns if isinstance(conns, list) else [conns]))
        ][:QUERIES_PER_ROUND]  # servers refuse requests over relayed connections
        if candidates:
            addrs = [a for a in self.host.get_transport_addrs() if "/p2p-circuit" not in str(a)]
            raw = list(dict.fromkeys(a.to_bytes() for a in [*addrs, *self._predicted_public_addrs()]))
            async with trio.open_nursery() as nursery:
                for peer_id in candidates:
                    self._asked[peer_id] = now
                    nursery.start_soon(self._ask, peer_id, raw)
        if len(self._asked) > MAX_TRACKED_REQUESTERS:
            self._asked.clear()
        self._decide()

    async def _ask(self, peer_id: ID, raw_addrs: list[bytes]) -> None:
        verdict = await self.query(peer_id, raw_addrs)
        if verdict is None:
            return
        self._verdicts[peer_id] = (verdict, self._clock())
        if len(self._verdicts) > MAX_VERDICTS:
            oldest = min(self._verdicts, key=lambda p: self._verdicts[p][1])
            del self._verdicts[oldest]

    def _decide(self) -> None:
        verdicts = self.verdicts()
        ok = sum(verdicts.values())
        bad = len(verdicts) - ok
        if ok >= self.confirmations and ok >= bad:
            self.status = "public"
        elif bad >= self.confirmations and bad > ok:
            self.status = "private"

    async def query(self, peer_id: ID, raw_addrs: list[bytes]) -> bool | None:
        """One DIAL request: True (reachable), False (dial-back failed) or None (no information)."""
        request = Message()
        request.type = Message.DIAL
        request.dial.peer.id = self.host.get_id().to_bytes()
        request.dial.peer.addrs.extend(raw_addrs)
        self.counters["autonat_queries"] += 1
        stream: INetStream | None = None
        try:
            with trio.fail_after(QUERY_TIMEOUT_S):
                stream = await self.host.new_stream(peer_id, [AUTONAT_PROTOCOL_ID])
                await stream.write(encode_varint_prefixed(request.SerializeToString()))
                data = await read_varint_prefixed_bytes_limited(stream, MAX_MSG_BYTES)
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

    def _predicted_public_addrs(self) -> list[multiaddr.Multiaddr]:
        """Observed WAN IPs (even from a single observer) with our TCP listen ports (bug 2)."""
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return []
        ports = {int(a.value_for_protocol("tcp")) for a in self.host.get_transport_addrs() if _has(a, "tcp")}
        out: list[multiaddr.Multiaddr] = []
        with suppress(Exception):
            for obs in manager.addrs(min_observers=1):
                if "/p2p-circuit" in str(obs) or not _has(obs, "ip4"):
                    continue
                ip = obs.value_for_protocol("ip4")
                out.extend(multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}") for port in sorted(ports))
        return out

    # ------------------------------------------------------------------ server

    def _admit_request(self, peer_id: ID) -> bool:
        now = self._clock()
        self._serve_tokens = min(
            float(SERVE_PER_MINUTE), self._serve_tokens + (now - self._serve_stamp) * SERVE_PER_MINUTE / 60.0
        )
        self._serve_stamp = now
        if now - self._served.get(peer_id, -1e18) < SERVE_INTERVAL_PER_PEER_S or self._serve_tokens < 1.0:
            self.counters["autonat_refused_busy"] += 1
            return False
        if len(self._served) >= MAX_TRACKED_REQUESTERS:
            self._served.clear()
        self._served[peer_id] = now
        self._serve_tokens -= 1.0
        return True

    async def serve(self, stream: INetStream) -> None:
        """Our AutoNAT v1 server: a real, fresh dial-back (bugs 1 and 3), rate limited."""
        try:
            with trio.fail_after(QUERY_TIMEOUT_S):
                data = await read_varint_prefixed_bytes_limited(stream, MAX_MSG_BYTES)
                request = Message()
                request.ParseFromString(data)
                response = Message()
                response.type = Message.DIAL_RESPONSE
                response.dialResponse.status = await self._answer(stream, request, response)
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as exc:
            log.debug("autonat request failed error=%r", exc)
        finally:
            with suppress(Exception):
                await stream.close()

    async def _answer(self, stream: INetStream, request: Message, response: Message) -> Any:
        observed = AutoNATService._observed_ip(stream)
        if request.type != Message.DIAL:
            return Message.E_BAD_REQUEST
        if _is_relayed_stream(stream) or observed is None:
            return Message.E_DIAL_REFUSED
        peer_id = stream.muxed_conn.peer_id
        candidates = [
            multiaddr.Multiaddr(a)
            for a in AutoNATService._filter_by_observed_ip(list(request.dial.peer.addrs), observed)
        ]
        candidates = [a for a in candidates if _addr_ip(a) == observed and "/p2p-circuit" not in str(a)]
        if not candidates or not self._admit_request(peer_id):
            return Message.E_DIAL_REFUSED
        self.counters["autonat_served"] += 1
        reached = await self._dial_back(peer_id, candidates[:MAX_DIAL_BACK_ADDRS])
        if reached is None:
            return Message.E_DIAL_ERROR
        response.dialResponse.addr = reached.to_bytes()
        return Message.OK

    async def _dial_back(self, peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> multiaddr.Multiaddr | None:
        """A fresh TCP dial + Noise handshake to ``peer_id``, not registered in the swarm, then closed."""
        network: Any = self.host.get_network()
        for addr in addrs:
            raw = None
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT_S):
                    transport = network.transport_manager.transport_for_dialing(addr)
                    raw = protect(self.host, await transport.dial(addr))  # bug 3
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


def swarm_psk(host: IHost) -> str | None:
    """The swarm's pre-shared key (hex), if this is a private network (p2p/_security.py)."""
    return getattr(host.get_network(), "psk", None)


def protect(host: IHost, raw: IRawConnection) -> IRawConnection:
    """Wrap a raw connection made outside the swarm the way the swarm wraps its own (pnet, if any)."""
    psk = swarm_psk(host)
    return new_protected_conn(raw, psk) if psk is not None else raw


def conn_kind(conn: Any) -> str:
    """The kind of one swarm connection: "direct" or "relayed"."""
    with suppress(Exception):
        if any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses()):
            return "relayed"
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return "relayed"
    return "direct"


def _has(addr: multiaddr.Multiaddr, proto: str) -> bool:
    return any(p.name == proto for p in addr.protocols())
