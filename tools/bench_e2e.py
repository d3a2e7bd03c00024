"""`streamrec bench e2e`: latency against throughput, for the Kafka floor and each way of serving.

For each variant the benchmark creates fresh topics, starts the service as a
user would (``streamrec run ...``, configured through ``STREAMREC_*``), waits
until it answers, then climbs a ladder of offered rates.  Each point is an
open-loop replay of the dataset at that rate (``tools.load_generator``, in its
own process) measured by a ``LatencyCollector`` started just before it; CPU
and memory of the service, the broker and the harness are taken from the
process table around the point.  A ladder stops at the first point the
service could not keep up with: every higher rate would only pile up more.

Results go to a JSON list of runs, a latency-vs-throughput PNG and the
"End to end" section of BENCHMARKS.md (``tools.bench_report``).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
import psutil
from tqdm import tqdm

from streamrec.contracts import Event
from streamrec.datasets import DatasetError, load_events
from streamrec.kafka_clients import KafkaUnavailable
from streamrec.settings import REPO_ROOT, Settings
from streamrec.topics import TopicError, create_topics, delete_topics, wanted_topics
from tools.bench_report import section_markdown, write_section
from tools.bench_services import (
    VARIANTS,
    BenchError,
    Broker,
    Service,
    Usage,
    ensure_broker,
    machine_cpu_s,
    service_commands,
    service_environment,
    usage_of,
)
from tools.latency import LatencyCollector, LatencyMatcher
from tools.load_generator import LoadGenerator, LoadPoint
from tools.replay import DatasetSource, KafkaSender

FULL_RATES = (100.0, 250.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0)
# A point whose p99 passes this is past any useful operating point: the ladder stops.
GIVE_UP_P99_MS = 1000.0
# A point that delivered less than this share of the offered rate did not keep up...
KEPT_UP_SHARE = 0.9
# ...if it lasted this long: in a few seconds, latency jitter between the first and the
# last receipt moves the measured rate by more than a tenth (then only missing counts).
RATE_JUDGED_AFTER_S = 10.0
PROBE_INTERVAL_S = 0.5
WARMUP_RATE = 200.0
PAUSE_BETWEEN_POINTS_S = 1.0


@dataclass(frozen=True, slots=True)
class BenchPlan:
    """What one benchmark run measures, and how long it spends on each point."""

    variants: tuple[str, ...] = VARIANTS
    rates: tuple[float, ...] = FULL_RATES
    duration_s: float = 30.0
    drain_s: float = 15.0
    warmup_events: int = 200
    ready_timeout_s: float = 180.0
    partitions: int = 4
    workers: int = 1
    quick: bool = False

    @classmethod
    def quick_plan(cls, **changes: Any) -> BenchPlan:
        """The same ladder, a few seconds per point: a smoke check, not figures to quote."""
        base = cls(duration_s=3.0, drain_s=3.0, warmup_events=50, quick=True)
        return replace(base, **{k: v for k, v in changes.items() if v is not None})


@dataclass(slots=True)
class BenchResult:
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopped_early: list[str] = field(default_factory=list)


def variant_settings(settings: Settings, variant: str, work_dir: Path) -> Settings:
    """Fresh topics and state for one variant, so no run sees another's records or sessions."""
    token = f"{variant}-{uuid.uuid4().hex[:8]}"
    topics = {
        name: f"bench-{token}.{name.removesuffix('_topic')}"
        for name in ("events_topic", "recommendations_topic", "dlq_topic")
    }
    return settings.replace(
        **topics,
        state_dir=work_dir / token / "state",
        recovery_dir=work_dir / token / "recovery",
        metrics_port=0,
    )


