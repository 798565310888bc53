"""Gossip hygiene: per-topic validators run before forwarding, and gossipsub v1.1 peer-score parameters.

Theory of operation
-------------------
Every gossip message passes three gates in py-libp2p's `Pubsub.push_msg`, in this order, *before* it is
delivered to our subscribers or forwarded to any mesh peer:

1. the forwarding peer's score must be above ``publish_threshold`` (gossipsub v1.1 scoring, below);
2. strict signing: the author's signature over the message (Ed25519, the peer's libp2p key) must verify
   and match ``from`` (``Pubsub(strict_signing=True)``, set explicitly in p2p/_libp2p.py);
3. the topic validator registered here: the daemon's ``fn(from_peer, data) -> bool`` (schema, size,
   author membership ...). False, or an exception, rejects the message: it is neither delivered nor
   forwarded, and the *forwarding* peer's P4 ("invalid messages") score counter goes up.

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
from libp2p.pubsub.score import ScoreParams, TopicScoreParams

if TYPE_CHECKING:
    from libp2p.pubsub.pubsub import Pubsub

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
    """The daemon's per-topic validators and their counters; installed into libp2p's Pubsub (trio thread).

    `set` may be called from the asyncio side at any time: the function is looked up per message, and the
    libp2p-side wrapper for a new topic is installed by `install` in the trio thread.
    """

    def __init__(self) -> None:
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
        """(Trio thread) start validating on ``pubsub``: install every topic set so far."""
        self._pubsub = pubsub
        for topic in list(self._fns):
            self.install(topic)

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
