"""`streamrec latency`: how long from an event to its recommendation, and where the time goes.

Latency is measured from the input record's Kafka timestamp (its producer
create time, or the scheduled send time that ``replay`` stamps) to the moment
this consumer receives the matching recommendation.  The tool reads both
topics from "now" on and pairs each recommendation with its event by
``event_id``, so it works with any producer.  The flow's own wall-clock
stamps split each latency into three stages:

- queueing:   flow received it - input Kafka timestamp (broker, fetch, wait in the flow's input)
- processing: flow emitted it - flow received it        (parse, state, score)
- output:     receipt - flow emitted it                  (produce, broker, fetch)

Output is at-least-once, so each ``event_id`` counts once.  Kafka timestamps
have a resolution of 1 ms: single figures carry up to 1 ms of rounding.

>>> matcher = LatencyMatcher()
>>> matcher.on_event("e1", kafka_ts_ms=1000)
>>> rec = Recommendation("e1", "u1", [], "m", 0, received_ms=1000.25, emitted_ms=1001.0)
>>> matcher.on_recommendation(rec, receipt_ms=1001.5)
>>> matcher.on_recommendation(rec, receipt_ms=1009.0)  # a duplicate after a crash: ignored
>>> s = matcher.stats
>>> (s.matched, s.duplicates, s.total.percentiles().p50, s.processing.percentiles().p50)
(1, 1, 1.5, 0.75)
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click
import orjson
from confluent_kafka import Consumer, KafkaError, Message
from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from streamrec.contracts import ContractError, Recommendation
from streamrec.kafka_clients import (
    KafkaConfigError,
    KafkaUnavailable,
    consumer_config,
    end_offsets,
    topic_partitions,
)
from streamrec.settings import Settings

# Latencies are recorded in microseconds, from 1 µs to one hour, to 3 significant digits.
HISTOGRAM_MAX_US = 3_600_000_000
HISTOGRAM_DIGITS = 3
# Records handed over by one drain of the client's queue.
DRAIN_BATCH = 1000
STAGES = ("queueing", "processing", "output")
# Receipts spread over less than this are a burst, not a rate.
MIN_RECEIPT_SPAN_S = 0.1


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Milliseconds at the percentiles a latency report shows."""

    p50: float
    p90: float
    p99: float
    p99_9: float
    max: float
    mean: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


