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

The same figures are broken down per model (the recommendations' ``model``
field, ``<variant>@<digest>`` when the flow serves A/B variants), with each
model's online hit rate: the share of a user's events whose ``item_id`` was
among the items recommended to that user on their previous event, credited to
the model that made that recommendation (see ``OnlineHitRate``).

>>> matcher = LatencyMatcher()
>>> matcher.on_event("e1", kafka_ts_ms=1000)
>>> rec = Recommendation("e1", "u1", [], "m", 0, received_ms=1000.25, emitted_ms=1001.0)
>>> matcher.on_recommendation(rec, receipt_ms=1001.5)
>>> matcher.on_recommendation(rec, receipt_ms=1009.0)  # a duplicate after a crash: ignored
>>> s = matcher.stats
>>> (s.matched, s.duplicates, s.total.percentiles().p50, s.processing.percentiles().p50)
(1, 1, 1.5, 0.75)

The hit rate follows each user's events; the first one of a user is not judged:

>>> matcher.on_event("e2", 2000, user_id="u1", item_id="i1")
>>> matcher.on_recommendation(Recommendation("e2", "u1", [ScoredItem("i7", 0.9)], "m", 0,
...                                          2000.0, 2001.0), receipt_ms=2002.0)
>>> matcher.on_event("e3", 3000, user_id="u1", item_id="i7")  # i7 was recommended: a hit
>>> m = s.per_model["m"]
>>> (m.hits, m.judged, m.hit_rate)
(1, 1, 1.0)
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import click
import orjson
from confluent_kafka import Consumer, KafkaError, Message
from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from streamrec.contracts import (
    EVENT_TYPES,
    FORGET_TYPE,
    ContractError,
    Recommendation,
    ScoredItem,
)
from streamrec.kafka_clients import (
    KafkaConfigError,
    KafkaUnavailable,
    consumer_config,
    end_offsets,
    topic_partitions,
)
from streamrec.settings import EXACTLY_ONCE, Settings

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
        # (count, percentiles at that count): the mean walks every bucket, in Python.
        self._computed: tuple[int, Percentiles] | None = None

    def record_ms(self, value_ms: float) -> None:
        # A stage can come out slightly negative: Kafka timestamps are whole milliseconds.
        if value_ms < 0:
            self.clamped += 1
            value_ms = 0.0
        self.histogram.record_value(min(round(value_ms * 1000), HISTOGRAM_MAX_US))

    @property
    def count(self) -> int:
        return int(self.histogram.get_total_count())

    def percentiles(self) -> Percentiles:
        """p50..p99.9 as HDR reports them: the highest value equivalent to the recorded one."""
        h = self.histogram
        count = self.count
        if not count:
            return Percentiles(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        if self._computed is not None and self._computed[0] == count:
            return self._computed[1]
        at = h.get_percentile_to_value_dict([50.0, 90.0, 99.0, 99.9])
        computed = Percentiles(
            p50=at[50.0] / 1000.0,
            p90=at[90.0] / 1000.0,
            p99=at[99.0] / 1000.0,
            p99_9=at[99.9] / 1000.0,
            max=float(h.get_max_value()) / 1000.0,
            mean=float(h.get_mean_value()) / 1000.0,
        )
        self._computed = (count, computed)
        return computed


@dataclass(slots=True)
class LatencyBreakdown:
    """Latency from the input's Kafka timestamp to receipt, and its split into the flow's stages."""

    total: LatencyHistogram = field(default_factory=LatencyHistogram)
    queueing: LatencyHistogram = field(default_factory=LatencyHistogram)
    processing: LatencyHistogram = field(default_factory=LatencyHistogram)
    output: LatencyHistogram = field(default_factory=LatencyHistogram)

    def record(
        self, input_ts_ms: float, received_ms: float, emitted_ms: float, receipt_ms: float
    ) -> None:
        self.total.record_ms(receipt_ms - input_ts_ms)
        self.queueing.record_ms(received_ms - input_ts_ms)
        self.processing.record_ms(emitted_ms - received_ms)
        self.output.record_ms(receipt_ms - emitted_ms)

    def stage(self, name: str) -> LatencyHistogram:
        return {"queueing": self.queueing, "processing": self.processing, "output": self.output}[
            name
        ]

    def copy(self) -> LatencyBreakdown:
        copied = LatencyBreakdown()
        for name in ("total", *STAGES):
            source, target = getattr(self, name), getattr(copied, name)
            target.histogram.add(source.histogram)
            target.clamped = source.clamped
        return copied

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": self.total.percentiles().to_dict(),
            "stages_ms": {name: self.stage(name).percentiles().to_dict() for name in STAGES},
        }