def wait_until_serving(
    settings: Settings, service: Service, events: list[Event], start: int, plan: BenchPlan
) -> int:
    """Probe until the service answers, then warm it up; returns the next dataset position.

    One event every half second until the first recommendation comes back
    (the service may still be loading its model, or may start reading at the
    end of the topic), then ``plan.warmup_events`` at a modest rate, all of
    which must be answered.
    """
    source = DatasetSource(events, start, count=sys.maxsize)
    collector = LatencyCollector(settings, group="streamrec-bench-ready")
    sender = KafkaSender(settings, settings.events_topic)
    sender.warm_up()
    deadline = time.monotonic() + plan.ready_timeout_s
    sent = 0

    def check(what: str) -> None:
        if service.exited():
            raise service.failure(f"exited before answering {what}")
        if time.monotonic() > deadline:
            raise service.failure(
                f"did not answer {what} within --ready-timeout {plan.ready_timeout_s:.0f} s"
            )

    try:
        next_probe = 0.0
        while collector.matcher.stats.matched == 0:
            check("its first event")
            if time.monotonic() >= next_probe:
                sender.send(source.record(sent))
                sent += 1
                next_probe = time.monotonic() + PROBE_INTERVAL_S
            collector.poll(0.05)
        warmup_ids = []
        for _ in range(plan.warmup_events):
            sender.send(source.record(sent))
            warmup_ids.append(source.event(sent).event_id)
            sent += 1
            collector.poll(1.0 / WARMUP_RATE)
        while not all(collector.matcher.is_matched(i) for i in warmup_ids):
            check(f"all {plan.warmup_events} warm-up events")
            collector.poll(0.1)
    finally:
        sender.finish(5.0)
        collector.close()
    return start + sent


@dataclass(frozen=True, slots=True)
class _Snapshot:
    wall_s: float
    service: Usage
    broker: Usage
    generator: Usage
    harness: Usage
    machine_cpu_s: float


def _snapshot(service: Service, broker: Broker, generator: LoadGenerator) -> _Snapshot:
    return _Snapshot(
        wall_s=time.monotonic(),
        service=usage_of(service.pids),
        broker=usage_of([broker.pid]),
        generator=usage_of([generator.pid]),
        # This process alone: the services and the load generator are its children.
        harness=usage_of([psutil.Process().pid], children=False),
        machine_cpu_s=machine_cpu_s(),
    )


def measure_point(
    settings: Settings,
    service: Service,
    broker: Broker,
    generator: LoadGenerator,
    point: LoadPoint,
    plan: BenchPlan,
) -> dict[str, Any]:
    """Offer ``point``'s load, collect every recommendation (or drain out), and describe the run."""
    collector = LatencyCollector(settings, group="streamrec-bench-latency")
    collector.settle()
    stop = threading.Event()
    expected: list[int] = []

    def until(matcher: LatencyMatcher) -> bool:
        return stop.is_set() or bool(expected and matcher.stats.matched >= expected[0])

    thread = threading.Thread(target=collector.run, args=(until,), name="latency", daemon=True)
    thread.start()
    before = _snapshot(service, broker, generator)
    try:
        replayed = generator.run(point)
        expected.append(int(replayed["sent"]))
        thread.join(plan.drain_s)
    finally:
        stop.set()
        thread.join()
        collector.close()
    after = _snapshot(service, broker, generator)
    if service.exited():
        raise service.failure(f"exited during the {point.rate:,.0f} ev/s point")
    return describe_run(service.variant, point, plan, replayed, collector.matcher, before, after)


