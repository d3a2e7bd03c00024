"""Fuller micro-batches when the worker is busy, none of the wait when it is not.

Scoring a micro-batch costs a fixed part (a model call, a state write per
partition, a few dozen numpy calls) plus a part per event.  Records arrive as
the consumer's fetches bring them, a handful at a time: at high rates the fixed
part, paid for every handful, takes a large share of the worker's time, and the
queue (so the tail latency) grows with it.  So a busy worker lets records wait a
little for a fuller batch: until ``fill`` are buffered or the oldest has waited
``linger_s``.  An idle one hands each record over at once, as before, so that
low rates keep their latency.

Busy means the share of wall time the worker spent processing over the last
window, with two thresholds so that the mode does not flip with every window
(filling batches lowers the share that turned it on).

>>> now = [0.0]
>>> pacer = Pacer(fill=16, linger_s=0.003, clock=lambda: now[0])
>>> pacer.busy
False
>>> for _ in range(20):  # 8 ms of work in every 10 ms
...     pacer.worked(now[0], now[0] + 0.008); now[0] += 0.010
>>> pacer.busy, pacer.holds(buffered=4, since=now[0] - 0.001), pacer.holds(16, now[0])
(True, True, False)
>>> pacer.holds(buffered=4, since=now[0] - 0.004)  # waited its linger
False
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

WINDOW_S: Final = 0.1  # busy share measured over this much wall time
BUSY_ABOVE: Final = 0.7  # starts filling batches above this share of time busy ...
IDLE_BELOW: Final = 0.45  # ... and stops below this one


class Pacer:
    """One worker's view of how busy it is, and whether its records should wait.

    Each worker has one, in its context (``flows/worker.py``): its processor
    reports the work, its source asks.
    """

    def __init__(
        self, fill: int, linger_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.fill = fill
        self.linger_s = linger_s
        self.busy = False
        self._clock = clock
        self._window_start = clock()
        self._worked_s = 0.0
        self._enabled = fill > 1 and linger_s > 0

    def worked(self, started: float, ended: float) -> None:
        """The worker processed a micro-batch from ``started`` to ``ended`` (clock seconds)."""
        if not self._enabled:
            return
        self._worked_s += ended - started
        elapsed = ended - self._window_start
        if elapsed >= WINDOW_S:
            share = self._worked_s / elapsed
            self.busy = share > BUSY_ABOVE if not self.busy else share >= IDLE_BELOW
            self._window_start, self._worked_s = ended, 0.0

    def holds(self, buffered: int, since: float) -> bool:
        """Whether ``buffered`` records, the oldest buffered at ``since``, should wait."""
        return self.busy and buffered < self.fill and self._clock() - since < self.linger_s

    def now(self) -> float:
        return self._clock()