@dataclass(slots=True)
class ModelStats:
    """What one model answered: how many, how fast, and how often the user's next item was in it.

    ``model`` is the recommendations' ``model`` field as written; the variant is
    the part before ``@`` (the flow writes ``<variant>@<digest>``).
    """

    model: str
    matched: int = 0
    # Events judged against this model's recommendation on the user's previous event.
    judged: int = 0
    hits: int = 0
    # The most items one of its recommendations carried: the K of "hit rate at K".
    top_k: int = 0
    # None while it is the only model seen: the overall histograms are its own then.
    latency: LatencyBreakdown | None = None
    # The same two counts per user, for an interval that resamples users (tools/online_quality).
    judged_by_user: Counter[str] = field(default_factory=Counter)
    hits_by_user: Counter[str] = field(default_factory=Counter)

    @property
    def variant(self) -> str:
        return self.model.split("@", 1)[0]

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.judged if self.judged else None

    def judge(self, hit: bool, user_id: str | None = None) -> None:
        self.judged += 1
        self.hits += hit
        if user_id is not None:
            self.judged_by_user[user_id] += 1
            self.hits_by_user[user_id] += hit


@dataclass(slots=True)
class LatencyStats:
    """Everything measured about matched recommendations: histograms, counts, raw samples."""

    latency: LatencyBreakdown = field(default_factory=LatencyBreakdown)
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
    per_model: dict[str, ModelStats] = field(default_factory=dict)

    @property
    def total(self) -> LatencyHistogram:
        return self.latency.total

    @property
    def queueing(self) -> LatencyHistogram:
        return self.latency.queueing

    @property
    def processing(self) -> LatencyHistogram:
        return self.latency.processing

    @property
    def output(self) -> LatencyHistogram:
        return self.latency.output

    def record(
        self, input_ts_ms: float, received_ms: float, emitted_ms: float, receipt_ms: float
    ) -> None:
        latency = receipt_ms - input_ts_ms
        self.latency.record(input_ts_ms, received_ms, emitted_ms, receipt_ms)
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
        return self.latency.stage(name)

    def for_model(self, name: str) -> ModelStats:
        """The stats of model ``name``, created at its first recommendation.

        Recording every latency twice, overall and per model, would cost the
        collector a quarter more CPU; so a model's own histograms only start
        when a second model appears, as a copy of the overall ones, which until
        then held its latencies alone.  Call this before recording the match.
        """
        found = self.per_model.get(name)
        if found is not None:
            return found
        if len(self.per_model) == 1:
            (only,) = self.per_model.values()
            only.latency = self.latency.copy()
        created = ModelStats(name, latency=LatencyBreakdown() if self.per_model else None)
        self.per_model[name] = created
        return created

    def latency_of(self, model: ModelStats) -> LatencyBreakdown:
        return self.latency if model.latency is None else model.latency


@dataclass(slots=True)
class _LatestEvent:
    event_id: str
    # The model and items of its recommendation, once that arrived.
    answer: tuple[ModelStats, list[ScoredItem]] | None = None


