"""`streamrec bench memory`: the flow's resident memory over a long run of many distinct users.

Starts what it needs (the local broker if none answers, fresh topics, the flow
as a user starts it, ``streamrec run``), then offers a steady open-loop load
for ``--duration`` seconds at ``--rate`` events a second, from a load
generator in a process of its own.  The events are the dataset's (items,
types, values) given to ``--users`` distinct users (``SoakSource``):

- most events come from users drawn uniformly among all of them, so the
  caches keep meeting new users and must evict;
- a fifth come from a few thousand hot users, whose sessions fill their window
  and replay tail, and a twentieth from ten heavy users, whose consumed-items
  records reach their cap (5,000 items, 40 kB);
- ``--hostile-share`` of the users have hostile ids: 256 characters, half of
  them control characters (six bytes each in JSON), and every item they touch
  is a new 256-character id of the same kind.

Every ``--sample`` seconds it reads the resident memory (RSS) of the flow
process and its children.  After ``--warmup`` (the caches and RocksDB's
memtables filling) the memory should be flat: the report gives the RSS at the
end of the warm-up, at the end, its peak and the slope of a straight line
fitted to the samples after the warm-up, in MB per 10 minutes.

Results go to a JSON file (plan, samples, summary), a CSV of the samples, a
PNG of the curve and, for a full run, the "Memory soak" section of
BENCHMARKS.md.

>>> summary = summarize([Sample(t, 500.0 + t / 60.0, 0.0) for t in range(0, 1801, 5)], 600)
>>> summary.warmup_rss_mb, summary.final_rss_mb, summary.slope_mb_per_10min
(510.0, 530.0, 10.0)
"""

from __future__ import annotations

import contextlib
import csv
import math
import multiprocessing
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import click
import numpy as np
import orjson
from confluent_kafka import Consumer
from tqdm import tqdm

from streamrec.bench.e2e import BenchPlan, serving
from streamrec.bench.report import machine_description, write_section
from streamrec.bench.services import STUDENT, BenchError, ensure_broker, usage_of
from streamrec.contracts import Event
from streamrec.datasets import DatasetError, load_events
from streamrec.kafka_clients import (
    KafkaUnavailable,
    consumer_config,
    topic_partitions,
    watermark_offsets,
)
from streamrec.settings import REPO_ROOT, Settings
from streamrec.tools.replay import EventTime, OutgoingRecord, replay
from streamrec.tools.schedule import Timing
from streamrec.topics import TopicError