def describe_run(
    variant: str,
    point: LoadPoint,
    plan: BenchPlan,
    replayed: dict[str, Any],
    matcher: LatencyMatcher,
    before: _Snapshot,
    after: _Snapshot,
) -> dict[str, Any]:
    summary = matcher.summary()
    latency = summary["latency_ms"]
    wall = max(after.wall_s - before.wall_s, 1e-9)

    def cpu_pct(first: Usage, last: Usage) -> float:
        return round(100.0 * max(0.0, last.cpu_s - first.cpu_s) / wall, 1)

    flow_cpu = cpu_pct(before.service, after.service)
    broker_cpu = cpu_pct(before.broker, after.broker)
    harness_cpu = round(
        cpu_pct(before.generator, after.generator) + cpu_pct(before.harness, after.harness), 1
    )
    machine_cpu = round(100.0 * (after.machine_cpu_s - before.machine_cpu_s) / wall, 1)
    missing = int(replayed["sent"]) - summary["matched"]
    achieved = summary["throughput_per_s"]
    return {
        "variant": variant,
        "offered_rate": point.rate,
        "achieved_rate": achieved,
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "p99_9_ms": latency["p99_9"],
        "max_ms": latency["max"],
        "mean_ms": latency["mean"],
        "stages_ms": summary["stages_ms"],
        "sent": replayed["sent"],
        "send_rate": replayed["send_rate"],
        "schedule_lag_p99_ms": replayed["lag_p99_ms"],
        "schedule_lag_max_ms": replayed["lag_max_ms"],
        "matched": summary["matched"],
        "missing": missing,
        "duplicates": summary["duplicates"],
        "saturated": missing > 0
        or (point.duration_s >= RATE_JUDGED_AFTER_S and achieved < KEPT_UP_SHARE * point.rate),
        "models": summary["models"],
        "flow_cpu_pct": flow_cpu,
        "flow_rss_mb": round(after.service.rss_mb, 1),
        "broker_cpu_pct": broker_cpu,
        "broker_rss_mb": round(after.broker.rss_mb, 1),
        "harness_cpu_pct": harness_cpu,
        "machine_cpu_pct": machine_cpu,
        "other_cpu_pct": round(max(0.0, machine_cpu - flow_cpu - broker_cpu - harness_cpu), 1),
        "cores": psutil.cpu_count() or 1,
        "duration_s": point.duration_s,
        "partitions": plan.partitions,
        "workers": plan.workers,
        "quick": plan.quick,
    }


def bench_variant(
    settings: Settings,
    variant: str,
    plan: BenchPlan,
    broker: Broker,
    generator: LoadGenerator,
    events: list[Event],
    logs_dir: Path,
    work_dir: Path,
    result: BenchResult,
    bar: tqdm,
) -> None:
    """Start ``variant`` on fresh topics, climb the ladder, and tidy up whatever happens."""
    vsettings = variant_settings(settings, variant, work_dir)
    create_topics(vsettings, plan.partitions)
    service: Service | None = None
    try:
        bar.set_postfix_str(f"{variant}: starting")
        service = Service(
            variant,
            service_commands(variant, plan.workers),
            service_environment(vsettings),
            logs_dir / f"{variant}.log",
        )
        position = wait_until_serving(vsettings, service, events, 0, plan)
        for index, rate in enumerate(plan.rates):
            bar.set_postfix_str(f"{variant} @ {rate:,.0f} ev/s")
            point = LoadPoint(rate, plan.duration_s, position, vsettings.events_topic)
            run = measure_point(vsettings, service, broker, generator, point, plan)
            position += int(run["sent"])
            result.runs.append(run)
            bar.update(1)
            tqdm.write(_run_line(run))
            if run["saturated"] or run["p99_ms"] > GIVE_UP_P99_MS:
                skipped = plan.rates[index + 1 :]
                bar.update(len(skipped))
                if skipped:
                    result.stopped_early.append(
                        f"{variant}: at {rate:,.0f} ev/s (delivered {run['achieved_rate']:,.0f}/s,"
                        f" p99 {run['p99_ms']:.0f} ms); not run: "
                        + ", ".join(f"{r:,.0f}" for r in skipped)
                    )
                break
            time.sleep(PAUSE_BETWEEN_POINTS_S)
    finally:
        if service is not None:
            service.stop()
        delete_topics(vsettings, list(wanted_topics(vsettings)))
        shutil.rmtree(vsettings.state_dir.parent, ignore_errors=True)


def _run_line(run: dict[str, Any]) -> str:
    flag = "  SATURATED" if run["saturated"] else ""
    return (
        f"{run['variant']:>14} @ {run['offered_rate']:>6,.0f} ev/s: achieved "
        f"{run['achieved_rate']:>7,.0f}/s  p50 {run['p50_ms']:7.2f}  p99 {run['p99_ms']:8.2f}  "
        f"max {run['max_ms']:8.2f} ms  flow CPU {run['flow_cpu_pct']:3.0f}%  broker CPU "
        f"{run['broker_cpu_pct']:3.0f}%  machine {run['machine_cpu_pct']:3.0f}%{flag}"
    )


