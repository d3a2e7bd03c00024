"""`streamrec bench e2e`: latency against throughput, for the Kafka floor and each way of serving.

For each variant the benchmark creates fresh topics, starts the service as a
user would (``streamrec run ...``, configured through ``STREAMREC_*``), waits
until it answers, warms it up, then climbs a ladder of offered rates.  Each
point is an open-loop replay of the dataset at that rate
(``streamrec.bench.load_generator``, in its own process) of at least 20,000 events,
measured by a ``LatencyCollector`` started just before it; CPU and memory of
the service, the broker and the harness are taken from the process table
around the point.  A ladder stops at the first point the service could not
keep up with: every higher rate would only pile up more.

Before the first measured point the broker is warmed up by unreported load
through the floor.  Every ladder is climbed ``--repeats`` times, the variants
taking turns, and each point reports the median of its repeats.

Results go to a JSON list of points (each with its repeats), a
latency-vs-throughput PNG and the "End to end" section of BENCHMARKS.md
(``streamrec.bench.report``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
import psutil
from confluent_kafka import KafkaException
from tqdm import tqdm

from streamrec.bench.load_generator import LoadGenerator, LoadPoint
from streamrec.bench.report import median_of_repeats, section_markdown, write_section
from streamrec.bench.services import (
    FLOOR,
    PEERS,
    QUIX,
    SETTING_VARIANTS,
    STUDENT_EXACTLY_ONCE,
    STUDENT_NO_CHANGELOG,
    STUDENT_SCRAPED,
    VARIANTS,
    BenchError,
    Broker,
    CorePin,
    Pinning,
    Usage,
    ensure_broker,
    ensure_quix_venv,
    machine_cpu_s,
    parse_pin,
    service_commands,
    usage_of,
)
from streamrec.contracts import Event
from streamrec.datasets import DatasetError, load_events
from streamrec.kafka_clients import KafkaUnavailable, admin_client
from streamrec.settings import EXACTLY_ONCE, REPO_ROOT, Settings
from streamrec.tools.latency import LatencyMatcher
from streamrec.tools.services import (
    Readiness,
    Service,
    core_list,
    free_port,
    latency_collector,
    service_environment,
    wait_until_serving,
)
from streamrec.topics import TopicError, create_topics, delete_topics, wanted_topics

FULL_RATES = (500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0)
# Fewer events per point and a p99 rests on too few samples to quote (200 above it at 20,000).
MIN_EVENTS = 20_000
QUICK_MIN_EVENTS = 1_000
DEFAULT_REPEATS = 3
# The broker warm-up runs the floor at the ladder's top rate, but no faster than this.
BROKER_WARMUP_RATE_CAP = 3000.0
# A point whose p99 passes this is past any useful operating point: the ladder stops.
GIVE_UP_P99_MS = 1000.0
# A point that delivered less than this share of the offered rate did not keep up...
KEPT_UP_SHARE = 0.9
# ...if it lasted this long: in a few seconds, latency jitter between the first and the
# last receipt moves the measured rate by more than a tenth (then only missing counts).
RATE_JUDGED_AFTER_S = 10.0
WARMUP_RATE = 200.0
PAUSE_BETWEEN_POINTS_S = 1.0
SCRAPE_EVERY_S = 0.1
BROKER_WARMUP = "broker warm-up"


@dataclass(frozen=True, slots=True)
class BenchPlan:
    """What one benchmark run measures, and how long it spends on each point.

    A point lasts ``duration_s`` or as long as ``min_events`` take at its
    rate, whichever is longer; the ladder of every variant is climbed
    ``repeats`` times, the variants taking turns (``ladder_order``).
    """

    variants: tuple[str, ...] = VARIANTS
    rates: tuple[float, ...] = FULL_RATES
    repeats: int = DEFAULT_REPEATS
    min_events: int = MIN_EVENTS
    duration_s: float = RATE_JUDGED_AFTER_S
    drain_s: float = 15.0
    # Unreported load through the floor before the first measured point (0: none).
    broker_warmup_s: float = 20.0
    # Unreported load at the first rate after each service starts (JIT, caches, connections).
    flow_warmup_s: float = 5.0
    warmup_events: int = 200
    ready_timeout_s: float = 180.0
    partitions: int = 4
    workers: int = 1
    quick: bool = False
    pin: CorePin | None = None

    @classmethod
    def quick_plan(cls, **changes: Any) -> BenchPlan:
        """The same ladder, a few seconds per point: a smoke check, not figures to quote."""
        base = cls(
            min_events=QUICK_MIN_EVENTS,
            duration_s=2.0,
            drain_s=3.0,
            broker_warmup_s=5.0,
            flow_warmup_s=2.0,
            warmup_events=50,
            quick=True,
        )
        return replace(base, **{k: v for k, v in changes.items() if v is not None})

    def point_duration_s(self, rate: float) -> float:
        """Seconds of load at ``rate``: enough for ``min_events``, and at least ``duration_s``."""
        return max(self.duration_s, self.min_events / rate)

    def readiness(self) -> Readiness:
        """How each service is judged ready before its first point."""
        return Readiness(self.warmup_events, self.ready_timeout_s)

    def broker_warmup_rate(self) -> float:
        return min(max(self.rates), BROKER_WARMUP_RATE_CAP)


def ladder_order(variants: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, variant) in the order the ladders are climbed: the variants take turns.

    Whatever else the machine does drifts over minutes; taking turns spreads
    that drift over every variant instead of charging it to the last one.

    >>> ladder_order(["floor", "student"], 2)
    [(0, 'floor'), (0, 'student'), (1, 'floor'), (1, 'student')]
    """
    return [(repeat, variant) for repeat in range(repeats) for variant in variants]