SECTION_TITLE: Final = "## Memory soak"
DEFAULT_RATE: Final = 2000.0
DEFAULT_DURATION_S: Final = 1800.0
DEFAULT_USERS: Final = 1_000_000
DEFAULT_HOSTILE_SHARE: Final = 0.05
DEFAULT_SAMPLE_S: Final = 5.0
# The warm-up is a third of the run, at most ten minutes.
WARMUP_SHARE: Final = 1 / 3
WARMUP_MAX_S: Final = 600.0
# A fifth of the events from a few thousand hot users (full windows and replay tails), a
# twentieth from ten heavy users (consumed-items records at their cap within minutes).
HOT_USERS: Final = 5_000
HOT_SHARE: Final = 0.2
HEAVY_USERS: Final = 10
HEAVY_SHARE: Final = 0.05
ID_CHARS: Final = 256  # the contract's longest id
DRAIN_S: Final = 15.0
REPLY_MARGIN_S: Final = 120.0
_MASK64: Final = 2**64 - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``, the same in every process."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SoakSource:
    """``count`` events of ``events`` (lapping), each given to one of ``users`` users.

    A replay source (``streamrec.tools.replay.ReplaySource``): every event carries
    its send time.  Which user an event goes to, and which users are hostile, is a
    hash of its position and of the user's number: the same in every run.

    >>> base = [Event("e1", "u1", "42", "rating", 0, 4.0)]
    >>> source = SoakSource(base, users=10_000, hostile_share=0.0, count=3)
    >>> record = source.record(0, send_ms=1_700_000_000_000)
    >>> event = orjson.loads(record.value)
    >>> event["item_id"], event["ts"], record.key == event["user_id"].encode()
    ('42', 1700000000000, True)
    """

    name = "soak"
    event_time = EventTime.NOW

    def __init__(
        self,
        events: list[Event],
        users: int,
        hostile_share: float,
        count: int,
        seed: int = 0,
    ) -> None:
        if not events:
            raise DatasetError("the dataset holds no events")
        if users < HEAVY_USERS + HOT_USERS:
            raise ValueError(f"a soak needs at least {HEAVY_USERS + HOT_USERS:,} users")
        self.events, self.users, self.count, self.seed = events, users, count, seed
        self._hostile_below = round(hostile_share * 2**32)

    def __len__(self) -> int:
        return self.count

    def user_number(self, i: int) -> int:
        """The user of position ``i``: heavy, hot or any, as the shares say."""
        h = _mix(i ^ (self.seed << 40))
        share, pick = (h & 0xFFFF) / 0x10000, h >> 16
        if share < HEAVY_SHARE:
            return pick % HEAVY_USERS
        if share < HEAVY_SHARE + HOT_SHARE:
            return HEAVY_USERS + pick % HOT_USERS
        return pick % self.users

    def padding_of(self, user: int) -> str | None:
        """How user ``user``'s ids are padded to 256 characters: None for an ordinary user."""
        h = _mix(user ^ (self.seed << 48) ^ 0x5EED)
        if (h & 0xFFFFFFFF) >= self._hostile_below:
            return None
        return "\x01" if h >> 63 else "x"

    def user_id(self, user: int) -> str:
        padding = self.padding_of(user)
        return f"u{user}" if padding is None else f"u{user}:".ljust(ID_CHARS, padding)

    def record(self, i: int, send_ms: int | None = None) -> OutgoingRecord:
        event = self.events[i % len(self.events)]
        user = self.user_number(i)
        padding = self.padding_of(user)
        user_id = self.user_id(user)
        # A hostile user's items are new every time: no string is shared with another session.
        item_id = event.item_id if padding is None else f"i{i}:".ljust(ID_CHARS, padding)
        doc: dict[str, Any] = {
            "event_id": f"soak-{self.seed}-{i}",
            "user_id": user_id,
            "item_id": item_id,
            "type": event.type,
            "ts": int(time.time() * 1000) if send_ms is None else send_ms,
        }
        if event.value is not None:
            doc["value"] = event.value
        return OutgoingRecord(user_id.encode(), orjson.dumps(doc))

    def recorded_ms(self, i: int) -> float:
        return float(i)  # never read: a fixed rate ignores recorded times


@dataclass(frozen=True, slots=True)
class Sample:
    """The flow's resident memory and CPU seconds (with its children) ``t_s`` into the load."""

    t_s: float
    rss_mb: float
    cpu_s: float


@dataclass(frozen=True, slots=True)
class MemorySummary:
    """The curve in four figures; the slope of a least-squares line after the warm-up."""

    warmup_s: float
    warmup_rss_mb: float
    final_rss_mb: float
    peak_rss_mb: float
    slope_mb_per_10min: float


def summarize(samples: list[Sample], warmup_s: float) -> MemorySummary:
    """The figures of ``samples`` (time-ordered) with the first ``warmup_s`` as warm-up."""
    if not samples:
        raise ValueError("no memory sample was taken")
    after = [s for s in samples if s.t_s >= warmup_s] or samples[-1:]
    slope = 0.0
    if len(after) >= 2 and after[-1].t_s > after[0].t_s:
        t = np.array([s.t_s for s in after])
        rss = np.array([s.rss_mb for s in after])
        slope = float(np.polyfit(t, rss, 1)[0]) * 600.0
    return MemorySummary(
        warmup_s=warmup_s,
        warmup_rss_mb=round(after[0].rss_mb, 1),
        final_rss_mb=round(samples[-1].rss_mb, 1),
        peak_rss_mb=round(max(s.rss_mb for s in samples), 1),
        slope_mb_per_10min=round(slope, 2),
    )


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """What one soak offers and how it watches."""

    rate: float = DEFAULT_RATE
    duration_s: float = DEFAULT_DURATION_S
    users: int = DEFAULT_USERS
    hostile_share: float = DEFAULT_HOSTILE_SHARE
    sample_s: float = DEFAULT_SAMPLE_S
    warmup_s: float | None = None  # None: a third of the run, at most ten minutes
    partitions: int = 4
    ready_timeout_s: float = 180.0

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(WARMUP_MAX_S, self.duration_s * WARMUP_SHARE)

    @property
    def full(self) -> bool:
        """Whether this is the soak BENCHMARKS.md quotes (30 minutes at least)."""
        return self.duration_s >= DEFAULT_DURATION_S

    def describe(self) -> str:
        return (
            f"{_span(self.duration_s)} at {self.rate:,.0f} ev/s, {self.users:,} distinct "
            f"users ({self.hostile_share:.0%} with hostile ids), {self.partitions} partitions, "
            f"RSS every {self.sample_s:g} s, warm-up {_span(self.warmup)}"
        )