def run_bench(
    settings: Settings,
    plan: BenchPlan,
    *,
    dataset: Path,
    logs_dir: Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> BenchResult:
    """Every variant of ``plan`` in turn, on one broker (started here if none runs)."""
    result = BenchResult()
    events = load_events(dataset)
    work_dir = settings.state_dir.parent / "bench-work"
    broker = ensure_broker(settings, log)
    try:
        with (
            LoadGenerator(settings, dataset) as generator,
            tqdm(
                total=len(plan.variants) * len(plan.rates),
                unit="point",
                desc="bench e2e",
                disable=not progress,
            ) as bar,
        ):
            for variant in plan.variants:
                try:
                    bench_variant(
                        settings,
                        variant,
                        plan,
                        broker,
                        generator,
                        events,
                        logs_dir,
                        work_dir,
                        result,
                        bar,
                    )
                except (BenchError, KafkaUnavailable, TopicError) as err:
                    tqdm.write(f"{variant}: not measured: {err}")
                    first_line = str(err).splitlines()[0].removeprefix(f"{variant}: ")
                    result.failures.append(
                        f"{variant}: {first_line} (log: {logs_dir / f'{variant}.log'})"
                    )
                    bar.update(len(plan.rates) - sum(r["variant"] == variant for r in result.runs))
    finally:
        broker.stop()
    return result


def write_outputs(
    result: BenchResult,
    *,
    command: str,
    started: str,
    json_path: Path,
    plot_path: Path | None,
    benchmarks_md: Path | None,
    settings: Settings,
    plan: BenchPlan,
) -> list[Path]:
    """The JSON list of runs, the plot, and (when asked) the BENCHMARKS.md section."""
    written = []
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(result.runs, option=orjson.OPT_INDENT_2))
    written.append(json_path)
    if plot_path is not None and result.runs:
        from tools.plots import plot_latency_vs_throughput

        written.append(plot_latency_vs_throughput(result.runs, plot_path))
    if benchmarks_md is not None:
        base = benchmarks_md.parent.resolve()
        section = section_markdown(
            result.runs,
            command=command,
            started=started,
            json_path=_relative(json_path, base),
            plot_path=_relative(plot_path, base) if plot_path and result.runs else None,
            failures=result.failures,
            stopped_early=result.stopped_early,
            kafka_version=settings.kafka_version,
            quick=plan.quick,
            variants=plan.variants,
        )
        write_section(benchmarks_md, section)
        written.append(benchmarks_md)
    return written


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path)


def _command_line(ctx: click.Context) -> str:
    """The command as typed (for BENCHMARKS.md), or rebuilt from its options if not run by hand."""
    if sys.argv[1:3] == ["bench", "e2e"]:
        return shlex.join(["streamrec", *sys.argv[1:]])
    words = ["streamrec", "bench", "e2e"]
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is not click.core.ParameterSource.COMMANDLINE:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _parse_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise click.BadParameter(f"give at least one {what}, comma separated")
    return items