class LatencyHistogram:
    """An HDR histogram of milliseconds, stored in microseconds; negative values count as 0."""

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, HISTOGRAM_MAX_US, HISTOGRAM_DIGITS)
        self.clamped = 0

    def record_ms(self, value_ms: float) -> None:
        # A stage can come out slightly negative: Kafka timestamps are whole milliseconds.
        if value_ms < 0:
            self.clamped += 1
            value_ms = 0.0
        self.histogram.record_value(min(round(value_ms * 1000), HISTOGRAM_MAX_US))

    @property
    def count(self) -> int:
        return int(self.histogram.get_total_count())

    def value_at_ms(self, percentile: float) -> float:
        return float(self.histogram.get_value_at_percentile(percentile)) / 1000.0

    def percentiles(self) -> Percentiles:
        """p50..p99.9 as HDR reports them: the highest value equivalent to the recorded one."""
        h = self.histogram
        if not self.count:
            return Percentiles(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        at = h.get_percentile_to_value_dict([50.0, 90.0, 99.0, 99.9])
        return Percentiles(
            p50=at[50.0] / 1000.0,
            p90=at[90.0] / 1000.0,
            p99=at[99.0] / 1000.0,
            p99_9=at[99.9] / 1000.0,
            max=float(h.get_max_value()) / 1000.0,
            mean=float(h.get_mean_value()) / 1000.0,
        )


@dataclass(slots=True)
class LatencyStats:
    """Everything measured about matched recommendations: histograms, counts, raw samples."""

    total: LatencyHistogram = field(default_factory=LatencyHistogram)
    queueing: LatencyHistogram = field(default_factory=LatencyHistogram)
    processing: LatencyHistogram = field(default_factory=LatencyHistogram)
    output: LatencyHistogram = field(default_factory=LatencyHistogram)
    matched: int = 0
    duplicates: int = 0
    events_seen: int = 0
    recommendations_seen: int = 0
    unreadable: int = 0
    first_input_ms: float | None = None
    first_receipt_ms: float | None = None
    last_receipt_ms: float | None = None
    # (receipt time, latency) of every match, for the latency-over-time plot.
    receipt_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    models: Counter[str] = field(default_factory=Counter)

    def record(
        self, input_ts_ms: float, received_ms: float, emitted_ms: float, receipt_ms: float
    ) -> None:
        latency = receipt_ms - input_ts_ms
        self.total.record_ms(latency)
        self.queueing.record_ms(received_ms - input_ts_ms)
        self.processing.record_ms(emitted_ms - received_ms)
        self.output.record_ms(receipt_ms - emitted_ms)
        self.matched += 1
        self.receipt_ms.append(receipt_ms)
        self.latency_ms.append(latency)
        if self.first_input_ms is None or input_ts_ms < self.first_input_ms:
            self.first_input_ms = input_ts_ms
        if self.first_receipt_ms is None or receipt_ms < self.first_receipt_ms:
            self.first_receipt_ms = receipt_ms
        if self.last_receipt_ms is None or receipt_ms > self.last_receipt_ms:
            self.last_receipt_ms = receipt_ms

    @property
    def window_s(self) -> float:
        """From the first matched input's timestamp to the last receipt."""
        if self.first_input_ms is None or self.last_receipt_ms is None:
            return 0.0
        return max(0.0, (self.last_receipt_ms - self.first_input_ms) / 1000.0)

    @property
    def throughput_per_s(self) -> float:
        """Recommendations delivered per second, between the first and the last receipt.

        n receipts span n - 1 intervals.  When they all came at once (a short
        burst) there is no span to divide by, and the window from the first
        input to the last receipt stands in.
        """
        if self.first_receipt_ms is None or self.last_receipt_ms is None:
            return 0.0
        span_s = (self.last_receipt_ms - self.first_receipt_ms) / 1000.0
        if span_s >= MIN_RECEIPT_SPAN_S:
            return (self.matched - 1) / span_s
        return self.matched / self.window_s if self.window_s > 0 else 0.0

    def stage(self, name: str) -> LatencyHistogram:
        return {"queueing": self.queueing, "processing": self.processing, "output": self.output}[
            name
        ]


class LatencyMatcher:
    """Pairs recommendations with their input events by ``event_id``, in either arrival order."""

    def __init__(self) -> None:
        self.stats = LatencyStats()
        self._input_ts: dict[str, float] = {}
        self._early: dict[str, tuple[Recommendation, float]] = {}
        self._done: set[str] = set()

    def on_event(self, event_id: str, kafka_ts_ms: float) -> None:
        self.stats.events_seen += 1
        if event_id in self._done or event_id in self._input_ts:
            return  # the same event produced twice: the first copy started the clock
        early = self._early.pop(event_id, None)
        if early is None:
            self._input_ts[event_id] = kafka_ts_ms
        else:
            self._match(early[0], kafka_ts_ms, early[1])

    def on_recommendation(self, rec: Recommendation, receipt_ms: float) -> None:
        self.stats.recommendations_seen += 1
        if rec.event_id in self._done or rec.event_id in self._early:
            self.stats.duplicates += 1
            return
        input_ts = self._input_ts.pop(rec.event_id, None)
        if input_ts is None:
            # Its event is not read yet (or was sent before we started): wait for it.
            self._early[rec.event_id] = (rec, receipt_ms)
        else:
            self._match(rec, input_ts, receipt_ms)

    def _match(self, rec: Recommendation, input_ts_ms: float, receipt_ms: float) -> None:
        self._done.add(rec.event_id)
        self.stats.models[rec.model] += 1
        self.stats.record(input_ts_ms, rec.received_ms, rec.emitted_ms, receipt_ms)

    def is_matched(self, event_id: str) -> bool:
        return event_id in self._done

    @property
    def missing(self) -> int:
        """Events seen whose recommendation has not arrived (yet)."""
        return len(self._input_ts)

    @property
    def orphans(self) -> int:
        """Recommendations whose event was never seen (sent before the measurement began)."""
        return len(self._early)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "matched": s.matched,
            "events_seen": s.events_seen,
            "recommendations_seen": s.recommendations_seen,
            "duplicates": s.duplicates,
            "missing": self.missing,
            "orphans": self.orphans,
            "unreadable": s.unreadable,
            "window_s": round(s.window_s, 3),
            "throughput_per_s": round(s.throughput_per_s, 1),
            "latency_ms": s.total.percentiles().to_dict(),
            "stages_ms": {name: s.stage(name).percentiles().to_dict() for name in STAGES},
            "models": dict(s.models),
        }

    def describe(self) -> str:
        s = self.stats
        lines = [
            f"matched {s.matched} recommendation(s) to their events over {s.window_s:.1f} s "
            f"({s.throughput_per_s:,.0f}/s); duplicates {s.duplicates}, still missing "
            f"{self.missing}, orphans {self.orphans}, unreadable {s.unreadable}",
            "latency in ms (input Kafka timestamp -> receipt), and the flow's stage split:",
            f"  {'':<11}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'mean':>9}",
        ]
        for name, histogram in (("total", s.total), *((n, s.stage(n)) for n in STAGES)):
            p = histogram.percentiles()
            lines.append(
                f"  {name:<11}{p.p50:>9.2f}{p.p90:>9.2f}{p.p99:>9.2f}{p.p99_9:>9.2f}"
                f"{p.max:>9.2f}{p.mean:>9.2f}"
            )
        if s.models:
            lines.append("models: " + ", ".join(f"{m} ({n})" for m, n in s.models.most_common()))
        return "\n".join(lines)