def _span(seconds: float) -> str:
    """``1800`` as ``30 min``, ``40`` as ``40 s``."""
    return f"{seconds / 60:g} min" if seconds % 60 == 0 else f"{seconds:.0f} s"


def _offer(connection: Connection, settings: Settings, dataset: Path, plan: SoakPlan) -> None:
    """The load generator's process: the whole soak's events, on schedule; its report back."""
    try:
        events = load_events(dataset)
        count = math.ceil(plan.rate * plan.duration_s)
        source = SoakSource(events, plan.users, plan.hostile_share, count)
        connection.send(("ready", count))
        report = replay(
            settings,
            source,
            Timing.fixed_rate(plan.rate),
            topic=settings.events_topic,
            duration_s=plan.duration_s,
        )
        connection.send(("done", report.to_dict()))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def _receive(connection: Connection, expected: str, timeout_s: float) -> Any:
    if not connection.poll(timeout_s):
        raise BenchError(f"the load generator did not answer within {timeout_s:.0f} s")
    try:
        kind, payload = connection.recv()
    except EOFError:
        raise BenchError("the load generator exited without a report") from None
    if kind == "error":
        raise BenchError(f"the load generator failed:\n{payload}")
    if kind != expected:
        raise BenchError(f"the load generator answered {kind!r}, expected {expected!r}")
    return payload


def answered(settings: Settings) -> int:
    """Recommendations written so far: the ends of the recommendations topic's partitions."""
    topic = settings.recommendations_topic
    consumer = Consumer(consumer_config(settings, "streamrec-bench-memory"))
    try:
        return sum(
            watermark_offsets(consumer, topic, partition)[1]
            for partition in topic_partitions(settings, topic)
        )
    finally:
        consumer.close()


