"""Gossip hygiene: author admission and per-topic validators before forwarding, and gossipsub v1.1 scores.

Theory of operation
-------------------
Every gossip message from another author passes these gates *before* it is delivered to our subscribers or
forwarded to any mesh peer. The first is ours, in front of py-libp2p's `Pubsub.push_msg`
(`GossipValidators.attach` wraps the instance's ``push_msg``); the others are libp2p's, in its order:

1. author admission (`PeerGate`, p2p/_security.py), on the *claimed* author, before any crypto: a
   duplicate is dropped as libp2p would (no budget spent on it); an author off the allowlist is refused
   and its forwarder charged like an invalid message (honest members share the allowlist and verify before
   forwarding, so only a faulty member forwards it); a banned author, or one the daemon's admission hook
   (`Host.set_gossip_admission`: on open runs, "is this peer in my run?") refuses, is dropped without
   charging anyone (a forwarder may know a member we have not met yet). Then the signature is checked and
   the author's rate budget is spent: over budget, dropped without charge. A flood of throwaway keys so
   costs us one set lookup per message, and never reaches the rest of the mesh;
2. the forwarding peer's score must be above ``publish_threshold`` (gossipsub v1.1 scoring, below);
3. strict signing: the author's signature over the message (Ed25519, the peer's libp2p key) must verify
   and match ``from`` (``Pubsub(strict_signing=True)``, set explicitly in p2p/_libp2p.py);
4. the topic validator registered here: the daemon's ``fn(from_peer, data) -> bool`` (schema, size ...).
   False, or an exception, rejects the message: it is neither delivered nor forwarded, and the
   *forwarding* peer's P4 ("invalid messages") score counter goes up.

Why a wrapper and not a libp2p topic validator for step 1: py-libp2p 0.8.1 validators return a bool, i.e.
accept or *reject*, and every rejection charges the forwarder (and is cached: each later forwarder of the
same message is charged too). Refusals that are not the forwarder's fault (rate, admission) need go's
"ignore", which only a check in front of ``push_msg`` can give. A validator also runs only after the
signature check, which a throwaway-key flood should not get for free. The price: the signature of an
admitted message is verified twice (ours before the rate budget, so forged messages cannot spend an
honest author's budget, then libp2p's): 42 us each, measured.

Validators run synchronously in the Host's trio thread, on the libp2p read path of the peer that sent the
message (no thread hop per message, which at 50-100 msg/s would add a loop round trip to every delivery).
So a validator must be fast (microseconds: decode a header, check sizes, look up a set), must not block,
and must only *read* shared state (dict/set reads are atomic under the GIL). Our own publishes go through
the same validator (libp2p validates locally published messages too): an invalid local publish is dropped
and counted, which surfaces a daemon bug instead of spreading it.

py-libp2p 0.8.1 bug (worked around here): a *synchronous* topic validator that raises is not caught by
`Pubsub.validate_msg` (only async validators are wrapped). `push_msg` runs as a task of the Pubsub service,
so the exception crashes the whole Pubsub service, which tears down the libp2p host and our trio thread:
one malformed message that trips a daemon bug would kill the node. Our wrapper turns exceptions into a
rejection and counts them (``gossip_validator_errors``). Tests: tests/p2p/test_gossip.py
(test_libp2p_raising_validator_kills_the_host shows the bug, test_validator_exception_rejects the fix).

Peer scoring (`score_params`): py-libp2p ships scoring with every weight 0 and every threshold -inf, i.e.
off. Our weights make one invalid message cost 10 points (decaying with a ~70 s half-life), reward first
deliveries, and put the thresholds at gossip -20 < 0, publish -50, graylist -80: a peer that forwards a
handful of invalid messages stops being gossiped to, then has its messages ignored, then is graylisted,
while an honest peer's occasional stale message is forgiven within a minute or two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import signature_validator
from libp2p.pubsub.score import ScoreParams, TopicScoreParams

if TYPE_CHECKING:
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import Pubsub

    from p2p._security import PeerGate

__all__ = ["GossipValidator", "GossipValidators", "score_params"]

log = logging.getLogger(__name__)

GossipValidator = Callable[[str, bytes], bool]  # (author peer id, payload) -> accept?

# Per-heartbeat (1 s) decay factors: 0.99 ~ 70 s half-life, 0.9 ~ 7 s.
SLOW_DECAY = 0.99
FAST_DECAY = 0.9
IP_COLOCATION_THRESHOLD = 64  # peers behind one IP before P7 applies: local clusters share 127.0.0.1


def score_params() -> ScoreParams:
    """gossipsub v1.1 score parameters with non-zero weights (see the module docstring for the intent)."""
    return ScoreParams(
        p1_time_in_mesh=TopicScoreParams(weight=0.1, cap=10.0, decay=SLOW_DECAY),
        p2_first_message_deliveries=TopicScoreParams(weight=1.0, cap=20.0, decay=FAST_DECAY),
        p3_mesh_message_deliveries=TopicScoreParams(weight=0.1, cap=20.0, decay=FAST_DECAY),
        p4_invalid_messages=TopicScoreParams(weight=10.0, cap=100.0, decay=SLOW_DECAY),
        p5_behavior_penalty_weight=1.0,
        p5_behavior_penalty_decay=SLOW_DECAY,
        p5_behavior_penalty_threshold=5.0,  # libp2p adds 5 per IHAVE/IWANT spam event, 10 per GRAFT flood
        p6_appl_slack_weight=1.0,  # used only if the daemon later installs an app_specific_score_fn
        p6_appl_slack_decay=SLOW_DECAY,
        p7_ip_colocation_weight=1.0,
        p7_ip_colocation_threshold=IP_COLOCATION_THRESHOLD,
        publish_threshold=-50.0,
        gossip_threshold=-20.0,
        graylist_threshold=-80.0,
        accept_px_threshold=10.0,  # we do not do peer exchange; if enabled, only from well-scored peers
    )


class GossipValidators:
    """Author admission and the daemon's per-topic validators, installed into libp2p's Pubsub (trio thread).

    `set` may be called from the asyncio side at any time: the function is looked up per message, and the
    libp2p-side wrapper for a new topic is installed by `install` in the trio thread.
    """

    def __init__(self, gate: PeerGate) -> None:
        self._gate = gate
        self._fns: dict[str, GossipValidator] = {}
        self._pubsub: Pubsub | None = None
        self.rejected = 0  # validator said no (counted per message and per receiving host)
        self.errors = 0  # validator raised (also rejected)

    def set(self, topic: str, fn: GossipValidator | None) -> None:
        if fn is None:
            self._fns.pop(topic, None)
        else:
            self._fns[topic] = fn

    def attach(self, pubsub: Pubsub) -> None:
        """(Trio thread) start validating on ``pubsub``: author admission, and every topic set so far."""
        self._pubsub = pubsub
        stock_push_msg = pubsub.push_msg

        async def push_msg(forwarder: ID, msg: rpc_pb2.Message) -> None:
            if self.admit(pubsub, forwarder, msg):
                await stock_push_msg(forwarder, msg)

        pubsub.push_msg = push_msg  # type: ignore[method-assign]
        for topic in list(self._fns):
            self.install(topic)

    def admit(self, pubsub: Pubsub, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """Step 1 of the module docstring: may libp2p verify, deliver and forward ``msg``? (sync, cheap)"""
        me = pubsub.my_id
        if forwarder == me:
            return True  # our own publish: the topic validator still checks it
        if pubsub._is_msg_seen(msg):
            return False  # libp2p drops it next anyway; a duplicate must not spend the author's budget
        try:
            author = ID(msg.from_id)
        except Exception:
            return True  # unparseable author: libp2p's signature check refuses it
        if author == me:
            return True  # "from us" but forwarded: libp2p drops it after its checks
        refusal = self._gate.refuse_gossip_author(author.to_base58())
        if refusal == "not_member":
            self._charge(pubsub, forwarder, msg)
        if refusal is not None:
            return False
        if pubsub.strict_signing and not signature_validator(msg):
            return False  # forged: libp2p would drop it silently too
        return self._gate.admit_gossip_rate(author.to_base58())

    @staticmethod
    def _charge(pubsub: Pubsub, forwarder: ID, msg: rpc_pb2.Message) -> None:
        """Count an invalid message against ``forwarder`` (P4), as a rejecting libp2p validator would."""
        scorer = getattr(pubsub.router, "scorer", None)
        if scorer is not None:
            for topic in msg.topicIDs:
                scorer.on_invalid_message(forwarder, topic)

    def install(self, topic: str) -> None:
        """(Trio thread) register the wrapper for ``topic`` with libp2p (idempotent)."""
        if self._pubsub is None:
            return  # attach() will do it
        self._pubsub.set_topic_validator(topic, self._wrapper(topic), False)

    def _wrapper(self, topic: str) -> Callable[[ID, Any], bool]:
        def validate(forwarder: ID, msg: Any) -> bool:
            fn = self._fns.get(topic)
            if fn is None:
                return True
            try:
                ok = bool(fn(ID(msg.from_id).to_base58(), msg.data))
            except Exception:  # never let it escape into libp2p's read loop (see module docstring)
                self.errors += 1
                log.warning("gossip validator raised topic=%s forwarder=%s", topic, forwarder, exc_info=True)
                ok = False
            if not ok:
                self.rejected += 1
            return ok

        return validate

    def as_dict(self) -> dict[str, int]:
        return {"gossip_rejected_invalid": self.rejected, "gossip_validator_errors": self.errors}
