"""Where a round's time goes (``/v1/history`` ``spans_s``: materialize, train, sign, accept, commit,
announce; bench/bench_model_scale.py splits the round by them): named spans, one running at a time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Stopwatch"]


class Stopwatch:
    """Where a round's time goes: named spans, one running at a time (``timed`` wraps a callable)."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {"materialize": 0.0}
        self._name: str | None = None
        self._since = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._since = name, time.perf_counter()

    def stop(self) -> float:
        """End the running span; returns its length."""
        if self._name is None:
            return 0.0
        elapsed = time.perf_counter() - self._since
        self.spans[self._name] = self.spans.get(self._name, 0.0) + elapsed
        self._name = None
        return elapsed

    def timed(self, name: str, fn: Callable[[Any], object]) -> Callable[[Any], object]:
        def run(arg: Any) -> object:
            self.start(name)
            try:
                return fn(arg)
            finally:
                self.stop()

        return run