def run_soak(
    settings: Settings, plan: SoakPlan, *, dataset: Path, log_path: Path, progress: bool
) -> dict[str, Any]:
    """Start the broker if needed and the flow, offer the load, sample; the results."""
    events = load_events(dataset)
    broker = ensure_broker(settings, tqdm.write)
    bench_plan = BenchPlan(
        variants=(STUDENT,), partitions=plan.partitions, ready_timeout_s=plan.ready_timeout_s
    )
    work_dir = settings.state_dir.parent / "bench-work"
    samples: list[Sample] = []
    try:
        with serving(settings, STUDENT, bench_plan, events, log_path, work_dir, "memory") as (
            vsettings,
            service,
            _,
        ):
            context = multiprocessing.get_context("spawn")  # no fork of Kafka client threads
            connection, child_end = context.Pipe()
            generator = context.Process(
                target=_offer,
                args=(child_end, vsettings, dataset, plan),
                name="streamrec-soak-load",
                daemon=True,
            )
            generator.start()
            child_end.close()
            try:
                _receive(connection, "ready", REPLY_MARGIN_S)
                started = time.monotonic()
                with tqdm(
                    total=round(plan.duration_s),
                    unit="s",
                    desc="bench memory",
                    disable=not progress,
                ) as bar:
                    while not connection.poll(0):
                        t = time.monotonic() - started
                        usage = usage_of(service.pids)
                        samples.append(Sample(round(t, 1), round(usage.rss_mb, 1), usage.cpu_s))
                        if service.exited():
                            raise service.failure(f"exited {t:.0f} s into the soak")
                        bar.update(min(round(t), bar.total) - bar.n)
                        bar.set_postfix_str(f"flow RSS {usage.rss_mb:,.0f} MB")
                        if t > plan.duration_s + REPLY_MARGIN_S:
                            raise BenchError("the load generator ran past its duration")
                        connection.poll(plan.sample_s)
                report: dict[str, Any] = _receive(connection, "done", REPLY_MARGIN_S)
            finally:
                generator.join(10.0)
                if generator.is_alive():
                    generator.terminate()
                connection.close()
            time.sleep(DRAIN_S)  # let the flow answer what is still queued
            answers = answered(vsettings)
    finally:
        broker.stop()
    summary = summarize(samples, plan.warmup)
    return {
        "plan": asdict(plan) | {"warmup_s": plan.warmup},
        "settings": {
            name: getattr(settings, name)
            for name in (
                "session_cache_mb",
                "consumed_cache_mb",
                "rocksdb_block_cache_mb",
                "exclusion_cache_mb",
                "online_half_life_events",
                "online_user_cap",
            )
        },
        "machine": machine_description(),
        "sent": report["sent"],
        "send_rate": report["send_rate"],
        "schedule_lag_p99_ms": report["lag_p99_ms"],
        "answered": answers,
        "summary": asdict(summary),
        "samples": [asdict(s) for s in samples],
    }


def write_csv(samples: list[dict[str, float]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["t_s", "rss_mb", "cpu_s"])
        writer.writeheader()
        writer.writerows(samples)
    return path


def section_markdown(result: dict[str, Any], command: str, started: str, plot: str) -> str:
    """The "Memory soak" section of BENCHMARKS.md."""
    s, plan = result["summary"], result["plan"]
    caches = ", ".join(f"`{name}` {value:g}" for name, value in result["settings"].items())
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            f"`{command}` ({started}; {result['machine']}): "
            f"{plan['duration_s'] / 60:g} minutes at {plan['rate']:,.0f} ev/s, "
            f"{plan['users']:,} distinct users, {plan['hostile_share']:.0%} of them with hostile "
            "ids (256 characters, half of them control characters, and a new 256-character item id "
            "of the same kind on each of their events), a fifth of the events from 5,000 hot "
            "users and a twentieth from ten heavy ones; resident memory of the flow process "
            f"every {plan['sample_s']:g} s. Settings: {caches}.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| RSS at the end of the warm-up ({s['warmup_s'] / 60:g} min) | "
            f"{s['warmup_rss_mb']:,.0f} MB |",
            f"| RSS at the end | {s['final_rss_mb']:,.0f} MB |",
            f"| peak RSS | {s['peak_rss_mb']:,.0f} MB |",
            f"| slope after the warm-up | {s['slope_mb_per_10min']:+.1f} MB per 10 min |",
            f"| events sent / answered | {result['sent']:,} / {result['answered']:,} |",
            "",
            f"![resident memory over the soak]({plot})",
        ]
    )


def _command_line() -> str:
    return shlex.join(["streamrec", *sys.argv[1:]]) if sys.argv[1:3] == ["bench", "memory"] else ""


