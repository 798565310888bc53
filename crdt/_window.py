"""The influence window: an author paced and clipped by the other authors' progress, not by a clock.

Theory of operation
-------------------
A run's genesis may set ``meta["influence_window"]`` = W (off when absent; the founder's ``[node]
influence_window``).
``clip_norm`` bounds each record; an author who signs 100 records at once would still move the model by
100 clips. With a window, each record states ``base_count``, the other authors' contributions in the
state it was computed from (signed), and three rules bound an author by the *run's* progress, not by a
clock (replicas share no clock; every rule below is a function of the record set, so replicas converge):

1. *Rate*: an author's ``base_count`` must grow with every seq (a record that does not is invalid, on
   every replica, since its predecessor is the same everywhere): at most one record per other
   contribution, so an author's records, bytes held and disk use are bounded by the others' progress.
2. *Causality*: a record applies only once the replica holds at least ``base_count`` contributions of
   other authors; until then it waits in the buffer. The condition only ever becomes true as the state
   grows, so a replica that holds the same records applies the same ones.
3. *Clipping per window*: a record's norm is clipped to ``clip_norm * min(1, gap / W)``, gap being its
   ``base_count`` minus its predecessor's (the first record: W). Over any stretch in which the others
   add G contributions, an author moves the model by at most ``clip_norm * (1 + G / W)``, however many
   records it signs; an honest author whose records are a round apart (gap >= W when W is at most the
   others' contributions per round) is not clipped more than before.

The clip of an author's next record depends on its last record's ``base_count``; after compaction that
record is gone, so the state keeps it per author (``_floor_base``), snapshots carry it (``bases`` in the
header) and the state hash covers it. Rejected: a bound over wall-clock windows (no shared clock: replicas
would accept different records), or over the vector alone (an author quiet for a long time would have a
long run's worth of budget to spend at once; the stated base makes each record spend only what the run
did since its author's last one). Cost: an author training alone moves the model once (rule 3), and
then not at all until others contribute; a window is for runs of several authors (SECURITY.md).
"""

from __future__ import annotations

from crdt import _wire
from crdt.records import Genesis

__all__ = ["check_growth", "influence_window", "windowed_clip"]

#: Largest window accepted: far beyond any run's contributions per round.
MAX_WINDOW = 2**32 - 1


def influence_window(genesis: Genesis) -> int | None:
    """The genesis's ``meta["influence_window"]``, or None (off).

    Raises:
        GenesisMismatchError: it is not an integer in [1, MAX_WINDOW].
    """
    return genesis.meta_int("influence_window", low=1, high=MAX_WINDOW)


def check_growth(previous: int | None, base_count: int) -> None:
    """Rule 1: a record's ``base_count`` exceeds its predecessor's (None: it has none).

    Raises:
        ValidationError: it does not.
    """
    _wire.expect(previous is None or base_count > previous, "contribution",
                 f"base_count {base_count} must exceed the author's previous {previous} (influence window)")


def windowed_clip(clip_norm: float, window: int, gap: int) -> float:
    """Rule 3: the clip norm of a record ``gap`` contributions of others after its author's previous one
    (one multiply and one divide, correctly rounded: the same bits on every replica)."""
    return clip_norm if gap >= window else clip_norm * gap / window
