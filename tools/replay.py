"""`streamrec replay`: events into the events topic, from a dataset or a recording, at a set pace.

Each record is keyed by user (the flow's ordering guarantee rests on it).
Timing is one of ``--rate max`` (as fast as possible), ``--rate R`` (an
open-loop schedule, see ``streamrec.tools.schedule``) or ``--speed F`` (the recorded
inter-arrival times divided by F).  On a schedule each record carries its
*scheduled* send time as its Kafka timestamp, so latency measured from that
timestamp includes any delay in getting it out -- a slow producer or broker
cannot hide latency by sending late.

Event times (``--event-time``) must be plausible: the flow's expiry clock may
not run ahead of the wall clock, and the event contract refuses times from
2100 on (``streamrec.contracts.MAX_TS_MS``).

- ``now`` (the default for datasets): an event's ``ts`` is its send time, the
  same instant as its Kafka timestamp (the scheduled time, or the moment of
  sending with ``--rate max``).  ``--speed F`` keeps the dataset's gaps,
  divided by F; laps run on in real time.
- ``recorded``: the dataset's own times.

A dataset replayed past its end starts over (a "lap"): lap n's event ids end
``~n``, so every event stays unique.  Under ``recorded`` lap n's times are
also moved n dataset spans later, which passes 2100 in MovieLens's lap 4; a
replay that would get there is refused up front.

A recording goes out byte for byte: it may hold malformed records on purpose.
``--event-time now`` restamps only its records that are valid events (the
same event, re-encoded with the new ``ts``) and leaves every other record as
it was.

>>> events = [Event("e1", "u1", "i1", "view", 1_500_000_000_000)]
>>> live = DatasetSource(events, count=2)
>>> [live.record(i, send_ms=1_700_000_000_000 + i).value for i in range(2)]
... # doctest: +NORMALIZE_WHITESPACE
[b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"view","ts":1700000000000}',
 b'{"event_id":"e1~1","user_id":"u1","item_id":"i1","type":"view","ts":1700000000001}']
>>> as_recorded = DatasetSource(events, count=2, event_time=EventTime.RECORDED)
>>> [as_recorded.record(i, send_ms=1_700_000_000_000).value for i in range(2)]
... # doctest: +NORMALIZE_WHITESPACE
[b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"view","ts":1500000000000}',
 b'{"event_id":"e1~1","user_id":"u1","item_id":"i1","type":"view","ts":1500000001000}']
"""

from __future__ import annotations

import bisect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import click
import orjson
from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from streamrec.contracts import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_TS_MS,
    ContractError,
    Event,
    parse_message,
)
from streamrec.datasets import DatasetError, load_events
from streamrec.kafka_clients import KafkaUnavailable, producer_config, topic_partitions
from streamrec.settings import Settings
from streamrec.tools.record import RecordedMessage, RecordingError, read_recording
from streamrec.tools.schedule import ScheduleReport, Timing, run_schedule

# The gap between two laps of a dataset, so the next lap's first event follows its last.
LAP_GAP_MS = 1000
# How long the end of a replay waits for the broker to acknowledge what was sent.
FLUSH_TIMEOUT_S = 30.0
UNBOUNDED = sys.maxsize
STATS_INTERVAL_MS = 100
# How librdkafka's statistics say that the idempotent producer has its id.
PRODUCER_ID_ASSIGNED = '"idemp_state": "Assigned"'
MS_PER_YEAR = 365.25 * 24 * 3600 * 1000


class EventTime(StrEnum):
    """The time a replayed event carries in its ``ts``."""

    NOW = "now"  # its send time: replayed traffic reads as live traffic
    RECORDED = "recorded"  # the dataset's own time, each lap one dataset span later

    @classmethod
    def parse(cls, text: str, where: str) -> EventTime:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"{where} takes 'now' or 'recorded', got {text!r}") from None


