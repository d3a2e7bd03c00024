"""`streamrec bench e2e`: the harness end to end on the Kafka floor, and its verdicts."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from streamrec.bench.e2e import BenchPlan, bench_e2e_command, variant_settings
from streamrec.bench.report import evaluate_targets, write_section
from streamrec.bench.services import BenchError, service_commands
from streamrec.settings import Settings
from streamrec.tools.kafka_local import LocalKafka
from streamrec.tools.services import Service, service_environment, wait_until_serving


def bench_env(kafka: LocalKafka, settings: Settings) -> dict[str, str]:
    """The test broker, as the benchmark's own settings would find it."""
    return {
        "STREAMREC_BROKERS": kafka.bootstrap,
        "STREAMREC_KAFKA_PORT": str(kafka.settings.kafka_port),
        "STREAMREC_KAFKA_CONTROLLER_PORT": str(kafka.settings.kafka_controller_port),
        "STREAMREC_KAFKA_DIR": str(kafka.settings.kafka_dir),
        "STREAMREC_STATE_DIR": str(settings.state_dir),
    }


@pytest.mark.kafka
def quick_bench(
    kafka: LocalKafka, settings: Settings, variant: str, rate: int, repeats: int, *extra: str
) -> Any:
    """``bench e2e --quick`` of one variant at one rate: ``repeats`` points of ``rate`` events."""
    return CliRunner().invoke(
        bench_e2e_command,
        [
            "--quick",
            *("--variants", variant, "--rates", str(rate), "--repeats", str(repeats)),
            *("--min-events", str(rate), "--duration", "1", "--drain", "60", "--no-progress"),
            *extra,
        ],
        env=bench_env(kafka, settings),
    )


def test_a_quick_bench_of_the_floor_repeats_its_point_and_reports_the_median(
    kafka: LocalKafka, kafka_settings: Settings, tmp_path: Path
) -> None:
    # Mechanics only: every figure may be as slow as the machine makes it.
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## State\n\nstate figures stay\n")
    json_path = tmp_path / "e2e.json"

    result = quick_bench(
        kafka,
        kafka_settings,
        "floor",
        300,
        3,
        *("--warmup", "2", "--partitions", "2", "--json", str(json_path)),
        *("--benchmarks-md", str(benchmarks), "--update-benchmarks"),
    )

    assert result.exit_code == 0, result.output
    assert "warm-up, not reported: 2 s at 300 ev/s through the floor" in result.output
    assert "Fewer than 20,000 events per point (300, --quick)" in result.output
    (point,) = orjson.loads(json_path.read_bytes())
    repeats = point["repeats"]
    assert [r["repeat"] for r in repeats] == [0, 1, 2]
    for repeat in repeats:
        # 300 events each: the warm-ups (600 events at 300 ev/s for 2 s) are not among them.
        assert repeat["sent"] == repeat["matched"] == 300
        assert repeat["models"] == {"kafka-floor": 300}
        assert repeat["broker_cpu_pct"] > 0  # the broker's process was found and measured
    assert (point["variant"], point["offered_rate"]) == ("floor", 300)
    assert point["sent"] == point["matched"] == 900 and point["missing"] == 0
    for figure in ("p50_ms", "p99_ms", "achieved_rate"):
        middle = sorted(r[figure] for r in repeats)[1]
        assert point[figure] == pytest.approx(middle, abs=1e-3)
    assert json_path.with_suffix(".png").stat().st_size > 0
    text = benchmarks.read_text()
    assert "## State\n\nstate figures stay" in text
    assert "streamrec bench e2e --quick --variants floor --rates 300 --repeats 3" in text
    assert "the median of 3 repeat(s)" in text
    assert "Warm-up, not in the table: 2 s at 300 ev/s" in text
    assert text.count("| floor | 300 |") == 1
    assert "300 events per point" in text


