"""The time budget gives each stage a share of what is left; unused time passes on."""

from __future__ import annotations

import pytest

from streamrec.model.budget import Budget, clock_text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SHARES = {"teacher": 2.0, "student": 1.0, "rest": 1.0}


def test_a_stage_gets_its_share_of_the_whole_budget_at_the_start() -> None:
    clock = FakeClock()
    budget = Budget(400.0, SHARES, clock=clock)
    assert budget.deadline("teacher") == pytest.approx(1000.0 + 200.0)


def test_time_a_stage_leaves_unused_goes_to_the_later_stages() -> None:
    clock = FakeClock()
    budget = Budget(400.0, SHARES, clock=clock)
    budget.deadline("teacher")
    clock.now += 100.0  # the teacher used half its 200 s
    assert budget.deadline("student") == pytest.approx(1100.0 + 300.0 / 2)


def test_an_overrun_leaves_later_stages_no_time_but_never_a_past_deadline() -> None:
    clock = FakeClock()
    budget = Budget(400.0, SHARES, clock=clock)
    clock.now += 500.0
    assert budget.left() == pytest.approx(-100.0)
    assert budget.deadline("rest") == pytest.approx(clock.now)


def test_the_last_stage_may_use_everything_left() -> None:
    clock = FakeClock()
    budget = Budget(400.0, SHARES, clock=clock)
    clock.now += 150.0
    assert budget.deadline("rest") == pytest.approx(1400.0)


def test_without_a_budget_there_is_no_deadline() -> None:
    budget = Budget(None, SHARES)
    assert budget.deadline("teacher") is None and budget.left() is None


def test_an_unknown_stage_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="teacher, student, rest"):
        Budget(10.0, SHARES).deadline("export")


def test_a_non_positive_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Budget(0.0, SHARES)


def test_the_clock_text_is_minutes_and_seconds() -> None:
    assert clock_text(125.9) == "2:05"
    assert clock_text(-3.0) == "0:00"
    assert clock_text(None) == "--"