@click.command("memory")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_RATE,
    show_default=True,
    help="Events per second, on an open-loop schedule.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=DEFAULT_DURATION_S,
    show_default=True,
    help="Seconds of load.",
)
@click.option(
    "--users",
    type=click.IntRange(min=HEAVY_USERS + HOT_USERS),
    default=DEFAULT_USERS,
    show_default=True,
    help="Distinct users the events are spread over.",
)
@click.option(
    "--hostile-share",
    type=click.FloatRange(0, 1),
    default=DEFAULT_HOSTILE_SHARE,
    show_default=True,
    help="Share of the users with 256-character ids (half of them control characters), "
    "each of their events with a new 256-character item id.",
)
@click.option(
    "--sample",
    "sample_s",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_SAMPLE_S,
    show_default=True,
    help="Seconds between two readings of the flow's resident memory.",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds of the run counted as warm-up (caches filling) [default: a third of the "
    "duration, at most 600].",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Partitions of the fresh topics [default: STREAMREC_EVENTS_PARTITIONS, 4].",
)
@click.option(
    "--data",
    "dataset",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Dataset whose items, types and values the events take [default: STREAMREC_DATA_DIR].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Plan, samples and summary [default: benchmarks/memory.json for a run of 30 minutes "
    "or more, else run/bench/memory-short.json]; the CSV and the PNG go beside it.",
)
@click.option(
    "--benchmarks-md",
    type=click.Path(dir_okay=False, path_type=Path),
    default=REPO_ROOT / "BENCHMARKS.md",
    show_default=False,
    help="File whose '## Memory soak' section gets the figures [default: BENCHMARKS.md].",
)
@click.option(
    "--update-benchmarks/--no-update-benchmarks",
    default=None,
    help="Write the figures into BENCHMARKS.md [default: yes for a run of 30 minutes or more].",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def bench_memory_command(
    rate: float,
    duration: float,
    users: int,
    hostile_share: float,
    sample_s: float,
    warmup: float | None,
    partitions: int | None,
    dataset: Path | None,
    json_path: Path | None,
    benchmarks_md: Path,
    update_benchmarks: bool | None,
    progress: bool,
) -> None:
    """Resident memory of the flow over a long soak of many distinct users, hostile ids included.

    Starts the local broker if none answers, fresh topics and the flow (`streamrec run`),
    offers --rate events a second for --duration seconds and samples the flow's RSS;
    reports the RSS after the warm-up, at the end, its peak and its slope after the
    warm-up. Memory bounded in bytes shows as a flat line after the warm-up.

    \b
    Examples:
      streamrec bench memory                                 # the soak: 30 min, 1,000,000 users
      streamrec bench memory --duration 120 --users 200000   # a check of the harness
    """
    settings = Settings.from_env()
    plan = SoakPlan(
        rate=rate,
        duration_s=duration,
        users=users,
        hostile_share=hostile_share,
        sample_s=sample_s,
        warmup_s=warmup,
        partitions=partitions or settings.events_partitions,
    )
    default_json = "benchmarks/memory.json" if plan.full else "run/bench/memory-short.json"
    json_path = json_path or REPO_ROOT / default_json
    update = plan.full if update_benchmarks is None else update_benchmarks
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    click.echo(f"memory soak: {plan.describe()}")
    try:
        result = run_soak(
            settings,
            plan,
            dataset=dataset or settings.data_dir,
            log_path=json_path.parent / "logs" / "memory.log",
            progress=progress,
        )
    except (BenchError, KafkaUnavailable, TopicError, DatasetError) as err:
        raise click.ClickException(str(err)) from None
    s = result["summary"]
    click.echo(
        f"flow RSS: {s['warmup_rss_mb']:,.0f} MB after the warm-up ({s['warmup_s']:g} s), "
        f"{s['final_rss_mb']:,.0f} MB at the end, peak {s['peak_rss_mb']:,.0f} MB; slope after "
        f"the warm-up {s['slope_mb_per_10min']:+.1f} MB per 10 min; {result['sent']:,} events "
        f"sent, {result['answered']:,} answered"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    written = [json_path, write_csv(result["samples"], json_path.with_suffix(".csv"))]
    from streamrec.tools.plots import plot_memory_over_time

    plot = plot_memory_over_time(
        result["samples"], json_path.with_suffix(".png"), result["summary"], plan.describe()
    )
    written.append(plot)
    if update:
        plot_ref = str(plot)
        with contextlib.suppress(ValueError):  # relative to BENCHMARKS.md where it can be
            plot_ref = str(plot.resolve().relative_to(benchmarks_md.parent.resolve()))
        command = _command_line() or f"streamrec bench memory  # {plan.describe()}"
        write_section(
            benchmarks_md, section_markdown(result, command, started, plot_ref), SECTION_TITLE
        )
        written.append(benchmarks_md)
    for path in written:
        click.echo(f"wrote {path}")