class LatencyCollector:
    """Reads the events and recommendations topics from "now" on and feeds a ``LatencyMatcher``.

    Both topics are assigned at their current end offsets when the collector
    is created, so create it before the load starts.
    """

    def __init__(self, settings: Settings, group: str = "streamrec-latency") -> None:
        self.settings = settings
        self.matcher = LatencyMatcher()
        self.events_topic = settings.events_topic
        self.recommendations_topic = settings.recommendations_topic
        # The topics first: without a broker, that fails before a consumer exists to log it.
        topics = {
            t: topic_partitions(settings, t)
            for t in (self.events_topic, self.recommendations_topic)
        }
        self.consumer = Consumer(consumer_config(settings, group=group))
        starts = []
        for topic, partitions in topics.items():
            starts += end_offsets(self.consumer, topic, partitions)
        self.consumer.assign(starts)

    def poll(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for records, handle all that are ready; returns how many."""
        first = self.consumer.poll(timeout_s)
        if first is None:
            return 0
        receipt_ms = time.time() * 1000.0
        self._handle(first, receipt_ms)
        # poll() returns at the first record; consume() then takes what else is
        # queued without waiting (with a timeout it would wait for a full batch).
        rest = self.consumer.consume(DRAIN_BATCH, 0)
        receipt_ms = time.time() * 1000.0
        for message in rest:
            self._handle(message, receipt_ms)
        return 1 + len(rest)

    def _handle(self, message: Message, receipt_ms: float) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            raise KafkaUnavailable(f"error while reading {message.topic()!r}: {error}")
        value = message.value() or b""
        if message.topic() == self.recommendations_topic:
            try:
                rec = Recommendation.from_json(value)
            except ContractError:
                self.matcher.stats.unreadable += 1
                return
            self.matcher.on_recommendation(rec, receipt_ms)
            return
        try:
            event_id = orjson.loads(value)["event_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.matcher.stats.unreadable += 1  # the flow sends these to the dead-letter topic
            return
        self.matcher.on_event(str(event_id), float(message.timestamp()[1]))

    def settle(self, seconds: float = 0.5) -> None:
        """Poll a moment so that fetching has begun before the load starts.

        A new consumer connects and looks up partition leaders first; records
        produced meanwhile would reach it late, and that delay is not the
        system's.
        """
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.poll(left)

    def run(self, until: Callable[[LatencyMatcher], bool], poll_s: float = 0.1) -> LatencyMatcher:
        """Collect until ``until(matcher)`` is true (checked between polls)."""
        while not until(self.matcher):
            self.poll(poll_s)
        return self.matcher

    def close(self) -> None:
        self.consumer.close()


@dataclass(slots=True)
class StopRule:
    """When a measurement ends: N matches, a duration, idleness after the first match, or Ctrl-C."""

    count: int | None = None
    duration_s: float | None = None
    idle_timeout_s: float | None = 10.0
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    _last_matched: int = 0
    _last_progress: float = field(default_factory=time.monotonic)

    def __call__(self, matcher: LatencyMatcher) -> bool:
        now = time.monotonic()
        matched = matcher.stats.matched
        if matched != self._last_matched:
            self._last_matched, self._last_progress = matched, now
        if self.interrupted:
            return True
        if self.count is not None and matched >= self.count:
            return True
        if self.duration_s is not None and now - self.started >= self.duration_s:
            return True
        return (
            self.idle_timeout_s is not None
            and matched > 0
            and now - self._last_progress >= self.idle_timeout_s
        )

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True


def measure(
    settings: Settings, rule: StopRule, progress: bool = True, ready: str | None = None
) -> LatencyMatcher:
    """Run a collector until ``rule`` says stop; Ctrl-C ends it early and keeps the figures.

    ``ready`` is printed once the collector listens (not before: the broker may be missing).
    """
    collector = LatencyCollector(settings)
    if ready is not None:
        click.echo(ready)
    previous = signal.signal(signal.SIGINT, rule.interrupt)
    try:
        with tqdm(total=rule.count, unit="rec", disable=not progress, desc="latency") as bar:

            def until(matcher: LatencyMatcher) -> bool:
                bar.update(matcher.stats.matched - bar.n)
                return rule(matcher)

            return collector.run(until)
    finally:
        signal.signal(signal.SIGINT, previous)
        collector.close()


@click.command("latency")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after N recommendations matched to their events.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this many seconds.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Stop once no recommendation has arrived for this many seconds (after the first).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the figures as JSON here; the plots go next to it unless --plot says otherwise.",
)
@click.option(
    "--plot",
    "plot_prefix",
    type=click.Path(path_type=Path),
    default=None,
    help="Write PREFIX-cdf.png (latency distribution) and PREFIX-over-time.png.",
)
@click.option("--brokers", default=None, help="Kafka bootstrap servers [default: settings].")
def latency_command(
    count: int | None,
    duration: float | None,
    idle_timeout: float,
    json_path: Path | None,
    plot_prefix: Path | None,
    brokers: str | None,
) -> None:
    """Measure event-to-recommendation latency of whatever runs now.

    Reads the events and recommendations topics from now on, matches each
    recommendation to its event by event_id, and reports p50/p90/p99/p99.9/max
    from the event record's Kafka timestamp to receipt, the throughput, and the
    flow's own split into queueing, processing and output.

    \b
    Example (two terminals, with `streamrec run` going):
      streamrec latency --count 10000 --json run/latency.json
      streamrec replay --count 10000 --rate 1000
    """
    settings = Settings.from_env(brokers=brokers)
    rule = StopRule(count=count, duration_s=duration, idle_timeout_s=idle_timeout)
    ready = (
        f"listening on {settings.events_topic!r} and {settings.recommendations_topic!r} "
        "from now on; start the load (e.g. `streamrec replay --rate 1000`). Ctrl-C ends."
    )
    try:
        matcher = measure(settings, rule, ready=ready)
    except (KafkaUnavailable, KafkaConfigError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(matcher.describe())
    if matcher.stats.matched == 0:
        raise click.ClickException(
            "no recommendation matched an event: is the flow running (`streamrec run`) and "
            "was load sent after this command started?"
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps(matcher.summary(), option=orjson.OPT_INDENT_2))
        click.echo(f"figures: {json_path}")
        plot_prefix = plot_prefix or json_path.with_suffix("")
    if plot_prefix is not None:
        from tools.plots import plot_latency_cdf, plot_latency_over_time

        for written in (
            plot_latency_cdf(matcher.stats, Path(f"{plot_prefix}-cdf.png")),
            plot_latency_over_time(matcher.stats, Path(f"{plot_prefix}-over-time.png")),
        ):
            click.echo(f"plot: {written}")