@dataclass(slots=True)
class BenchResult:
    """Every measured point (one per variant, rate and repeat), and what could not be measured.

    ``warmups`` holds the unreported warm-up loads, for the console only.
    """

    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopped_early: list[str] = field(default_factory=list)
    warmups: list[dict[str, Any]] = field(default_factory=list)

    def medians(self, repeats: int) -> list[dict[str, Any]]:
        return median_of_repeats(self.runs, repeats)


def variant_settings(settings: Settings, variant: str, work_dir: Path) -> Settings:
    """Fresh topics and state for one variant, so no run sees another's records or sessions."""
    token = f"{variant.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
    topics = {
        name: f"bench-{token}.{name.removesuffix('_topic')}"
        for name in ("events_topic", "recommendations_topic", "dlq_topic")
    }
    flow_settings: dict[str, object] = {}
    if variant == STUDENT_EXACTLY_ONCE:
        # Its collector then reads read_committed, as a downstream consumer would.
        flow_settings["guarantee"] = EXACTLY_ONCE
    elif variant == STUDENT_NO_CHANGELOG:
        flow_settings["changelog"] = False
    return settings.replace(
        **topics,
        **flow_settings,
        state_dir=work_dir / token / "state",
        recovery_dir=work_dir / token / "recovery",
        metrics_port=free_port() if variant == STUDENT_SCRAPED else 0,
    )


