"""`streamrec replay`: events into the events topic, from a dataset or a recording, at a set pace.

Each record is keyed by user (the flow's ordering guarantee rests on it).
Timing is one of ``--rate max`` (as fast as possible), ``--rate R`` (an
open-loop schedule, see ``tools.schedule``) or ``--speed F`` (the recorded
inter-arrival times divided by F).  On a schedule each record carries its
*scheduled* send time as its Kafka timestamp, so latency measured from that
timestamp includes any delay in getting it out -- a slow producer or broker
cannot hide latency by sending late.

A dataset replayed past its end starts over (a "lap") with event ids suffixed
``~<lap>`` and event times moved past the previous lap, so every event stays
unique and time keeps moving forward for the flow's sessions.

>>> source = DatasetSource([Event("e1", "u1", "i1", "view", 1_700_000_000_000)], count=2)
>>> [r.value for r in (source.record(0), source.record(1))]  # doctest: +NORMALIZE_WHITESPACE
[b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"view","ts":1700000000000}',
 b'{"event_id":"e1~1","user_id":"u1","item_id":"i1","type":"view","ts":1700000001000}']
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import click
import orjson
from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from streamrec.contracts import Event
from streamrec.datasets import DatasetError, load_events
from streamrec.settings import Settings
from streamrec.kafka_clients import KafkaUnavailable, producer_config, topic_partitions
from tools.record import RecordedMessage, RecordingError, read_recording
from tools.schedule import ScheduleReport, Timing, run_schedule

# The gap between two laps of a dataset, so the next lap's first event follows its last.
LAP_GAP_MS = 1000
# How long the end of a replay waits for the broker to acknowledge what was sent.
FLUSH_TIMEOUT_S = 30.0
UNBOUNDED = sys.maxsize
STATS_INTERVAL_MS = 100
# How librdkafka's statistics say that the idempotent producer has its id.
PRODUCER_ID_ASSIGNED = '"idemp_state": "Assigned"'


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    key: bytes | None
    value: bytes | None


class ReplaySource(Protocol):
    """Records to send, by position, with the times they were originally recorded at."""

    name: str

    def __len__(self) -> int: ...

    def record(self, i: int) -> OutgoingRecord: ...

    def recorded_ms(self, i: int) -> float: ...


class DatasetSource:
    """``count`` events of a time-ordered dataset from position ``start``, lapping past its end."""

    def __init__(
        self,
        events: Sequence[Event],
        start: int = 0,
        count: int | None = None,
        name: str = "dataset",
    ) -> None:
        if not events:
            raise DatasetError("the dataset holds no events")
        self.events = events
        self.start = start
        self.count = len(events) - start % len(events) if count is None else count
        self.name = name
        self.lap_ms = events[-1].ts - events[0].ts + LAP_GAP_MS

    def __len__(self) -> int:
        return self.count

    def event(self, i: int) -> Event:
        lap, index = divmod(self.start + i, len(self.events))
        event = self.events[index]
        if lap == 0:
            return event
        return dataclasses.replace(
            event, event_id=f"{event.event_id}~{lap}", ts=event.ts + lap * self.lap_ms
        )

    def record(self, i: int) -> OutgoingRecord:
        event = self.event(i)
        return OutgoingRecord(event.key, event.to_json())

    def recorded_ms(self, i: int) -> float:
        return float(self.event(i).ts)


class RecordingSource:
    """The messages of a ``streamrec record`` file, bytes unchanged, from position ``start``."""

    def __init__(
        self,
        messages: Sequence[RecordedMessage],
        start: int = 0,
        count: int | None = None,
        name: str = "recording",
    ) -> None:
        self.messages = messages[start:] if count is None else messages[start : start + count]
        self.name = name

    def __len__(self) -> int:
        return len(self.messages)

    def record(self, i: int) -> OutgoingRecord:
        message = self.messages[i]
        return OutgoingRecord(message.key, message.value)

    def recorded_ms(self, i: int) -> float:
        return float(self.messages[i].timestamp_ms)


class KafkaSender:
    """A producer with the shared client settings, counting what the broker acknowledged."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None
        self.queue_full_waits = 0
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
                self.queue_full_waits += 1
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
            f"({self.timing}) in {s.elapsed_s:.2f} s: {s.send_rate:,.0f} records/s",
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

    A ``sender`` for that topic may be passed to reuse a warm producer
    across replays (the benchmark's ladder points); its counts are reported
    per replay.
    """
    topic = topic or settings.events_topic
    if sender is None or sender.topic != topic:
        topic_partitions(settings, topic)  # fails early, with a hint, if broker or topic is missing
        sender = KafkaSender(settings, topic)
        sender.warm_up()
    delivered, failed = sender.delivered, sender.failed
    offset_of = timing.offset_of(source.recorded_ms)
    total = None if len(source) == UNBOUNDED else len(source)
    with tqdm(total=total, unit="ev", disable=not progress, desc="replay") as bar:

        def send(i: int, due_s: float | None) -> None:
            sender.send(source.record(i), 0 if due_s is None else round(due_s * 1000))
            bar.update(1)

        schedule = run_schedule(len(source), offset_of, send, stop_after_s=duration_s)
    unconfirmed = sender.finish()
    return ReplayReport(
        source=source.name,
        topic=topic,
        timing=timing.describe(),
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
) -> ReplaySource:
    """The records a replay sends: a recording, else a dataset (lapping when asked for more)."""
    if recording is not None:
        return RecordingSource(read_recording(recording), skip, count, name=str(recording))
    path = dataset or settings.data_dir
    events = load_events(path)
    if count is None and duration_s is not None:
        count = UNBOUNDED  # the duration ends it
    return DatasetSource(events, skip, count, name=str(path))


@click.command("replay")
@click.option(
    "--from",
    "recording",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Replay a file written by `streamrec record` (bytes unchanged).",
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
    "A dataset laps past its end with fresh event ids.",
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
      streamrec replay --from run/events.jsonl --speed 4

    With --rate R the send times are fixed in advance: if sending falls behind,
    late records go out at once and the delay is reported as schedule lag.
    Run `streamrec latency` alongside to measure the flow.
    """
    settings = Settings.from_env(brokers=brokers)
    try:
        timing = Timing.parse(rate, speed)
        source = open_source(settings, recording, dataset, skip, count, duration)
        if len(source) == 0:
            raise click.ClickException(
                f"nothing to replay: {source.name} holds no records after --skip {skip}"
            )
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
