"""When a load generator sends each record: as fast as possible, or on an open-loop schedule.

An open-loop schedule fixes every send time before the first send (``t0 +
offset(i)``), so a slow system cannot slow the load down and hide its own
latency (the "coordinated omission" of closed-loop generators).  When sending
falls behind, the late records go out at once and the schedule keeps its
times: the delay is reported as *schedule lag*, never absorbed.  The loop
sleeps until each send time instead of spinning: on two cores a spinning
generator would steal a core from the system it measures.

>>> sent = []
>>> report = run_schedule(3, Timing.fixed_rate(1000.0).offset_of(),
...                       lambda i, at: sent.append(i))
>>> sent, report.sent
([0, 1, 2], 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

# Schedule lag is tracked in microseconds, up to an hour, to 3 significant digits.
LAG_HISTOGRAM_MAX_US = 3_600_000_000
# A send this much later than its scheduled time counts as late.
LATE_AFTER_S = 0.001

OffsetOf = Callable[[int], float]
Send = Callable[[int, float | None], None]


@dataclass(frozen=True, slots=True)
class Timing:
    """When records go out: ``max`` (no schedule), a fixed ``rate``, or recorded gaps/``speed``."""

    kind: str
    value: float | None = None

    @classmethod
    def as_fast_as_possible(cls) -> Timing:
        return cls("max")

    @classmethod
    def fixed_rate(cls, per_second: float) -> Timing:
        if not per_second > 0:
            raise ValueError(f"a rate must be positive, got {per_second}")
        return cls("rate", per_second)

    @classmethod
    def recorded(cls, speed: float) -> Timing:
        if not speed > 0:
            raise ValueError(f"a speed factor must be positive, got {speed}")
        return cls("speed", speed)

    @classmethod
    def parse(cls, rate: str | None, speed: float | None) -> Timing:
        """From the command line's ``--rate R|max`` and ``--speed F`` (at most one of them)."""
        if rate is not None and speed is not None:
            raise ValueError("--rate and --speed exclude each other: choose one timing")
        if speed is not None:
            return cls.recorded(speed)
        if rate is None or rate.strip().lower() == "max":
            return cls.as_fast_as_possible()
        try:
            per_second = float(rate)
        except ValueError:
            raise ValueError(f"--rate takes events per second or 'max', got {rate!r}") from None
        return cls.fixed_rate(per_second)

    def describe(self) -> str:
        if self.kind == "rate":
            return f"{self.value:g} ev/s, open loop"
        if self.kind == "speed":
            return f"recorded timing x{self.value:g}"
        return "as fast as possible"

    def offset_of(self, recorded_ms: Callable[[int], float] | None = None) -> OffsetOf | None:
        """Seconds from the start at which record ``i`` is due; None when there is no schedule.

        ``recorded_ms(i)`` is record i's original time (needed by ``speed``
        only).  Time never runs backwards in a schedule: a record stamped
        earlier than its predecessor is due with it.
        """
        if self.kind == "rate":
            assert self.value is not None
            interval = 1.0 / self.value
            return lambda i: i * interval
        if self.kind == "speed":
            assert self.value is not None
            if recorded_ms is None:
                raise ValueError("replaying at recorded speed needs the records' times")
            return _RecordedOffsets(recorded_ms, self.value)
        return None


class _RecordedOffsets:
    """Offsets from recorded times, computed on demand (a lapping dataset has no end)."""

    def __init__(self, recorded_ms: Callable[[int], float], speed: float) -> None:
        self.recorded_ms = recorded_ms
        self.speed = speed
        self.offsets: list[float] = []
        self.first_ms = 0.0
        self.latest_ms = 0.0

    def __call__(self, i: int) -> float:
        while len(self.offsets) <= i:
            ms = self.recorded_ms(len(self.offsets))
            if not self.offsets:
                self.first_ms = self.latest_ms = ms
            self.latest_ms = max(self.latest_ms, ms)
            self.offsets.append((self.latest_ms - self.first_ms) / 1000.0 / self.speed)
        return self.offsets[i]


@dataclass(frozen=True, slots=True)
class ScheduleReport:
    """What a schedule run achieved: how many sends, how fast, and how late against the plan."""

    sent: int
    elapsed_s: float
    send_rate: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    late_sends: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "sent": self.sent,
            "elapsed_s": round(self.elapsed_s, 3),
            "send_rate": round(self.send_rate, 1),
            "lag_p50_ms": round(self.lag_p50_ms, 3),
            "lag_p99_ms": round(self.lag_p99_ms, 3),
            "lag_max_ms": round(self.lag_max_ms, 3),
            "late_sends": self.late_sends,
        }


def run_schedule(
    count: int,
    offset_of: OffsetOf | None,
    send: Send,
    *,
    stop_after_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock: Callable[[], float] = time.time,
) -> ScheduleReport:
    """Call ``send(i, due)`` for i in 0..count-1, each at its due time; ``due`` is epoch seconds.

    With ``offset_of`` None records go out back to back and ``due`` is None.
    ``stop_after_s`` ends the run at the first record due (or, without a
    schedule, sent) that late.  A late record is sent at once: later send
    times never move.
    """
    lag_us = HdrHistogram(1, LAG_HISTOGRAM_MAX_US, 3)
    late = 0
    sent = 0
    start = clock()
    wall_start = wall_clock()
    first_send = last_send = start
    for i in range(count):
        if offset_of is None:
            now = clock()
            if stop_after_s is not None and now - start >= stop_after_s:
                break
            send(i, None)
        else:
            offset = offset_of(i)
            if stop_after_s is not None and offset >= stop_after_s:
                break
            due = start + offset
            now = clock()
            if due > now:
                sleep(due - now)
                now = clock()
            lag = max(0.0, now - due)
            lag_us.record_value(min(int(lag * 1e6), LAG_HISTOGRAM_MAX_US))
            late += lag > LATE_AFTER_S
            send(i, wall_start + offset)
        if sent == 0:
            first_send = now
        last_send = now
        sent += 1
    elapsed = clock() - start
    span = last_send - first_send
    # The rate between the first and the last send: n records span n - 1 intervals.
    send_rate = (sent - 1) / span if sent > 1 and span > 0 else float(sent)
    return ScheduleReport(
        sent=sent,
        elapsed_s=elapsed,
        send_rate=send_rate,
        lag_p50_ms=lag_us.get_value_at_percentile(50) / 1000.0,
        lag_p99_ms=lag_us.get_value_at_percentile(99) / 1000.0,
        lag_max_ms=lag_us.get_max_value() / 1000.0,
        late_sends=late,
    )
