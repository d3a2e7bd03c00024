"""The load generator's timing: open-loop schedules keep their rate whatever the system does."""

from __future__ import annotations

import time

import pytest

from streamrec.tools.schedule import Timing, run_schedule


class FakeClock:
    """Time that moves only when the schedule sleeps or a send takes time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


def test_open_loop_schedule_keeps_its_rate_when_sending_is_slow() -> None:
    # Every 100th send stalls for 30 ms, as a slow broker or consumer would make it.
    def slow_send(i: int, due: float | None) -> None:
        if i % 100 == 99:
            time.sleep(0.030)

    report = run_schedule(1000, Timing.fixed_rate(1000.0).offset_of(), slow_send)

    assert report.sent == 1000
    assert report.elapsed_s < 1.15  # a closed loop would need 1.0 + 10 x 0.03 s
    assert report.send_rate == pytest.approx(1000.0, rel=0.05)
    assert report.lag_max_ms >= 20.0  # the stalls are reported, not hidden
    assert report.late_sends > 0


def test_late_records_go_out_at_once_and_later_send_times_do_not_move() -> None:
    fake = FakeClock()
    sent_at: list[float] = []

    def send(i: int, due: float | None) -> None:
        sent_at.append(fake.now)
        if i == 10:
            fake.now += 0.050  # one send takes 50 ms

    report = run_schedule(
        100,
        Timing.fixed_rate(1000.0).offset_of(),
        send,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=fake.wall,
    )

    start = 100.0
    assert sent_at[11] == pytest.approx(start + 0.060)  # due at 11 ms: late, sent at once
    assert sent_at[59] == pytest.approx(start + 0.060)  # due at 59 ms: still caught up at once
    assert sent_at[61] == pytest.approx(start + 0.061)  # back on the original schedule
    assert sent_at[99] == pytest.approx(start + 0.099)
    assert report.lag_max_ms == pytest.approx(49.0, rel=0.01)


def test_sends_carry_their_scheduled_time_not_the_time_they_went_out() -> None:
    fake = FakeClock()
    dues: list[float | None] = []

    def send(i: int, due: float | None) -> None:
        dues.append(due)
        fake.now += 0.004  # slower than the 2 ms interval

    run_schedule(
        5,
        Timing.fixed_rate(500.0).offset_of(),
        send,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=fake.wall,
    )

    wall_start = fake.wall() - fake.now + 100.0
    assert dues == pytest.approx([wall_start + 0.002 * i for i in range(5)])


def test_the_schedule_sleeps_instead_of_spinning() -> None:
    fake = FakeClock()
    run_schedule(
        50,
        Timing.fixed_rate(100.0).offset_of(),
        lambda i, due: None,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=fake.wall,
    )
    assert fake.sleeps == 49  # one sleep per interval, none wasted in a busy loop


def test_recorded_timing_divides_the_gaps_by_the_speed() -> None:
    recorded = [1_000.0, 2_000.0, 4_000.0, 3_500.0, 5_000.0]
    offset_of = Timing.recorded(2.0).offset_of(recorded.__getitem__)
    assert offset_of is not None
    # A record stamped before its predecessor is due with it: time never runs backwards.
    assert [offset_of(i) for i in range(5)] == [0.0, 0.5, 1.5, 1.5, 2.0]


def test_duration_limits_a_schedule() -> None:
    fake = FakeClock()
    report = run_schedule(
        10_000,
        Timing.fixed_rate(100.0).offset_of(),
        lambda i, due: None,
        stop_after_s=0.5,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=fake.wall,
    )
    assert report.sent == 50


def test_as_fast_as_possible_has_no_schedule() -> None:
    sent: list[float | None] = []
    report = run_schedule(20, Timing.parse("max", None).offset_of(), lambda i, d: sent.append(d))
    assert sent == [None] * 20
    assert report.sent == 20


@pytest.mark.parametrize(
    ("rate", "speed", "expected"),
    [(None, None, "max"), ("max", None, "max"), ("250", None, "rate"), (None, 2.0, "speed")],
)
def test_timing_is_parsed_from_the_command_line(
    rate: str | None, speed: float | None, expected: str
) -> None:
    assert Timing.parse(rate, speed).kind == expected


def test_rate_and_speed_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        Timing.parse("100", 2.0)


def test_a_rate_must_be_a_positive_number() -> None:
    with pytest.raises(ValueError, match="events per second or 'max'"):
        Timing.parse("fast", None)
    with pytest.raises(ValueError, match="positive"):
        Timing.parse("0", None)