class OnlineHitRate:
    """Judges each user's event against the recommendation made on their previous event.

    - follows each user's events in the order of the events topic, which keeps
      a user's events in order (they are keyed by user);
    - judges event k+1 once both its item and the recommendation for event k
      are known, whichever arrives first, and credits the hit or the miss to
      the model that made that recommendation;
    - a user's first event seen, and an event whose predecessor got no
      recommendation, are not judged; a forget request starts the user afresh.

    Memory: one entry per user seen (their latest event and, once it arrived,
    its recommended items, and their counts in ``ModelStats``), and one per
    event whose successor arrived before its recommendation.
    """

    def __init__(self) -> None:
        self._latest: dict[str, _LatestEvent] = {}
        # event_id -> item of the same user's next event, while its recommendation is awaited.
        self._next_item: dict[str, str] = {}

    def on_event(self, user_id: str, event_id: str, item_id: str) -> None:
        latest = self._latest.get(user_id)
        if latest is not None:
            if latest.answer is None:
                self._next_item[latest.event_id] = item_id
            else:
                model, items = latest.answer
                model.judge(_recommends(items, item_id), user_id)
        self._latest[user_id] = _LatestEvent(event_id)

    def on_answer(self, rec: Recommendation, model: ModelStats) -> None:
        """``rec`` matched to its event (once per ``event_id``), made by ``model``."""
        next_item = self._next_item.pop(rec.event_id, None)
        if next_item is not None:
            model.judge(_recommends(rec.items, next_item), rec.user_id)
            return
        latest = self._latest.get(rec.user_id)
        if latest is not None and latest.event_id == rec.event_id:
            latest.answer = (model, rec.items)

    def forget(self, user_id: str) -> None:
        self._latest.pop(user_id, None)

    @property
    def awaiting(self) -> int:
        """Events whose successor is known but whose own recommendation has not arrived."""
        return len(self._next_item)


def _recommends(items: list[ScoredItem], item_id: str) -> bool:
    return item_id in [item.item_id for item in items]


class LatencyMatcher:
    """Pairs recommendations with their input events by ``event_id``, in either arrival order."""

    def __init__(self) -> None:
        self.stats = LatencyStats()
        self._input_ts: dict[str, float] = {}
        self._early: dict[str, tuple[Recommendation, float]] = {}
        self._done: set[str] = set()
        self.hit_rate = OnlineHitRate()

    def on_event(
        self,
        event_id: str,
        kafka_ts_ms: float,
        user_id: str | None = None,
        item_id: str | None = None,
    ) -> None:
        """An input event; with its user and item it also counts towards the online hit rate."""
        self.stats.events_seen += 1
        if event_id in self._done or event_id in self._input_ts:
            return  # the same event produced twice: the first copy started the clock
        if user_id is not None and item_id is not None:
            # Before matching a recommendation that came first: it answers this, the latest event.
            self.hit_rate.on_event(user_id, event_id, item_id)
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

    def on_forget(self, user_id: str) -> None:
        """A request to erase ``user_id``: the flow starts their session afresh, so does this."""
        self.hit_rate.forget(user_id)

    def _match(self, rec: Recommendation, input_ts_ms: float, receipt_ms: float) -> None:
        self._done.add(rec.event_id)
        self.stats.models[rec.model] += 1
        model = self.stats.for_model(rec.model)  # before recording: it may copy the overall figures
        self.stats.record(input_ts_ms, rec.received_ms, rec.emitted_ms, receipt_ms)
        model.matched += 1
        model.top_k = max(model.top_k, len(rec.items))
        if model.latency is not None:
            model.latency.record(input_ts_ms, rec.received_ms, rec.emitted_ms, receipt_ms)
        self.hit_rate.on_answer(rec, model)

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
            "online_hit_rate": {
                "hits": sum(m.hits for m in s.per_model.values()),
                "judged": sum(m.judged for m in s.per_model.values()),
                "rate": _rounded(self.overall_hit_rate),
                "awaiting": self.hit_rate.awaiting,
            },
            "per_model": {
                m.model: {
                    "variant": m.variant,
                    "matched": m.matched,
                    "top_k": m.top_k,
                    "hit_rate": {"hits": m.hits, "judged": m.judged, "rate": _rounded(m.hit_rate)},
                    **s.latency_of(m).to_dict(),
                }
                for m in self._models_by_traffic()
            },
        }

    @property
    def overall_hit_rate(self) -> float | None:
        judged = sum(m.judged for m in self.stats.per_model.values())
        return sum(m.hits for m in self.stats.per_model.values()) / judged if judged else None

    def _models_by_traffic(self) -> list[ModelStats]:
        return sorted(self.stats.per_model.values(), key=lambda m: (-m.matched, m.model))

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
        if s.per_model:
            lines += self._describe_models()
        return "\n".join(lines)

    def _describe_models(self) -> list[str]:
        models = self._models_by_traffic()
        name_w = max(len("model"), *(len(m.model) for m in models))
        variant_w = max(len("variant"), *(len(m.variant) for m in models))
        lines = [
            "per model: latency in ms (proc: the flow's processing); online hit rate: the next "
            "event's item among the k recommended on the previous one",
            f"  {'model':<{name_w}}  {'variant':<{variant_w}}{'matched':>9}{'p50':>9}{'p90':>9}"
            f"{'p99':>9}{'proc p50':>10}{'proc p99':>10}{'k':>4}  hit rate",
        ]
        for m in models:
            latency = self.stats.latency_of(m)
            total, proc = latency.total.percentiles(), latency.processing.percentiles()
            lines.append(
                f"  {m.model:<{name_w}}  {m.variant:<{variant_w}}{m.matched:>9}{total.p50:>9.2f}"
                f"{total.p90:>9.2f}{total.p99:>9.2f}{proc.p50:>10.2f}{proc.p99:>10.2f}"
                f"{m.top_k:>4}  {_hit_rate_text(m.hits, m.judged)}"
            )
        hits = sum(m.hits for m in models)
        judged = sum(m.judged for m in models)
        lines.append(
            f"online hit rate, all models: {_hit_rate_text(hits, judged)}; "
            f"{self.hit_rate.awaiting} event(s) still awaiting the previous recommendation"
        )
        return lines