@click.command("e2e")
@click.option(
    "--quick",
    is_flag=True,
    help="The same ladder at a few seconds per point: a smoke check of the whole harness.",
)
@click.option(
    "--variants",
    default=",".join(VARIANTS),
    show_default=True,
    help="What to measure, comma separated: floor (Kafka alone), teacher (fp32 flow), "
    "student (the model card's choice), student-2proc (the student on two processes).",
)
@click.option(
    "--rates",
    default=",".join(f"{r:g}" for r in FULL_RATES),
    show_default=True,
    help="The ladder of offered rates, events per second.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds of load per point [default: 30; --quick: 3].",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to wait after a point for late recommendations [default: 15; --quick: 3].",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Partitions of the fresh events/recommendations topics [default: STREAMREC_EVENTS_"
    "PARTITIONS, 4]; two processes need at least two.",
)
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Bytewax worker threads per flow process.",
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="Seconds a service may take to answer its first event (loading the model included).",
)
@click.option(
    "--data",
    "dataset",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Dataset to replay [default: STREAMREC_DATA_DIR].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The runs as a JSON list [default: benchmarks/e2e.json; with --quick: "
    "run/bench/e2e-quick.json].",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Latency vs throughput PNG [default: the JSON path with .png].",
)
@click.option(
    "--benchmarks-md",
    type=click.Path(dir_okay=False, path_type=Path),
    default=REPO_ROOT / "BENCHMARKS.md",
    show_default=False,
    help="File whose '## End to end' section gets the table [default: BENCHMARKS.md].",
)
@click.option(
    "--update-benchmarks/--no-update-benchmarks",
    default=None,
    help="Write the table into BENCHMARKS.md [default: yes, except with --quick].",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def bench_e2e_command(
    quick: bool,
    variants: str,
    rates: str,
    duration: float | None,
    drain: float | None,
    partitions: int | None,
    workers: int,
    ready_timeout: float,
    dataset: Path | None,
    json_path: Path | None,
    plot_path: Path | None,
    benchmarks_md: Path,
    update_benchmarks: bool | None,
    progress: bool,
) -> None:
    """Latency vs throughput of the Kafka floor, the fp32 teacher flow and the served student flow.

    Starts what it needs (the local broker if none answers, fresh topics, each
    service), then offers each rate of the ladder on an open-loop schedule and
    records achieved rate, p50/p90/p99/p99.9/max latency, and the CPU and memory
    of the service and of the broker. A variant's ladder stops at the first rate
    it cannot keep up with.

    \b
    Examples:
      streamrec bench e2e                             # the full ladder, ~30 s a point
      streamrec bench e2e --quick --variants floor    # a smoke check in about a minute
      streamrec bench e2e --variants floor,student --rates 1000,3000
    """
    settings = Settings.from_env()
    chosen = _parse_list(variants, "variant")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(
            f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
            param_hint="--variants",
        )
    try:
        ladder = tuple(float(r) for r in _parse_list(rates, "rate"))
    except ValueError:
        raise click.BadParameter(
            f"rates must be numbers, got {rates!r}", param_hint="--rates"
        ) from None
    changes: dict[str, Any] = {
        "variants": tuple(chosen),
        "rates": ladder,
        "duration_s": duration,
        "drain_s": drain,
        "partitions": partitions or settings.events_partitions,
        "workers": workers,
        "ready_timeout_s": ready_timeout,
    }
    if quick:
        plan = BenchPlan.quick_plan(**changes)
    else:
        plan = replace(BenchPlan(), **{k: v for k, v in changes.items() if v is not None})
    if "student-2proc" in plan.variants and plan.partitions < 2:
        raise click.BadParameter(
            "student-2proc needs at least 2 partitions", param_hint="--partitions"
        )
    default_json = "run/bench/e2e-quick.json" if quick else "benchmarks/e2e.json"
    json_path = json_path or REPO_ROOT / default_json
    plot_path = plot_path or json_path.with_suffix(".png")
    update = (not quick) if update_benchmarks is None else update_benchmarks
    command = _command_line(click.get_current_context())
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        result = run_bench(
            settings,
            plan,
            dataset=dataset or settings.data_dir,
            logs_dir=json_path.parent / "logs",
            log=click.echo,
            progress=progress,
        )
    except (BenchError, KafkaUnavailable, TopicError, DatasetError) as err:
        raise click.ClickException(str(err)) from None
    for path in write_outputs(
        result,
        command=command,
        started=started,
        json_path=json_path,
        plot_path=plot_path,
        benchmarks_md=benchmarks_md if update else None,
        settings=settings,
        plan=plan,
    ):
        click.echo(f"wrote {path}")
    if result.failures:
        raise click.ClickException(
            "some variants could not be measured:\n  " + "\n  ".join(result.failures)
        )
