"""The time budget of `streamrec train`: each stage's deadline as its share of what is left.

Stages draw in order.  A stage's deadline is ``now + left · share / (its share + the
shares of every later stage)``: time a stage does not use passes to the stages after
it, and the last stage may use everything that is left.  Stages whose cost does not
depend on training (export, evaluation, latency) hold a share too, so training never
eats their time.  Without a budget every deadline is ``None``: validation alone ends
training.

>>> clock = iter([0.0, 0.0, 30.0]).__next__
>>> budget = Budget(100.0, {"teacher": 2.0, "student": 1.0, "rest": 1.0}, clock=clock)
>>> budget.deadline("teacher")  # half of the 100 s
50.0
>>> budget.deadline("student")  # the teacher ended at 30 s: half of the 70 s left
65.0
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Budget:
    def __init__(
        self,
        seconds: float | None,
        shares: dict[str, float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a time budget must be positive, got {seconds} s")
        if any(s <= 0 for s in shares.values()):
            raise ValueError(f"every stage's share must be positive: {shares}")
        self.seconds = seconds
        self.shares = dict(shares)
        self._clock = clock
        self.started = clock()
        self._order = list(shares)

    @property
    def end(self) -> float | None:
        return None if self.seconds is None else self.started + self.seconds

    def left(self) -> float | None:
        """Seconds left of the whole budget (negative once overrun), ``None`` without one."""
        end = self.end
        return None if end is None else end - self._clock()

    def deadline(self, stage: str) -> float | None:
        """The ``clock()`` instant by which ``stage`` should end."""
        if stage not in self.shares:
            raise KeyError(f"no share for stage {stage!r} (stages: {', '.join(self._order)})")
        end = self.end
        if end is None:
            return None
        now = self._clock()
        later = self._order[self._order.index(stage) :]
        share = self.shares[stage] / sum(self.shares[s] for s in later)
        return now + max(0.0, end - now) * share


def clock_text(seconds: float | None) -> str:
    """``m:ss`` for the progress bar; ``--`` without a budget."""
    if seconds is None:
        return "--"
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