def _rounded(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 4)


def _hit_rate_text(hits: int, judged: int) -> str:
    if not judged:
        return "- (no event judged)"
    return f"{100.0 * hits / judged:.1f}% ({hits} of {judged})"


class EventFields(NamedTuple):
    """What this tool reads of an events-topic record."""

    event_id: str
    # Both None unless the record is an interaction with string ids (user_id alone for a forget).
    user_id: str | None = None
    item_id: str | None = None
    forget: bool = False


def read_event(raw: bytes) -> EventFields | None:
    """The ids of one events-topic record; None when it has no ``event_id``.

    Cheaper than the flow's validation (no timestamp, key or size checks): it
    runs for every event, in the process that measures.

    >>> read_event(b'{"event_id":"e1","user_id":"u1","item_id":"i9","type":"view","ts":1}')
    EventFields(event_id='e1', user_id='u1', item_id='i9', forget=False)
    >>> read_event(b'{"event_id":"e2","user_id":"u1","type":"forget","ts":1}')
    EventFields(event_id='e2', user_id='u1', item_id=None, forget=True)
    >>> read_event(b'{"user_id":"u1"}') is None
    True
    """
    try:
        doc = orjson.loads(raw)
        event_id = str(doc["event_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    user_id, kind = doc.get("user_id"), doc.get("type")
    if not isinstance(user_id, str):
        return EventFields(event_id)
    if kind == FORGET_TYPE:
        return EventFields(event_id, user_id, forget=True)
    item_id = doc.get("item_id")
    if not isinstance(item_id, str) or kind not in EVENT_TYPES:
        return EventFields(event_id)
    return EventFields(event_id, user_id, item_id)


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
        config = consumer_config(settings, group=group)
        if settings.guarantee == EXACTLY_ONCE:
            # What a downstream consumer of exactly-once output sees: committed answers only.
            config["isolation.level"] = "read_committed"
        self.consumer = Consumer(config)
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
        fields = read_event(value)
        if fields is None:
            self.matcher.stats.unreadable += 1  # the flow sends these to the dead-letter topic
            return
        self.matcher.on_event(
            fields.event_id, float(message.timestamp()[1]), fields.user_id, fields.item_id
        )
        if fields.forget and fields.user_id is not None:
            self.matcher.on_forget(fields.user_id)

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

    The same is broken down per model (the recommendations' model field,
    <variant>@<digest>), with each model's online hit rate: the share of a
    user's events whose item was among the items recommended on that user's
    previous event, credited to the model that recommended them.  It is the
    live counterpart of quality in the model card's f = α·T + (1−α)·(1−quality)
    (offline, quality is validation NDCG@10 relative to the teacher).

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
        from streamrec.tools.plots import plot_latency_cdf, plot_latency_over_time

        for written in (
            plot_latency_cdf(matcher.stats, Path(f"{plot_prefix}-cdf.png")),
            plot_latency_over_time(matcher.stats, Path(f"{plot_prefix}-over-time.png")),
        ):
            click.echo(f"plot: {written}")