class EventTimeLimitError(ValueError):
    """A replay at recorded times whose laps would carry event times the contract refuses."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    key: bytes | None
    value: bytes | None


class ReplaySource(Protocol):
    """Records to send, by position, with the times they were originally recorded at."""

    name: str
    event_time: EventTime

    def __len__(self) -> int: ...

    def record(self, i: int, send_ms: int) -> OutgoingRecord: ...

    def recorded_ms(self, i: int) -> float: ...


class DatasetSource:
    """``count`` events of a time-ordered dataset from position ``start``, lapping past its end.

    Lap n (0 is the first pass) suffixes event ids with ``~n``.  Under
    ``EventTime.NOW`` an event's ``ts`` is the ``send_ms`` given to ``record``
    (the wall clock when none is); under ``RECORDED`` it is the dataset's time
    moved n spans later, and a ``count`` whose last event would pass the
    contract's ``MAX_TS_MS`` raises ``EventTimeLimitError`` (an unbounded one
    ends before it).
    """

    def __init__(
        self,
        events: Sequence[Event],
        start: int = 0,
        count: int | None = None,
        name: str = "dataset",
        event_time: EventTime = EventTime.NOW,
    ) -> None:
        if not events:
            raise DatasetError("the dataset holds no events")
        self.events = events
        self.start = start
        self.count = len(events) - start % len(events) if count is None else count
        self.name = name
        self.event_time = event_time
        self.lap_ms = events[-1].ts - events[0].ts + LAP_GAP_MS
        self._stamps_send_time = event_time is EventTime.NOW
        if event_time is EventTime.RECORDED:
            fitting = self.positions_before(MAX_TS_MS)
            fit = fitting - start
            if fit < self.count and (self.count != UNBOUNDED or fit <= 0):
                raise EventTimeLimitError(self._limit_message(fitting))
            self.count = min(self.count, fit)

    def __len__(self) -> int:
        return self.count

    def event(self, i: int) -> Event:
        """The event at position ``i`` with its lap's id and its recorded (lap-shifted) time."""
        lap, index = divmod(self.start + i, len(self.events))
        event = self.events[index]
        if lap == 0:
            return event
        return Event(
            f"{event.event_id}~{lap}",
            event.user_id,
            event.item_id,
            event.type,
            event.ts + lap * self.lap_ms,
            event.value,
        )

    def record(self, i: int, send_ms: int | None = None) -> OutgoingRecord:
        """The record of position ``i``, as sent at ``send_ms`` (epoch ms; default: now)."""
        lap, index = divmod(self.start + i, len(self.events))
        event = self.events[index]
        if self._stamps_send_time:
            ts = wall_clock_ms() if send_ms is None else send_ms
        elif lap:
            ts = event.ts + lap * self.lap_ms
        else:
            return OutgoingRecord(event.key, event.to_json())
        event_id = f"{event.event_id}~{lap}" if lap else event.event_id
        return OutgoingRecord(event.key, event_json(event, event_id, ts))

    def recorded_ms(self, i: int) -> float:
        lap, index = divmod(self.start + i, len(self.events))
        return float(self.events[index].ts + lap * self.lap_ms)

    def positions_before(self, limit_ms: int) -> int:
        """How many positions from the dataset's first, laps included, are before ``limit_ms``.

        Recorded times never decrease from one position to the next: these are the first ones.
        """
        full_laps = max(0, (limit_ms - 1 - self.events[-1].ts) // self.lap_ms + 1)
        partial = bisect.bisect_left(
            self.events, limit_ms - full_laps * self.lap_ms, key=lambda e: e.ts
        )
        return full_laps * len(self.events) + partial

    def _limit_message(self, fitting: int) -> str:
        full_laps = fitting // len(self.events)
        fit = max(0, fitting - self.start)
        limit = datetime.fromtimestamp(MAX_TS_MS / 1000, UTC).date()
        asked = "an unbounded replay" if self.count == UNBOUNDED else f"{self.count:,} events"
        fewer = f"pass --count {fit} or less" if fit else "start at an earlier --skip"
        which = f" (0 to {full_laps - 1})" if full_laps else ""
        return (
            f"--event-time recorded cannot replay {asked} of {self.name} from position "
            f"{self.start:,}: each lap moves its times {self.lap_ms / MS_PER_YEAR:.1f} years "
            f"later, and during lap {full_laps} they would pass {limit}, the latest time the "
            f"event contract accepts. {full_laps} whole lap(s){which} fit, {fit:,} events from "
            f"this position: {fewer}, or use --event-time now to give each event its send time."
        )


def event_json(event: Event, event_id: str, ts: int) -> bytes:
    """``Event.to_json`` of ``event`` with another id and time, without building an ``Event``.

    The send loop calls this per record; building the dataclass first costs
    more than the encoding (a test holds the two encodings equal).
    """
    doc: dict[str, Any] = {
        "event_id": event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "type": event.type,
        "ts": ts,
    }
    if event.value is not None:
        doc["value"] = event.value
    return orjson.dumps(doc)


class RecordingSource:
    """The messages of a ``streamrec record`` file from position ``start``, bytes unchanged.

    Under ``EventTime.NOW`` the records that are valid events (by the
    contract, at ``max_event_bytes``) are restamped with their send time and
    re-encoded; any other record still goes out byte for byte, so a recording
    of hostile records stays hostile.
    """

    def __init__(
        self,
        messages: Sequence[RecordedMessage],
        start: int = 0,
        count: int | None = None,
        name: str = "recording",
        event_time: EventTime = EventTime.RECORDED,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.messages = messages[start:] if count is None else messages[start : start + count]
        self.name = name
        self.event_time = event_time
        # Validated once here, so the send loop only sets ts and encodes.
        self._documents: list[dict[str, Any] | None] | None = None
        if event_time is EventTime.NOW:
            self._documents = [_valid_event(m, max_event_bytes) for m in self.messages]

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def restamped(self) -> int:
        """How many of the records get their send time as ``ts`` (valid events under NOW)."""
        return 0 if self._documents is None else sum(d is not None for d in self._documents)

    def record(self, i: int, send_ms: int | None = None) -> OutgoingRecord:
        message = self.messages[i]
        if self._documents is not None and (doc := self._documents[i]) is not None:
            doc["ts"] = wall_clock_ms() if send_ms is None else send_ms
            return OutgoingRecord(message.key, orjson.dumps(doc))
        return OutgoingRecord(message.key, message.value)

    def recorded_ms(self, i: int) -> float:
        return float(self.messages[i].timestamp_ms)


def _valid_event(message: RecordedMessage, max_bytes: int) -> dict[str, Any] | None:
    """The JSON object of a record that the flow would accept as an event or forget request."""
    try:
        parse_message(message.value, message.key, max_bytes)
    except ContractError:
        return None
    assert message.value is not None  # parse_message refuses a null value
    doc: dict[str, Any] = orjson.loads(message.value)
    return doc


class KafkaSender:
    """A producer with the shared client settings, counting what the broker acknowledged."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None
        self._has_producer_id = False
        self.producer = Producer(
            {
                **producer_config(settings),
                "on_delivery": self._on_delivery,
                # Statistics only to learn when the producer id is assigned (see warm_up).
                "statistics.interval.ms": str(STATS_INTERVAL_MS),
                "stats_cb": self._on_stats,
            }
        )

    def _on_stats(self, stats_json: str) -> None:
        # A substring test, not a parse: this runs ten times a second during the load.
        if not self._has_producer_id:
            self._has_producer_id = PRODUCER_ID_ASSIGNED in stats_json

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = str(error)

    def send(self, record: OutgoingRecord, timestamp_ms: int = 0) -> None:
        """Queue one record; ``timestamp_ms`` 0 lets the client stamp the time of this call."""
        while True:
            try:
                self.producer.produce(
                    self.topic, value=record.value, key=record.key, timestamp=timestamp_ms
                )
                break
            except BufferError:
                # The client's queue is full: let it drain rather than drop a record.
                self.producer.poll(0.01)
        self.producer.poll(0)

    def warm_up(self, timeout_s: float = 10.0) -> None:
        """Connect, learn the topic's leaders and get a producer id before the first record.

        A new producer connects lazily: its first records would wait for the
        connection, the metadata and the idempotent producer id (over a second
        on a freshly started broker), and that wait would pass for latency.
        """
        self.producer.list_topics(self.topic, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self._has_producer_id and time.monotonic() < deadline:
            self.producer.poll(0.05)

    def finish(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait for the broker's acknowledgements; returns how many are still unconfirmed."""
        unconfirmed = int(self.producer.flush(timeout_s))
        self.producer.poll(0)  # serve the last statistics event rather than leave it queued
        return unconfirmed


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay sent, how it kept to its schedule, and what the broker confirmed."""

    source: str
    topic: str
    timing: str
    event_time: str
    schedule: ScheduleReport
    delivered: int
    failed: int
    unconfirmed: int
    first_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "topic": self.topic,
            "timing": self.timing,
            "event_time": self.event_time,
            **self.schedule.to_dict(),
            "delivered": self.delivered,
            "failed": self.failed,
            "unconfirmed": self.unconfirmed,
            "first_error": self.first_error,
        }

    def describe(self) -> str:
        s = self.schedule
        lines = [
            f"replayed {s.sent} record(s) from {self.source} into {self.topic!r} "
            f"({self.timing}; event times: {self.event_time}) in {s.elapsed_s:.2f} s: "
            f"{s.send_rate:,.0f} records/s",
            f"  confirmed by the broker: {self.delivered}, failed: {self.failed}, "
            f"unconfirmed: {self.unconfirmed}",
        ]
        if self.timing != Timing.as_fast_as_possible().describe():
            lines.append(
                f"  schedule lag: p50 {s.lag_p50_ms:.2f} ms, p99 {s.lag_p99_ms:.2f} ms, "
                f"max {s.lag_max_ms:.2f} ms; {s.late_sends} send(s) over 1 ms late"
            )
        if self.first_error:
            lines.append(f"  first delivery error: {self.first_error}")
        return "\n".join(lines)


def replay(
    settings: Settings,
    source: ReplaySource,
    timing: Timing,
    *,
    topic: str | None = None,
    duration_s: float | None = None,
    progress: bool = False,
    sender: KafkaSender | None = None,
) -> ReplayReport:
    """Send ``source`` into ``topic`` (default: the events topic) with ``timing``.

    Each record's Kafka timestamp is its send time: the scheduled one, or the
    moment of sending without a schedule; the source may give it to the
    event's ``ts`` as well (``EventTime.NOW``).  A ``sender`` for that topic
    may be passed to reuse a warm producer across replays (the benchmark's
    ladder points); its counts are reported per replay.
    """
    topic = topic or settings.events_topic
    if sender is None or sender.topic != topic:
        topic_partitions(settings, topic)  # fails early, with a hint, if broker or topic is missing
        sender = KafkaSender(settings, topic)
        sender.warm_up()
    delivered, failed = sender.delivered, sender.failed
    offset_of = timing.offset_of(source.recorded_ms)
    total = None if len(source) == UNBOUNDED else len(source)
    last_ms = 0
    with tqdm(total=total, unit="ev", disable=not progress, desc="replay") as bar:

        def send(i: int, due_s: float | None) -> None:
            nonlocal last_ms
            # A schedule's due times never decrease; the moment of sending may (the wall
            # clock can step back), and a user's event times must not.
            last_ms = max(last_ms, wall_clock_ms()) if due_s is None else round(due_s * 1000)
            sender.send(source.record(i, last_ms), last_ms)
            bar.update(1)

        schedule = run_schedule(len(source), offset_of, send, stop_after_s=duration_s)
    unconfirmed = sender.finish()
    return ReplayReport(
        source=source.name,
        topic=topic,
        timing=timing.describe(),
        event_time=source.event_time.value,
        schedule=schedule,
        delivered=sender.delivered - delivered,
        failed=sender.failed - failed,
        unconfirmed=unconfirmed,
        first_error=sender.first_error,
    )


def open_source(
    settings: Settings,
    recording: Path | None,
    dataset: Path | None,
    skip: int,
    count: int | None,
    duration_s: float | None,
    event_time: EventTime | None = None,
) -> ReplaySource:
    """The records a replay sends: a recording, else a dataset (lapping when asked for more).

    ``event_time`` None means each source's default: a recording's bytes
    unchanged, a dataset's ``settings.replay_event_time``.
    """
    if recording is not None:
        return RecordingSource(
            read_recording(recording),
            skip,
            count,
            name=str(recording),
            event_time=event_time or EventTime.RECORDED,
            max_event_bytes=settings.max_event_bytes,
        )
    if event_time is None:
        event_time = EventTime.parse(settings.replay_event_time, "STREAMREC_REPLAY_EVENT_TIME")
    path = dataset or settings.data_dir
    events = load_events(path)
    if count is None and duration_s is not None:
        count = UNBOUNDED  # the duration ends it
    return DatasetSource(events, skip, count, name=str(path), event_time=event_time)


def describe_event_times(source: ReplaySource) -> str | None:
    """A line for the user when the source's event times are not simply the obvious ones."""
    if isinstance(source, RecordingSource) and source.event_time is EventTime.NOW:
        return (
            f"event times: {source.restamped} of {len(source)} record(s) are valid events and "
            "get their send time; the others go out byte for byte"
        )
    if isinstance(source, DatasetSource) and source.event_time is EventTime.RECORDED:
        last = datetime.fromtimestamp(source.recorded_ms(len(source) - 1) / 1000, UTC)
        return f"event times: recorded, the last one {last:%Y-%m-%d %H:%M} UTC"
    return None


@click.command("replay")
@click.option(
    "--from",
    "recording",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Replay a file written by `streamrec record` (bytes unchanged, unless --event-time now).",
)
@click.option(
    "--data",
    "dataset",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Dataset to replay: a MovieLens directory or a .jsonl of events "
    "[default: STREAMREC_DATA_DIR, data/ml-latest-small].",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Records to send [default: the whole source once; with --duration, as many as fit]. "
    "A dataset laps past its end with fresh event ids (~1, ~2, ...).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this many seconds of schedule (or of sending, with --rate max).",
)
@click.option(
    "--rate",
    default=None,
    help="Events per second on an open-loop schedule (send times fixed in advance), "
    "or 'max' for as fast as possible [default: max].",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Keep the recorded inter-arrival times, divided by F (2 = twice as fast). "
    "For a dataset these are its event times.",
)
@click.option(
    "--event-time",
    type=click.Choice([t.value for t in EventTime]),
    default=None,
    help="The time each event carries in 'ts'. 'now': its send time, the same instant as its "
    "Kafka timestamp (the scheduled time, or the moment of sending with --rate max): the "
    "replay reads as live traffic, --speed keeps the dataset's gaps and laps run on in real "
    "time. 'recorded': the dataset's own times, each lap one dataset span later, up to "
    "2100, the latest time the event contract accepts (MovieLens: into lap 4): a --count "
    "past it is refused, a --duration stops before it. [default: "
    "STREAMREC_REPLAY_EVENT_TIME, now, for a dataset; a recording goes out byte for byte, "
    "and 'now' restamps only its records that are valid events]",
)
@click.option("--skip", type=click.IntRange(min=0), default=0, help="Start at this position.")
@click.option("--topic", default=None, help="Target topic [default: STREAMREC_EVENTS_TOPIC].")
@click.option("--brokers", default=None, help="Kafka bootstrap servers [default: settings].")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report (counts, send rate, schedule lag) as JSON here.",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def replay_command(
    recording: Path | None,
    dataset: Path | None,
    count: int | None,
    duration: float | None,
    rate: str | None,
    speed: float | None,
    event_time: str | None,
    skip: int,
    topic: str | None,
    brokers: str | None,
    json_path: Path | None,
    progress: bool,
) -> None:
    """Send events into the events topic, keyed by user, from the dataset or a recording.

    \b
    Examples:
      streamrec replay --count 10000 --rate 1000     # 10 s of load at 1,000 ev/s
      streamrec replay --duration 60 --rate 2000     # a minute at 2,000 ev/s
      streamrec replay --rate max                    # the whole dataset, flat out
      streamrec replay --speed 86400 --duration 60   # a day of the dataset a second
      streamrec replay --from run/events.jsonl --speed 4

    With --rate R the send times are fixed in advance: if sending falls behind,
    late records go out at once and the delay is reported as schedule lag.
    Events carry their send time as 'ts' unless --event-time recorded, so the
    flow sees traffic of today however many laps the replay runs.
    Run `streamrec latency` alongside to measure the flow.
    """
    settings = Settings.from_env(brokers=brokers)
    try:
        timing = Timing.parse(rate, speed)
        chosen = None if event_time is None else EventTime(event_time)
        source = open_source(settings, recording, dataset, skip, count, duration, chosen)
        if len(source) == 0:
            raise click.ClickException(
                f"nothing to replay: {source.name} holds no records after --skip {skip}"
            )
        if (note := describe_event_times(source)) is not None:
            click.echo(note, err=True)
        report = replay(
            settings, source, timing, topic=topic, duration_s=duration, progress=progress
        )
    except (ValueError, DatasetError, RecordingError) as err:
        raise click.UsageError(str(err)) from None
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    click.echo(report.describe())
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
    if report.failed or report.unconfirmed:
        raise click.ClickException(
            f"{report.failed + report.unconfirmed} record(s) were not confirmed by the broker; "
            "check that it runs and that the topic exists"
        )
