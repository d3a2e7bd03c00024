"""The benchmark's plan without a broker: point lengths, turns, medians of repeats, pinning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from streamrec.bench.e2e import (
    BenchPlan,
    BenchResult,
    bench_e2e_command,
    ladder_order,
    plan_description,
    write_outputs,
)
from streamrec.bench.report import median_of_repeats, runs_table
from streamrec.bench.services import CorePin, Pinning, parse_pin
from streamrec.kafka_clients import KafkaUnavailable
from streamrec.settings import Settings
from streamrec.tools import services
from streamrec.tools.services import Service, service_environment


def repeat(variant: str, rate: float, index: int, p99: float, **extra: Any) -> dict[str, Any]:
    return {
        "variant": variant,
        "offered_rate": rate,
        "achieved_rate": rate,
        "p50_ms": p99 / 4,
        "p90_ms": p99 / 2,
        "p99_ms": p99,
        "p99_9_ms": p99 * 2,
        "max_ms": p99 * 3,
        "mean_ms": p99 / 3,
        "sent": 20_000,
        "matched": 20_000,
        "missing": 0,
        "duplicates": 0,
        "saturated": False,
        "models": {"m": 20_000},
        "schedule_lag_p99_ms": 0.5,
        "flow_cpu_pct": 50.0,
        "repeat": index,
        **extra,
    }


def test_a_point_lasts_long_enough_for_its_events_and_never_shorter_than_the_minimum() -> None:
    plan = BenchPlan()

    assert plan.min_events == 20_000
    assert plan.point_duration_s(500) == 40.0
    assert plan.point_duration_s(2000) == 10.0  # 20,000 take 10 s: the minimum anyway
    assert plan.point_duration_s(6000) == 10.0


def test_the_variants_take_turns_repeat_after_repeat() -> None:
    order = ladder_order(["floor", "student", "teacher"], 3)

    assert [v for _, v in order] == ["floor", "student", "teacher"] * 3
    assert [r for r, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_point_reports_the_median_of_its_repeats_and_keeps_them() -> None:
    runs = [
        repeat("floor", 500, 0, 9.0, flow_cpu_pct=10.0),
        repeat("floor", 500, 1, 3.0, flow_cpu_pct=30.0),
        repeat("floor", 500, 2, 4.0, flow_cpu_pct=20.0, duplicates=2),
    ]

    (point,) = median_of_repeats(runs, 3)

    assert point["p99_ms"] == 4.0 and point["p50_ms"] == 1.0
    assert point["p99_range_ms"] == [3.0, 9.0]
    assert point["flow_cpu_pct"] == 20.0  # each column is its own median
    assert point["schedule_lag_p99_ms"] == 0.5
    assert point["sent"] == point["matched"] == 60_000 and point["duplicates"] == 2
    assert point["models"] == {"m": 60_000}
    assert point["repeats"] == runs
    assert point["saturated"] is False
    assert "repeat" not in point


def test_points_come_in_variant_order_then_rate_whatever_order_they_ran_in() -> None:
    runs = [
        repeat(v, rate, r, 5.0)
        for r in range(2)
        for v in ("floor", "student")
        for rate in (1000.0, 500.0)
    ]

    points = median_of_repeats(runs, 2)

    assert [(p["variant"], p["offered_rate"]) for p in points] == [
        ("floor", 500.0),
        ("floor", 1000.0),
        ("student", 500.0),
        ("student", 1000.0),
    ]
    assert all(p["repeats_run"] == 2 for p in points)


def test_a_point_most_repeats_did_not_keep_up_with_is_saturated() -> None:
    # Repeat 0 kept up; repeat 1 saturated; repeat 2's ladder stopped below this rate.
    runs = [
        repeat("student", 3000, 0, 40.0),
        repeat("student", 3000, 1, 900.0, saturated=True, missing=12),
    ]

    (point,) = median_of_repeats(runs, 3)

    assert point["saturated"] is True
    assert (point["repeats_run"], point["repeats_kept_up"]) == (2, 1)
    assert point["missing"] == 12
    row = runs_table([point]).splitlines()[-1]
    assert "kept up in 1 of 3 repeats" in row and "ran in 2 of 3 repeats" in row


def test_two_of_three_repeats_keeping_up_is_keeping_up() -> None:
    runs = [repeat("student", 3000, i, 40.0, saturated=i == 1) for i in range(3)]

    (point,) = median_of_repeats(runs, 3)

    assert point["saturated"] is False


def test_the_table_shows_the_p99_range_and_flags_short_points() -> None:
    runs = [repeat("floor", 500, i, p, sent=1_000, matched=1_000) for i, p in enumerate((3, 5, 8))]

    row = runs_table(median_of_repeats(runs, 3)).splitlines()[-1]

    assert "| 5.00 (3.00–8.00) |" in row
    assert "1,000 events per point" in row


def test_the_warm_ups_are_not_in_the_figures(tmp_path: Path) -> None:
    result = BenchResult(
        runs=[repeat("floor", 500, i, 5.0) for i in range(3)],
        warmups=[repeat("broker warm-up", 3000, 0, 70.0), repeat("floor", 500, 0, 40.0)],
    )
    json_path = tmp_path / "e2e.json"
    benchmarks = tmp_path / "BENCHMARKS.md"

    write_outputs(
        result,
        command="streamrec bench e2e",
        started="2026-11-30 20:00 UTC",
        json_path=json_path,
        plot_path=None,
        benchmarks_md=benchmarks,
        settings=Settings(),
        plan=BenchPlan(variants=("floor",), rates=(500.0,)),
    )

    (point,) = orjson.loads(json_path.read_bytes())
    assert [r["p99_ms"] for r in point["repeats"]] == [5.0, 5.0, 5.0]
    text = benchmarks.read_text()
    assert "| floor | 500 |" in text
    assert "broker warm-up |" not in text and "70.0" not in text and "40.0" not in text


def test_a_quick_plan_says_its_points_are_too_short_to_quote() -> None:
    quick = [line.replace("**", "") for line in plan_description(BenchPlan.quick_plan())]
    full = plan_description(BenchPlan())

    assert any("Fewer than 20,000 events per point (1,000, --quick)" in line for line in quick)
    assert not any("Fewer than" in line for line in full)
    assert any("Warm-up, not in the table: 20 s at 3,000 ev/s" in line for line in full)


def test_without_warm_up_the_plan_says_the_broker_is_cold() -> None:
    lines = plan_description(BenchPlan(broker_warmup_s=0))
    assert any("cold broker" in line for line in lines)


def test_pinning_names_the_cores_of_the_broker_and_the_service() -> None:
    pin = parse_pin("broker=0, flow=1-2,3, harness=0", available={0, 1, 2, 3})

    assert pin == CorePin(frozenset({0}), frozenset({1, 2, 3}), frozenset({0}))


@pytest.mark.parametrize(
    ("text", "available", "message"),
    [
        ("broker=0,flow=1", {0}, "at least 2 cores"),
        ("broker=0,flow=0", {0, 1}, "different cores"),
        ("broker=0,flow=4", {0, 1}, "not available here"),
        ("broker=0", {0, 1}, "needs flow=CORES"),
        ("broker=0,gpu=1", {0, 1}, "unknown role 'gpu'"),
        ("0,flow=1", {0, 1}, "role=cores"),
        ("broker=a,flow=1", {0, 1}, "not a core number"),
    ],
)
def test_pinning_is_refused_with_what_to_do(text: str, available: set[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pin(text, available=available)


def test_the_command_refuses_a_pin_the_machine_cannot_honour() -> None:
    cores = len(os.sched_getaffinity(0))

    result = CliRunner().invoke(bench_e2e_command, ["--pin", f"broker=0,flow={cores}"])

    assert result.exit_code == 2
    assert "--pin" in result.output
    assert "at least 2 cores" in result.output or "not available here" in result.output


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 cores")
def test_every_thread_of_a_running_process_is_pinned_and_given_back() -> None:
    # Three threads now; after pinning, one more, born on the pinned core.
    code = (
        "import sys, threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "print('up', flush=True); sys.stdin.readline()\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "print('more', flush=True); time.sleep(30)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == b"up\n"
        core = min(os.sched_getaffinity(0))
        original = os.sched_getaffinity(child.pid)
        pinning = Pinning()

        pinning.pin(child.pid, {core})
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"more\n"

        threads = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(threads) == 5
        assert all(os.sched_getaffinity(t) == {core} for t in threads)
        pinning.restore()
        assert all(os.sched_getaffinity(t) == original for t in threads)
    finally:
        child.kill()
        child.wait()


def test_a_pinned_service_starts_under_taskset(tmp_path: Path) -> None:
    service = Service(
        "floor",
        [[sys.executable, "-c", "pass"]],
        service_environment(Settings()),
        tmp_path / "floor.log",
        cores={1, 2, 3},
    )
    service.stop()

    assert service.commands[0][:3] == ["taskset", "-c", "1-3"]
    assert (tmp_path / "floor.log").read_text().startswith("$ taskset -c 1-3 ")


def test_a_broker_slow_to_give_the_topics_ends_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[str] = []

    class SlowThenReady:
        def __init__(self, settings: Settings, group: str) -> None:
            attempts.append(group)
            if len(attempts) < 3:
                raise KafkaUnavailable("cannot read the end of 'events' partition 0: timed out")

    monkeypatch.setattr(services, "LatencyCollector", SlowThenReady)

    collector = services.latency_collector(Settings(), "g")

    assert isinstance(collector, SlowThenReady) and attempts == ["g", "g", "g"]


def test_a_broker_that_never_answers_fails_the_point(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(settings: Settings, group: str) -> None:
        raise KafkaUnavailable("no broker")

    monkeypatch.setattr(services, "LatencyCollector", never)

    with pytest.raises(KafkaUnavailable, match="no broker"):
        services.latency_collector(Settings(), "g")