@pytest.mark.kafka
def test_a_service_that_dies_is_reported_with_the_tail_of_its_log(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    service = Service(
        "student", [command], service_environment(kafka_settings), tmp_path / "student.log"
    )
    plan = BenchPlan(ready_timeout_s=20.0)
    try:
        with pytest.raises(BenchError) as raised:
            wait_until_serving(kafka_settings, service, _events(), 0, plan.readiness())
    finally:
        service.stop()
    message = str(raised.value)
    assert "student: exited before answering its first event" in message
    assert "exited with 3" in message
    assert "no model here" in message


def _events() -> list[Any]:
    from streamrec.contracts import Event

    return [Event(f"e{i}", f"u{i}", "i1", "view", 1_700_000_000_000 + i) for i in range(10)]


def test_unknown_variants_are_refused_with_the_known_ones() -> None:
    result = CliRunner().invoke(bench_e2e_command, ["--variants", "floor,gpu"])
    assert result.exit_code == 2
    assert "floor, teacher, student, student-2proc" in result.output


def run(variant: str, rate: float, p50: float, p99: float, **extra: Any) -> dict[str, Any]:
    return {
        "variant": variant,
        "offered_rate": rate,
        "achieved_rate": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        **extra,
    }


def test_targets_are_met_when_the_flow_is_close_to_the_floor_and_fast() -> None:
    runs = [
        run("floor", 1000, 2.0, 6.0),
        run("teacher", 250, 20.0, 40.0),
        run("teacher", 500, 80.0, 400.0, saturated=True),
        run("student", 1000, 3.5, 12.0),
        run("student", 3000, 5.0, 30.0),
    ]

    verdicts = {t.name: t.met for t in evaluate_targets(runs)}

    assert verdicts == {
        "student: p50 at 1,000 ev/s ≤ 2× the Kafka floor": True,
        "student: p99 at 1,000 ev/s ≤ 20 ms": True,
        "student: highest rate with p99 ≤ 50 ms ≥ 3,000 ev/s": True,
        "student: that rate ≥ 5× the fp32 teacher's": True,  # 3,000 vs 250 ev/s
    }


def test_the_student_must_serve_five_times_the_teachers_rate() -> None:
    runs = [
        run("teacher", 500, 10.0, 40.0),
        run("teacher", 1000, 90.0, 300.0),
        run("student", 2000, 4.0, 20.0),
        run("student", 3000, 9.0, 65.0),
    ]

    ratio = next(t for t in evaluate_targets(runs) if "teacher" in t.name)

    assert ratio.met is False
    assert ratio.measured.startswith("2,000 vs teacher 500 ev/s (4.0×)")


def test_a_missed_target_says_what_stands_in_the_way() -> None:
    stages = {
        "queueing": {"p50": 1.0, "p99": 30.0},
        "processing": {"p50": 2.0, "p99": 5.0},
        "output": {"p50": 1.0, "p99": 2.0},
    }
    runs = [
        run("floor", 1000, 2.0, 5.0),
        run("student", 1000, 4.0, 37.0, flow_cpu_pct=97.0, stages_ms=stages),
    ]

    missed = {t.name: t for t in evaluate_targets(runs) if t.met is False}

    p99 = missed["student: p99 at 1,000 ev/s ≤ 20 ms"]
    assert p99.measured == "37.00 ms"
    assert any("CPU-bound: 97% of a core" in o for o in p99.obstacles)
    assert any("mostly queueing" in o for o in p99.obstacles)


def test_the_end_to_end_section_is_replaced_and_other_sections_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## State\n\nA\n\n## End to end\n\nold\n\n## Model\n\nB\n")

    write_section(path, "## End to end\n\nnew table\n")

    assert path.read_text() == (
        "# Benchmarks\n\n## State\n\nA\n\n## End to end\n\nnew table\n\n## Model\n\nB\n"
    )


def test_the_end_to_end_section_is_appended_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## State\n\nA\n")
    write_section(path, "## End to end\n\nnew\n")
    assert path.read_text() == "# Benchmarks\n\n## State\n\nA\n\n## End to end\n\nnew\n"


def test_two_process_student_runs_as_a_bytewax_cluster_of_two() -> None:
    first, second = service_commands("student-2proc")

    assert first[1:4] == ["run", "-w", "1"] and "--variant" not in first
    assert first[first.index("-i") + 1] == "0" and second[second.index("-i") + 1] == "1"
    addresses = first[first.index("-a") + 1]
    assert addresses == second[second.index("-a") + 1]
    assert len(addresses.split(";")) == 2


def test_the_teacher_is_served_by_name_and_the_floor_by_its_module() -> None:
    assert service_commands("teacher")[0][-2:] == ["--variant", "teacher"]
    assert service_commands("floor")[0][1:] == ["-m", "streamrec.bench.kafka_floor"]


def test_each_variant_runs_on_fresh_topics_and_state_without_metrics(tmp_path: Path) -> None:
    settings = variant_settings(Settings(), "student", tmp_path)

    env = service_environment(settings)

    assert env["STREAMREC_EVENTS_TOPIC"].startswith("bench-student-")
    assert env["STREAMREC_EVENTS_TOPIC"] == settings.events_topic != Settings().events_topic
    assert env["STREAMREC_STATE_DIR"].startswith(str(tmp_path))
    assert env["STREAMREC_METRICS_PORT"] == "0"


@pytest.mark.kafka
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 cores")
def test_a_pinned_bench_runs_the_service_and_the_broker_apart_and_lets_the_broker_go(
    kafka: LocalKafka, kafka_settings: Settings, tmp_path: Path
) -> None:
    broker, service = sorted(os.sched_getaffinity(0))[:2]
    broker_pid = kafka.status().pid
    assert broker_pid is not None
    before = _affinities(broker_pid)
    json_path = tmp_path / "e2e.json"

    result = quick_bench(
        kafka,
        kafka_settings,
        "floor",
        200,
        1,
        *("--warmup", "1", "--pin", f"broker={broker},flow={service}"),
        *("--json", str(json_path), "--no-update-benchmarks"),
    )

    assert result.exit_code == 0, result.output
    (point,) = orjson.loads(json_path.read_bytes())
    assert point["pinned"] == f"broker on cores {broker}, service on cores {service}"
    (run,) = point["repeats"]
    assert (run["broker_cores"], run["service_cores"]) == (str(broker), str(service))
    log = (tmp_path / "logs" / "floor.log").read_text()
    assert f"$ taskset -c {service} " in log
    # Threads the broker had are back on their cores; any born meanwhile, on the broker's.
    after = _affinities(broker_pid)
    assert all(after[t] == cores for t, cores in before.items() if t in after)
    assert all(cores == before[broker_pid] for t, cores in after.items() if t not in before)


def _affinities(pid: int) -> dict[int, set[int]]:
    found = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            found[int(name)] = os.sched_getaffinity(int(name))
    return found
