"""The local training loop: rounds, staleness, evaluation, pause and resume.

Theory of operation
-------------------
A round takes the merged parameters, runs one DiLoCo round in the training process (H inner steps on
this node's data, the outer update of one fragment, compression with error feedback), and turns the
encoded update into a signed contribution with the next sequence number of this node's slot. The
contribution enters through the replica's one door (applied, then logged with fsync) before it is
announced, so nothing acknowledged is lost; the training process saves its own state (momentum,
residuals) only after that (``commit``), so a crash replays a little error feedback at worst.

Staleness: other peers' contributions keep landing while a round trains against the state it started
from. Their count decides the weight signed into the contribution (``training.StalenessPolicy``), and a
round that is too stale is dropped, never signed. The author decides once, so every replica merges the
same numbers.

Catching up: a round starts from what the node holds, so before a round the node first takes in what its
peers already hold when that is more than a round's worth (a joiner's history, a restarted node's gap):
otherwise everything that lands during the round counts as staleness, and a joiner's first round, started
from the genesis while its first pulls bring in the run, was discarded outright (six daemons joined by
invite lost one round each). The target is what the peers reported when the wait began (they keep
training, so a moving target might never be reached); the wait ends when the node holds it, when nothing
has arrived for `CATCH_UP_IDLE_S` (records it cannot take, say), or after `CATCH_UP_MAX_S`. A joiner's
first round also waits for its first exchange with a peer.

Lockstep (``[training] lockstep``): a round also waits until every peer training now has contributed
since this node's previous round began, so the peers' rounds start together from one merged model, as in
synchronous DiLoCo, instead of applying each other's updates a round late (bounded by
``lockstep_timeout_s``; off by default, since then a slow peer never holds the others back).

Between rounds (paused, done, or training off) the loop keeps the reported quality current: whenever the
model changes it evaluates the merged model again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import crdt
import p2p
from daemon.config import TrainingConfig
from daemon.node.byzantine import byzantine_round
from daemon.node.replica import DiskFull, Replica
from daemon.node.stopwatch import Stopwatch
from daemon.node.trainer_process import TrainerProcess, fill_from
from daemon.status import Evaluation, RoundRecord, TrainingState

__all__ = ["Rounds"]

log = logging.getLogger(__name__)

HISTORY_LIMIT = 10_000  # per-round telemetry records kept in memory for status and plots
EVAL_DEBOUNCE_S = 0.5  # after the model changes, wait a little: a pull usually brings a batch
#: A peer counts as training if a contribution of it arrived within this long, or three of our rounds.
LIVE_WINDOW_S = 120.0
DISK_RECHECK_S = 5.0  # how often a node whose disk is full looks for room again
CATCH_UP_MAX_S = 120.0  # a round waits at most this long for what its peers already hold
CATCH_UP_IDLE_S = 15.0  # ...and gives up sooner when nothing arrives for this long (half a sync period)
STALENESS_ROUNDS = 4  # a round is dropped only past this many rounds' worth of every connected peer's work
FIRST_EXCHANGE_S = 30.0  # a joiner's first round waits this long at most for a first digest from a peer


class Rounds:
    """This node's training loop and what it reports (history, evaluations, state)."""

    def __init__(
        self,
        trainer: TrainerProcess,
        replica: Replica,
        *,
        signer: crdt.Signer,
        host: p2p.Host,
        settings: Callable[[], TrainingConfig],
        announce: Callable[[crdt.Contribution], Awaitable[None]],
        timing: Callable[[str, float], None],
        count_peers: bool = True,
        joining: bool = False,
        training_peers: Callable[[float], set[str]] = lambda _within_s: set(),
        pull_now: Callable[[], None] = lambda: None,
        admission: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.trainer = trainer
        self.replica = replica
        self.signer = signer
        self.host = host
        self.settings = settings
        """The ``[training]`` section, re-read every round (SIGHUP may change it)."""
        self.announce = announce
        self.timing = timing
        self.count_peers = count_peers
        """Pass the live count of training peers to each round (False: ``[diloco] expected_peers`` is set)."""
        self.joining = joining
        """The node has bootstrap peers: its first round waits for a first exchange with one of them."""
        self.training_peers = training_peers
        """Peers whose heartbeat, heard within the given seconds, says they are training."""
        self.pull_now = pull_now
        """Ask sync to pull from the peers known to hold what this node lacks (while catching up)."""
        self.admission = admission or _no_admission
        """This node's proof of work for the run (daemon.node.genesis.admission_nonce; 0: none asked)."""
        self._last_round_s = 0.0
        self._round_base: crdt.VersionVector | None = None  # what the previous round started from
        self.waiting_for: frozenset[str] = frozenset()
        """Lockstep: the peers the next round waits for (empty: none)."""
        self.on_state_change: Callable[[], None] = lambda: None
        """Called when :attr:`state` changes (the node tells its peers at once: lockstep waits for the
        peers whose heartbeat says they train)."""
        self._state = TrainingState.RUNNING if settings().enabled else TrainingState.DISABLED
        self.history: list[RoundRecord] = []
        self.last_eval = Evaluation()
        self.initial_eval = Evaluation()
        self.started_at = time.time()
        self._resume = asyncio.Event()
        self._resume.set()
        self._limit_override: int | None = None  # set by `train start`: round to stop at, 0 = never
        self._model_changed = asyncio.Event()  # the model changed, or training was started: wake up
        replica.on_change = self._model_changed.set

    @property
    def rounds_done(self) -> int:
        return self.replica.state.next_seq(self.signer.public_key) - 1

    # -- control ---------------------------------------------------------------------------------------

    def pause(self) -> None:
        self._resume.clear()
        self._model_changed.set()  # a round waiting to catch up looks again at once

    def resume(self) -> None:
        self._resume.set()

    def start(self, rounds: int = 0) -> int:
        """Train ``rounds`` more local rounds (0: until stopped), whatever ``[training] enabled`` and
        ``max_rounds`` say, until the daemon restarts; also resumes a paused node. Returns the round at
        which training will stop (0: never)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self._limit_override = self.rounds_done + rounds if rounds else 0
        self._resume.set()
        self._model_changed.set()  # wakes the idle loop
        return self._limit_override

    def config_reloaded(self) -> None:
        """After SIGHUP: a raised max_rounds (or training turned back on) restarts a finished node."""
        self._model_changed.set()

    @property
    def state(self) -> TrainingState:
        return self._state

    @state.setter
    def state(self, value: TrainingState) -> None:
        changed, self._state = value is not self._state, value
        if changed:
            self.on_state_change()

    def _round_limit(self) -> int | None:
        """The local round at which training stops (0: never), or None when training is off."""
        if self._limit_override is not None:
            return self._limit_override
        training = self.settings()
        return training.max_rounds if training.enabled else None

    def _wants_training(self) -> bool:
        limit = self._round_limit()
        return limit is not None and (limit == 0 or self.rounds_done < limit)

    # -- the loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Train while there are rounds to do; in between, keep the reported quality current."""
        while True:
            if self._wants_training():
                await self._train()
            self.state = TrainingState.DISABLED if self._round_limit() is None else TrainingState.DONE
            # The event is cleared before the evaluation, so what lands while it runs triggers the next
            # one instead of being missed; `train start` sets it too.
            self._model_changed.clear()
            await self.evaluate()
            await self._model_changed.wait()
            await asyncio.sleep(EVAL_DEBOUNCE_S)

    async def _train(self) -> None:
        self.state = TrainingState.RUNNING
        if self.rounds_done == 0:
            await self.evaluate()  # the starting point, for loss curves
            self.initial_eval = self.last_eval
        while self._wants_training():
            if not self._resume.is_set():
                self.state = TrainingState.PAUSED
                await self._resume.wait()
                self.state = TrainingState.RUNNING
            while not self.replica.can_write():  # a round's contribution could not be logged
                await asyncio.sleep(DISK_RECHECK_S)
            await self._catch_up()
            if self._resume.is_set():
                await self._await_others()
            if self._resume.is_set() and self.settings().lockstep:
                await self._await_lockstep()
            if self._resume.is_set():  # else paused while waiting: the loop's top waits for resume
                await self._one_round()

    async def _await_others(self) -> None:
        """With an influence window (crdt/_window.py) a record must state more contributions of other
        authors than this node's previous record did: until some have landed, a round would be thrown
        away, so wait for them (pausing ends the wait)."""
        me = self.signer.public_key
        previous = self.replica.state.last_base_count(me)
        if self.replica.state.influence_window is None or previous is None:
            return
        if _others(self.replica.state.version_vector, me) > previous:
            return
        log.info("waiting for other authors' contributions (influence window) base_count=%d", previous)
        while _others(self.replica.state.version_vector, me) <= previous and self._resume.is_set():
            self.pull_now()
            await self._changed_within(5.0)

    async def _await_lockstep(self) -> None:
        """Wait until every peer training now has contributed since this node's previous round began
        (bounded by ``lockstep_timeout_s``; pausing ends the wait)."""
        base = self._round_base
        if base is None:
            return
        started = time.monotonic()
        try:
            while self._resume.is_set() and (waiting := self._not_contributed_since(base)):
                self.waiting_for = frozenset(waiting)
                if time.monotonic() - started > self.settings().lockstep_timeout_s:
                    log.warning("lockstep: no contribution from peers=%s in %.0f s, training on",
                                ",".join(sorted(waiting)), time.monotonic() - started)
                    return
                await self._changed_within(1.0)
        finally:
            self.waiting_for = frozenset()

    def _not_contributed_since(self, base: crdt.VersionVector) -> set[str]:
        """Peers whose heartbeat says they train now and whose latest contribution is not newer than
        ``base`` (a peer that finished or paused says so, and is not waited for)."""
        held = self.replica.state.version_vector
        authors = {p2p.peer_id_from_public_key(author): author for author in held}
        training = self.training_peers(max(LIVE_WINDOW_S, 3 * self._last_round_s))
        training.discard(p2p.peer_id_from_public_key(self.signer.public_key))
        return {peer for peer in training
                if peer not in authors or held.get(authors[peer]) <= base.get(authors[peer])}

    async def _catch_up(self) -> None:
        """Wait (bounded) until this node holds what its peers held when it began waiting, if that is
        more than a round's worth of contributions (see the module docstring)."""
        started = time.monotonic()
        target = self.replica.holdings.together()
        if target is None and self.joining and self.rounds_done == 0:
            while target is None and self._resume.is_set() and time.monotonic() - started < FIRST_EXCHANGE_S:
                self.pull_now()
                await self._changed_within(1.0)  # digests do not change the model: look again each second
                target = self.replica.holdings.together()
        if target is None or self._lag(target) <= self.live_peers():
            return
        log.info("catching up before the round missing=%d", self._lag(target))
        last_progress = time.monotonic()
        while self._lag(target) and self._resume.is_set() and time.monotonic() - started < CATCH_UP_MAX_S:
            self.pull_now()
            if await self._changed_within(1.0):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > CATCH_UP_IDLE_S:
                break
        log.info("caught up seconds=%.1f missing=%d", time.monotonic() - started, self._lag(target))

    def _lag(self, target: crdt.VersionVector) -> int:
        held = self.replica.state.version_vector
        return sum(max(0, seq - held.get(author)) for author, seq in target.items())

    async def _changed_within(self, timeout_s: float) -> bool:
        """True if the model changed within ``timeout_s``."""
        self._model_changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._model_changed.wait()
        except TimeoutError:
            return False
        return True

    async def _one_round(self) -> None:
        training = self.settings()  # re-read every round: SIGHUP may change eval_every
        state = self.replica.state
        seq = self.rounds_done + 1
        base_vv = self._round_base = state.version_vector
        started = time.monotonic()
        peers = self.live_peers() if self.count_peers else None
        fragment = (seq - 1) % len(state.genesis.fragments)
        clock = Stopwatch()
        fill = clock.timed("materialize", fill_from(state))
        result = await self.trainer.run_round(fill, state.genesis.length, fragment, peers)
        clock.spans["train"] = time.monotonic() - started - clock.spans["materialize"]
        self._last_round_s = time.monotonic() - started
        state = self.replica.state  # a snapshot adopted meanwhile replaces the state object
        staleness = state.version_vector.total - base_vv.total
        weight = result.weight * self._staleness_policy(result.staleness_policy).weight(staleness)
        if weight == 0.0:
            self.replica.counters.stale_rounds_skipped += 1
            log.warning("round too stale, not contributed seq=%d staleness=%d", seq, staleness)
            await self.trainer.commit()
            return
        if training.byzantine:  # TEST ONLY attacker (config.TrainingConfig.byzantine)
            length = state.genesis.fragment_length(result.fragment)
            result = byzantine_round(training.byzantine, result, length)
        self.timing("round", time.monotonic() - started)
        clock.start("sign")
        contribution = crdt.make_contribution(
            self.signer,
            genesis_id=state.genesis.id,
            seq=seq,
            fragment=result.fragment,
            codec=result.codec,
            payload=result.payload,
            weight=weight,
            base_version=base_vv.digest(),
            base_count=_others(base_vv, self.signer.public_key) if state.influence_window else 0,
            admission_nonce=await self.admission(),
        )
        clock.start("accept")
        try:
            await self.replica.receive(contribution)
        except DiskFull:
            # Never logged, never announced: this seq is signed again by a later round, safely. The
            # training process keeps what the round did to its residuals (error feedback loses them).
            return
        self.timing("merge", clock.stop())
        clock.start("commit")
        await self.trainer.commit()
        clock.start("announce")
        await self.announce(contribution)
        clock.stop()
        self._record(seq, result, staleness=staleness, weight=weight, round_s=time.monotonic() - started,
                     spans=clock.spans)
        if seq % training.eval_every == 0:
            await self.evaluate()
        if training.slowdown > 1.0:
            await asyncio.sleep((training.slowdown - 1.0) * (time.monotonic() - started))

    def _staleness_policy(self, policy: Any) -> Any:
        """The round's policy, its drop bound at least what the connected peers could land in a round.

        N comes from the peers seen training, which lags behind peers that start together (their first
        contributions and heartbeats are not in yet): six daemons joined by invite each dropped a first
        round. The bound only decides whether a round is thrown away; the weight's penalty is unchanged."""
        if not self.count_peers:
            return policy  # [diloco] expected_peers pins N and the bound
        floor = STALENESS_ROUNDS * (1 + len(self.host.connected_peers()))
        return dataclasses.replace(policy, max_staleness=max(policy.max_staleness, floor))

    def live_peers(self) -> int:
        """Peers training now, this node included: DiLoCo's N (the outer step's 1/N and the staleness
        bound), from the authors whose contributions arrived lately and the peers whose heartbeat says
        they train (before their first contribution lands), not a configured constant."""
        window = max(LIVE_WINDOW_S, 3 * self._last_round_s)
        others = self.replica.authors_active_since(time.time() - window) | self.training_peers(window)
        others.discard(p2p.peer_id_from_public_key(self.signer.public_key))
        return 1 + len(others)

    def _record(
        self, seq: int, result: Any, *, staleness: int, weight: float, round_s: float, spans: dict[str, float]
    ) -> None:
        stats = self.host.stats()
        contributions = self.replica.state.contribution_count
        self.history.append(
            RoundRecord(
                round=seq,
                time_s=round(time.time() - self.started_at, 3),
                train_loss=float(result.train_loss),
                update_norm=float(result.update_norm),
                density=float(result.density),
                payload_bytes=int(result.payload_bytes),
                contributions=contributions,
                bytes_sent=int(stats["bytes_sent"]),
                bytes_received=int(stats["bytes_received"]),
                staleness=staleness,
                weight=weight,
                residual_norm=float(result.residual_norm),
                round_s=round(round_s, 4),
                spans_s={name: round(seconds, 5) for name, seconds in spans.items()},
            )
        )
        del self.history[:-HISTORY_LIMIT]
        log.info("round=%d train_loss=%.4f payload_bytes=%d contributions=%d", seq, result.train_loss,
                 result.payload_bytes, contributions)

    async def evaluate(self) -> None:
        """Evaluate the merged model now (``status.eval``; the last round's record gets the metrics)."""
        state = self.replica.state
        # Read before the await: contributions merged while it runs belong to the next evaluation.
        state_hash, contributions = state.state_hash, state.contribution_count
        metrics = await self.trainer.evaluate(fill_from(state), state.genesis.length)
        self.last_eval = Evaluation.of(metrics, state_hash=state_hash, contributions=contributions)
        if self.history and self.history[-1].val_loss is None:
            self.history[-1].val_loss = self.last_eval.val_loss
            self.history[-1].val_accuracy = self.last_eval.val_accuracy
            self.history[-1].val_bpb = self.last_eval.val_bpb


def _others(vector: crdt.VersionVector, me: bytes) -> int:
    """Contributions of authors other than ``me`` in ``vector``: a record's ``base_count``."""
    return vector.total - vector.get(me)


async def _no_admission() -> int:
    return 0