class Scraper:
    """Fetches the flow's /metrics every ``SCRAPE_EVERY_S``, as an eager Prometheus would.

    Each page is rendered on the flow's process, under the interpreter lock that
    scoring needs too: the scraped variant's latency beside the student's is its cost.
    """

    def __init__(self, settings: Settings) -> None:
        self._url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self.took_s: list[float] = []
        self.failed = 0

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                with urllib.request.urlopen(self._url, timeout=5.0) as page:
                    page.read()
                self.took_s.append(time.monotonic() - began)
            except OSError:
                self.failed += 1
            self._stop.wait(max(0.0, SCRAPE_EVERY_S - (time.monotonic() - began)))

    def describe(self) -> dict[str, Any]:
        took = sorted(self.took_s)
        return {
            "scrapes": len(took),
            "scrapes_failed": self.failed,
            "scrape_p50_ms": round(1000 * took[len(took) // 2], 2) if took else None,
        }


@dataclass(frozen=True, slots=True)
class _Snapshot:
    wall_s: float
    service: Usage
    broker: Usage
    generator: Usage
    harness: Usage
    machine_cpu_s: float
    # The cores the service's and the broker's main threads may run on, as seen (--pin).
    service_cores: str
    broker_cores: str


def _snapshot(service: Service, broker: Broker, generator: LoadGenerator) -> _Snapshot:
    return _Snapshot(
        wall_s=time.monotonic(),
        service=usage_of(service.pids),
        broker=usage_of([broker.pid]),
        generator=usage_of([generator.pid]),
        # This process alone: the services and the load generator are its children.
        harness=usage_of([psutil.Process().pid], children=False),
        machine_cpu_s=machine_cpu_s(),
        service_cores=_cores_of(service.pids[0]),
        broker_cores=_cores_of(broker.pid),
    )


def _cores_of(pid: int | None) -> str:
    try:
        return core_list(os.sched_getaffinity(pid)) if pid is not None else "?"
    except (ProcessLookupError, PermissionError):
        return "?"


def measure_point(
    settings: Settings,
    service: Service,
    broker: Broker,
    generator: LoadGenerator,
    point: LoadPoint,
    plan: BenchPlan,
) -> dict[str, Any]:
    """Offer ``point``'s load, collect every recommendation (or drain out), and describe the run."""
    collector = latency_collector(settings, "streamrec-bench-latency")
    collector.settle()
    stop = threading.Event()
    expected: list[int] = []

    def until(matcher: LatencyMatcher) -> bool:
        return stop.is_set() or bool(expected and matcher.stats.matched >= expected[0])

    thread = threading.Thread(target=collector.run, args=(until,), name="latency", daemon=True)
    thread.start()
    scraper = Scraper(settings) if settings.metrics_port else None
    before = _snapshot(service, broker, generator)
    try:
        with scraper or contextlib.nullcontext():
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
    run = describe_run(service.variant, point, plan, replayed, collector.matcher, before, after)
    if scraper is not None:
        run.update(scraper.describe())
    return run


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
        "pinned": plan.pin.describe() if plan.pin else None,
        "service_cores": before.service_cores,
        "broker_cores": before.broker_cores,
    }


@contextmanager
def serving(
    settings: Settings,
    variant: str,
    plan: BenchPlan,
    events: list[Event],
    log_path: Path,
    work_dir: Path,
    label: str | None = None,
) -> Iterator[tuple[Settings, Service, int]]:
    """``variant`` started on fresh topics and answering: (its settings, it, next position).

    Stopped, its topics deleted and its state removed on the way out,
    whatever happened.  ``label`` names the topics (default: the variant).
    """
    vsettings = variant_settings(settings, label or variant, work_dir)
    create_topics(vsettings, plan.partitions)
    service: Service | None = None
    try:
        service = Service(
            variant,
            service_commands(variant, plan.workers),
            service_environment(vsettings),
            log_path,
            cores=plan.pin.flow if plan.pin else None,
        )
        position = wait_until_serving(vsettings, service, events, 0, plan.readiness())
        yield vsettings, service, position
    finally:
        if service is not None:
            service.stop()
        try:
            delete_topics(vsettings, _topics_of(vsettings))
        except (KafkaException, TopicError) as err:
            # Their names are unique: left behind, they cost disk, not the figures.
            tqdm.write(f"{label or variant}: topics left on the broker ({err})")
        shutil.rmtree(vsettings.state_dir.parent, ignore_errors=True)


def _topics_of(settings: Settings) -> list[str]:
    """The variant's topics and those a peer made (Quix names its changelogs after them)."""
    prefix = settings.events_topic.removesuffix(".events")
    present = admin_client(settings).list_topics(timeout=30.0).topics
    return sorted({*wanted_topics(settings), *(name for name in present if prefix in name)})


def warm_broker(
    settings: Settings,
    plan: BenchPlan,
    broker: Broker,
    generator: LoadGenerator,
    events: list[Event],
    logs_dir: Path,
    work_dir: Path,
    result: BenchResult,
) -> None:
    """Unreported load through the floor on topics of its own, before the first measured point.

    A broker's first seconds of real load run its JVM's code cold, and its
    connections and page cache are new: measured then, even the floor's p99
    came out several times its warm value.
    """
    rate = plan.broker_warmup_rate()
    with serving(
        settings, FLOOR, plan, events, logs_dir / "broker-warmup.log", work_dir, "warmup"
    ) as (vsettings, service, position):
        point = LoadPoint(rate, plan.broker_warmup_s, position, vsettings.events_topic)
        run = measure_point(vsettings, service, broker, generator, point, plan)
    result.warmups.append({**run, "variant": BROKER_WARMUP})
    tqdm.write(
        f"warm-up, not reported: {plan.broker_warmup_s:g} s at {rate:,.0f} ev/s through the "
        f"floor (p99 {run['p99_ms']:.1f} ms)"
    )


def bench_ladder(
    settings: Settings,
    variant: str,
    repeat: int,
    plan: BenchPlan,
    broker: Broker,
    generator: LoadGenerator,
    events: list[Event],
    logs_dir: Path,
    work_dir: Path,
    result: BenchResult,
    bar: tqdm,
) -> None:
    """Start ``variant``, warm it up, climb the ladder once, and tidy up whatever happens."""
    bar.set_postfix_str(f"{variant} #{repeat + 1}: starting")
    with serving(settings, variant, plan, events, logs_dir / f"{variant}.log", work_dir) as (
        vsettings,
        service,
        position,
    ):
        if plan.flow_warmup_s > 0:
            bar.set_postfix_str(f"{variant} #{repeat + 1}: warm-up")
            warmup = LoadPoint(plan.rates[0], plan.flow_warmup_s, position, vsettings.events_topic)
            run = measure_point(vsettings, service, broker, generator, warmup, plan)
            position += int(run["sent"])
            result.warmups.append({**run, "repeat": repeat})
            time.sleep(PAUSE_BETWEEN_POINTS_S)
        for index, rate in enumerate(plan.rates):
            bar.set_postfix_str(f"{variant} #{repeat + 1} @ {rate:,.0f} ev/s")
            duration = plan.point_duration_s(rate)
            point = LoadPoint(rate, duration, position, vsettings.events_topic)
            started = datetime.now(UTC).isoformat(timespec="seconds")
            run = measure_point(vsettings, service, broker, generator, point, plan)
            run.update(repeat=repeat, started=started)
            position += int(run["sent"])
            result.runs.append(run)
            bar.update(1)
            tqdm.write(_run_line(run))
            if run["saturated"] or run["p99_ms"] > GIVE_UP_P99_MS:
                skipped = plan.rates[index + 1 :]
                bar.update(len(skipped))
                if skipped:
                    result.stopped_early.append(
                        f"{variant} (repeat {repeat + 1} of {plan.repeats}): at {rate:,.0f} ev/s "
                        f"(delivered {run['achieved_rate']:,.0f}/s, p99 {run['p99_ms']:.0f} ms); "
                        "not run: " + ", ".join(f"{r:,.0f}" for r in skipped)
                    )
                break
            time.sleep(PAUSE_BETWEEN_POINTS_S)


def _run_line(run: dict[str, Any]) -> str:
    flag = "  SATURATED" if run["saturated"] else ""
    repeat = f" #{run['repeat'] + 1}" if "repeat" in run else ""
    spread = ""
    if run.get("p99_range_ms"):
        low, high = run["p99_range_ms"]
        spread = f" ({low:.1f}-{high:.1f})"
    return (
        f"{run['variant']:>14}{repeat:<3} @ {run['offered_rate']:>6,.0f} ev/s: achieved "
        f"{run['achieved_rate']:>7,.0f}/s  p50 {run['p50_ms']:7.2f}  p99 {run['p99_ms']:8.2f}"
        f"{spread}  max {run['max_ms']:8.2f} ms  flow CPU {run['flow_cpu_pct']:3.0f}%  broker CPU "
        f"{run['broker_cpu_pct']:3.0f}%  machine {run['machine_cpu_pct']:3.0f}%{flag}"
    )


@contextmanager
def pinned(plan: BenchPlan, broker: Broker, generator: LoadGenerator) -> Iterator[None]:
    """The broker (and, if asked, this process and the load generator) on the plan's cores."""
    if plan.pin is None:
        yield
        return
    if broker.pid is None:
        raise BenchError(
            f"cannot pin the broker at {broker.bootstrap}: its process is not visible from "
            "here; run without --pin, or let the benchmark start the local broker"
        )
    pinning = Pinning()
    try:
        pinning.pin(broker.pid, plan.pin.broker)
        if plan.pin.harness is not None:
            for pid in (os.getpid(), generator.pid):
                if pid is not None:
                    pinning.pin(pid, plan.pin.harness)
        yield
    finally:
        pinning.restore()


def plan_description(plan: BenchPlan) -> list[str]:
    """How the run was made, in lines for the console and BENCHMARKS.md."""
    points = ", ".join(f"{r:,.0f} ev/s: {plan.point_duration_s(r):.0f} s" for r in plan.rates)
    lines = [
        f"Each point: the median of {plan.repeats} repeat(s), the variants taking turns "
        f"({', '.join(plan.variants)}, then again); at least {plan.min_events:,} events and "
        f"{plan.duration_s:g} s per point ({points})",
    ]
    if plan.broker_warmup_s > 0:
        lines.append(
            f"Warm-up, not in the table: {plan.broker_warmup_s:g} s at "
            f"{plan.broker_warmup_rate():,.0f} ev/s through the floor on topics of its own "
            f"before the first point; {plan.flow_warmup_s:g} s at {plan.rates[0]:,.0f} ev/s "
            "after each service starts"
        )
    else:
        lines.append("**No broker warm-up** (`--warmup 0`): the first point meets a cold broker")
    if plan.min_events < MIN_EVENTS:
        lines.append(
            f"**Fewer than {MIN_EVENTS:,} events per point** ({plan.min_events:,}"
            f"{', --quick' if plan.quick else ''}): a check of the harness, not figures to quote"
        )
    if plan.pin is not None:
        lines.append(f"Pinned: {plan.pin.describe()}")
    return lines


def prepare_variants(plan: BenchPlan, result: BenchResult, log: Callable[[str], None]) -> set[str]:
    """Install what a variant needs beyond this environment; returns those that cannot run."""
    failed: set[str] = set()
    if QUIX in plan.variants:
        try:
            ensure_quix_venv(log)
        except BenchError as err:
            failed.add(QUIX)
            result.failures.append(str(err).splitlines()[0])
            log(str(err))
    return failed


def run_bench(
    settings: Settings,
    plan: BenchPlan,
    *,
    dataset: Path,
    logs_dir: Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> BenchResult:
    """Every variant's ladder ``plan.repeats`` times, taking turns, on one warmed-up broker."""
    result = BenchResult()
    events = load_events(dataset)
    work_dir = settings.state_dir.parent / "bench-work"
    for line in plan_description(plan):
        log(line.replace("**", ""))
    broker = ensure_broker(settings, log)
    try:
        with (
            LoadGenerator(settings, dataset) as generator,
            pinned(plan, broker, generator),
            tqdm(
                total=plan.repeats * len(plan.variants) * len(plan.rates),
                unit="point",
                desc="bench e2e",
                disable=not progress,
            ) as bar,
        ):
            failed = prepare_variants(plan, result, log)
            if plan.broker_warmup_s > 0:
                bar.set_postfix_str("warming the broker")
                warm_broker(settings, plan, broker, generator, events, logs_dir, work_dir, result)
            for repeat, variant in ladder_order(plan.variants, plan.repeats):
                if variant in failed:
                    bar.update(len(plan.rates))
                    continue
                try:
                    bench_ladder(
                        settings,
                        variant,
                        repeat,
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
                    # Never measured: it will not start the next time either. Measured
                    # before: the failure may pass (a broker slow to answer), so go on.
                    if not any(r["variant"] == variant for r in result.runs):
                        failed.add(variant)
                    tqdm.write(f"{variant} (repeat {repeat + 1}): not measured: {err}")
                    first_line = str(err).splitlines()[0].removeprefix(f"{variant}: ")
                    result.failures.append(
                        f"{variant} (repeat {repeat + 1} of {plan.repeats}): {first_line} "
                        f"(log: {logs_dir / f'{variant}.log'})"
                    )
                    done = sum(
                        r["variant"] == variant and r["repeat"] == repeat for r in result.runs
                    )
                    bar.update(len(plan.rates) - done)
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
    """The points as JSON (medians, each with its repeats), the plot, the BENCHMARKS.md section."""
    points = result.medians(plan.repeats)
    written = []
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(points, option=orjson.OPT_INDENT_2))
    written.append(json_path)
    if plot_path is not None and points:
        from streamrec.tools.plots import plot_latency_vs_throughput

        written.append(plot_latency_vs_throughput(points, plot_path))
    if benchmarks_md is not None:
        base = benchmarks_md.parent.resolve()
        section = section_markdown(
            points,
            command=command,
            started=started,
            json_path=_relative(json_path, base),
            plot_path=_relative(plot_path, base) if plot_path and points else None,
            failures=result.failures,
            stopped_early=result.stopped_early,
            kafka_version=settings.kafka_version,
            quick=plan.quick,
            variants=plan.variants,
            method=plan_description(plan),
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
    for param in ctx.command.params:
        name = param.name or ""
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        flag = max(param.opts, key=len)
        value = ctx.params[name]
        if isinstance(value, bool):
            words.append(flag if value else (param.secondary_opts or [flag])[0])
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
    help=f"A smoke check of the whole harness: {QUICK_MIN_EVENTS:,} events and 2 s per point, "
    "short warm-ups. Says so in its output: not figures to quote.",
)
@click.option(
    "--variants",
    default=",".join(VARIANTS),
    show_default=True,
    help="What to measure, comma separated: floor (Kafka alone), teacher (fp32 flow), "
    "student (the model card's choice), student-2proc (the student on two processes), "
    "student-exactly-once (--guarantee exactly-once, measured read_committed), "
    "student-no-changelog (no changelog topic, RocksDB with its log), "
    "student-scraped (the student with /metrics fetched every 100 ms); "
    "peers doing the same job: quix-streams (Quix Streams 3.28 in run/peers/quix-venv, "
    "made from PyPI on first use), bytewax-stock (stock Bytewax operators).",
)
@click.option(
    "--rates",
    default=",".join(f"{r:g}" for r in FULL_RATES),
    show_default=True,
    help="The ladder of offered rates, events per second.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=DEFAULT_REPEATS,
    show_default=True,
    help="Times each variant's ladder is climbed, the variants taking turns (floor, student, "
    "floor, student, ...); each point reports the median of its repeats.",
)
@click.option(
    "--min-events",
    type=click.IntRange(min=1),
    default=None,
    help=f"Events per point at least: a point lasts as long as they take at its rate "
    f"[default: {MIN_EVENTS:,}; --quick: {QUICK_MIN_EVENTS:,}]. Below {MIN_EVENTS:,} the "
    "output says the figures are not to be quoted.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Seconds of load per point at least [default: {RATE_JUDGED_AFTER_S:g}; --quick: 2].",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to wait after a point for late recommendations [default: 15; --quick: 3].",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds of unreported load through the floor, on topics of its own, before the "
    "first measured point, so that no point meets a cold broker [default: 20; --quick: 5; "
    "0: none]. Each service also gets 5 s (--quick: 2) at the first rate after it starts.",
)
@click.option(
    "--pin",
    "pin_text",
    default=None,
    metavar="broker=CORES,flow=CORES[,harness=CORES]",
    help="Keep the broker and the service under test (floor or flow) on different cores, "
    "e.g. broker=0,flow=1: the broker's threads are moved with sched_setaffinity and the "
    "service starts under taskset. harness= also pins the load generator and the latency "
    "collector. Refused on a machine with fewer than 2 cores. [default: no pinning]",
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
    help="The points as a JSON list, each with its repeats [default: benchmarks/e2e.json; "
    "with --quick: run/bench/e2e-quick.json].",
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
    repeats: int,
    min_events: int | None,
    duration: float | None,
    drain: float | None,
    warmup: float | None,
    pin_text: str | None,
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
    service), warms the broker up with load it does not report, then offers
    each rate of the ladder on an open-loop schedule and records achieved
    rate, p50/p90/p99/p99.9/max latency, the load generator's lag and the CPU
    and memory of the service and of the broker. Every ladder is climbed
    --repeats times, the variants taking turns; each point reports the median
    of its repeats (and their p99 range). A ladder stops at the first rate the
    variant cannot keep up with.

    \b
    Examples:
      streamrec bench e2e                             # the full ladder, 3 repeats
      streamrec bench e2e --quick --variants floor    # a smoke check in a few minutes
      streamrec bench e2e --variants floor,student --rates 500,1000,3000 --pin broker=0,flow=1
    """
    settings = Settings.from_env()
    chosen = _parse_list(variants, "variant")
    unknown = [v for v in chosen if v not in (*VARIANTS, *SETTING_VARIANTS, *PEERS)]
    if unknown:
        raise click.BadParameter(
            f"unknown variant(s) {', '.join(unknown)}; choose from "
            f"{', '.join((*VARIANTS, *SETTING_VARIANTS, *PEERS))}",
            param_hint="--variants",
        )
    try:
        ladder = tuple(float(r) for r in _parse_list(rates, "rate"))
    except ValueError:
        raise click.BadParameter(
            f"rates must be numbers, got {rates!r}", param_hint="--rates"
        ) from None
    if any(not rate > 0 for rate in ladder):
        raise click.BadParameter(f"rates must be positive, got {rates!r}", param_hint="--rates")
    pin: CorePin | None = None
    if pin_text is not None:
        try:
            pin = parse_pin(pin_text)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--pin") from None
    changes: dict[str, Any] = {
        "variants": tuple(chosen),
        "rates": ladder,
        "repeats": repeats,
        "min_events": min_events,
        "duration_s": duration,
        "drain_s": drain,
        "broker_warmup_s": warmup,
        "partitions": partitions or settings.events_partitions,
        "workers": workers,
        "ready_timeout_s": ready_timeout,
        "pin": pin,
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
    points = result.medians(plan.repeats)
    if points:
        click.echo(f"median of {plan.repeats} repeat(s) per point (p99 range in brackets):")
        for point in points:
            click.echo(_run_line(point))
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
