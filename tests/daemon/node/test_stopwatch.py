"""daemon.node.stopwatch: a round's spans add up, one runs at a time, and a wrapped call is its own span."""

from __future__ import annotations

from daemon.node.stopwatch import Stopwatch


def test_spans_run_one_at_a_time_and_add_up() -> None:
    clock = Stopwatch()
    assert clock.stop() == 0.0 and clock.spans == {"materialize": 0.0}  # nothing running yet
    clock.start("sign")
    clock.start("accept")  # ends "sign"
    first = clock.stop()
    clock.start("accept")
    second = clock.stop()
    assert set(clock.spans) == {"materialize", "sign", "accept"}
    assert clock.spans["accept"] == first + second > 0


def test_a_timed_call_is_its_own_span_and_returns_its_result() -> None:
    clock = Stopwatch()
    fill = clock.timed("materialize", lambda arg: arg * 2)
    assert fill(21) == 42 and clock.spans["materialize"] > 0
