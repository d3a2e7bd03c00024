"""`streamrec record`: capture a topic to a file of JSON lines, for `streamrec replay --from`.

One line per Kafka record: topic, partition, offset, Kafka timestamp (ms and
type), key and value.  Keys and values are kept byte for byte: as text when
they are UTF-8, else base64 under ``key_b64`` / ``value_b64`` -- so a
recording of malformed events replays the same malformed bytes.

>>> line = RecordedMessage("events", 0, 7, 1700000000000, "create", b"u1", b"\\xff").to_json_line()
>>> line
b'{"topic":"events","partition":0,"offset":7,"timestamp_ms":1700000000000,"timestamp_type":"create","key":"u1","value_b64":"/w=="}'
>>> RecordedMessage.from_json_line(line).value
b'\\xff'
"""

from __future__ import annotations

import base64
import heapq
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from tqdm import tqdm

from streamrec.kafka_clients import (
    KafkaConfigError,
    KafkaUnavailable,
    consumer_config,
    end_offsets,
    topic_partitions,
)
from streamrec.settings import Settings

TIMESTAMP_TYPES = {0: "none", 1: "create", 2: "log_append"}


class RecordingError(ValueError):
    """A recording file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One Kafka record as captured: where it was, when, and its exact bytes."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    timestamp_type: str
    key: bytes | None
    value: bytes | None

    @classmethod
    def from_kafka(cls, message: Message) -> RecordedMessage:
        ts_type, ts = message.timestamp()
        return cls(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            timestamp_ms=ts,
            timestamp_type=TIMESTAMP_TYPES.get(ts_type, "none"),
            key=message.key(),
            value=message.value(),
        )

    def to_json_line(self) -> bytes:
        doc: dict[str, Any] = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "timestamp_type": self.timestamp_type,
        }
        doc.update(_encode_bytes("key", self.key))
        doc.update(_encode_bytes("value", self.value))
        return orjson.dumps(doc)

    @classmethod
    def from_json_line(cls, line: bytes) -> RecordedMessage:
        doc = orjson.loads(line)
        return cls(
            topic=doc["topic"],
            partition=int(doc["partition"]),
            offset=int(doc["offset"]),
            timestamp_ms=int(doc["timestamp_ms"]),
            timestamp_type=doc.get("timestamp_type", "create"),
            key=_decode_bytes(doc, "key"),
            value=_decode_bytes(doc, "value"),
        )


def _encode_bytes(name: str, data: bytes | None) -> dict[str, str | None]:
    if data is None:
        return {name: None}
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_b64": base64.b64encode(data).decode("ascii")}


def _decode_bytes(doc: dict[str, Any], name: str) -> bytes | None:
    if f"{name}_b64" in doc:
        return base64.b64decode(doc[f"{name}_b64"])
    text = doc.get(name)
    return None if text is None else str(text).encode("utf-8")


def read_recording(path: Path) -> list[RecordedMessage]:
    """A recording in replay order: by Kafka timestamp, each partition's own order kept.

    Partitions are merged by timestamp rather than sorted as one list, so a
    user's events (one partition) never change order even if their
    timestamps do not increase.
    """
    by_partition: dict[tuple[str, int], list[RecordedMessage]] = {}
    try:
        with path.open("rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    message = RecordedMessage.from_json_line(line)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise RecordingError(
                        f"{path}:{line_no}: not a recorded message ({err}); "
                        "recordings are written by `streamrec record`"
                    ) from None
                by_partition.setdefault((message.topic, message.partition), []).append(message)
    except FileNotFoundError:
        raise RecordingError(f"recording not found: {path}") from None
    for messages in by_partition.values():
        messages.sort(key=lambda m: m.offset)
    return list(heapq.merge(*by_partition.values(), key=lambda m: m.timestamp_ms))


@dataclass(frozen=True, slots=True)
class CaptureReport:
    topic: str
    path: Path
    captured: int
    elapsed_s: float

    def describe(self) -> str:
        return (
            f"recorded {self.captured} record(s) of {self.topic!r} to {self.path} "
            f"in {self.elapsed_s:.1f} s"
        )


def capture(
    settings: Settings,
    topic: str,
    path: Path,
    *,
    from_beginning: bool = True,
    follow: bool = False,
    count: int | None = None,
    duration_s: float | None = None,
    progress: bool = True,
) -> CaptureReport:
    """Write ``topic``'s records to ``path`` until caught up (or ``count``/``duration_s``/Ctrl-C).

    Without ``follow`` the capture ends once it has read every record that
    was in the topic when it started; capturing from the end always follows.
    """
    partitions = topic_partitions(settings, topic)
    consumer = Consumer(consumer_config(settings, group="streamrec-record"))
    stop = _StopOnSignal()
    captured = 0
    started = time.monotonic()
    try:
        ends = {tp.partition: tp.offset for tp in end_offsets(consumer, topic, partitions)}
        if from_beginning:
            starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
            pending = {p for p in partitions if _holds_records(consumer, topic, p)}
        else:
            starts = [TopicPartition(topic, p, ends[p]) for p in partitions]
            follow, pending = True, set()
        consumer.assign(starts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with (
            path.open("wb") as out,
            tqdm(total=count, unit="rec", disable=not progress, desc=f"record {topic}") as bar,
        ):
            while not stop.requested:
                if count is not None and captured >= count:
                    break
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    break
                if not follow and not pending:
                    break
                message = consumer.poll(0.2)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaUnavailable(f"error while reading {topic!r}: {error}")
                recorded = RecordedMessage.from_kafka(message)
                out.write(recorded.to_json_line() + b"\n")
                captured += 1
                bar.update(1)
                if recorded.offset >= ends.get(recorded.partition, 0) - 1:
                    pending.discard(recorded.partition)
    finally:
        consumer.close()
        stop.restore()
    return CaptureReport(topic, path, captured, time.monotonic() - started)


def _holds_records(consumer: Consumer, topic: str, partition: int) -> bool:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10.0)
    return bool(high > low)


class _StopOnSignal:
    """Turns Ctrl-C (and SIGTERM) into a request to stop cleanly, keeping what was captured."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {
            sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@click.command("record")
@click.option(
    "--topic",
    default=None,
    help="Topic to capture [default: the events topic, STREAMREC_EVENTS_TOPIC].",
)
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write, one JSON line per record (e.g. run/recordings/events.jsonl).",
)
@click.option(
    "--from",
    "start",
    type=click.Choice(["beginning", "end"]),
    default="beginning",
    show_default=True,
    help="Capture what the topic already holds, or only what arrives from now on.",
)
@click.option(
    "--follow/--no-follow",
    default=False,
    show_default=True,
    help="Keep capturing new records after catching up (always on with --from end).",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N records.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this many seconds.",
)
@click.option("--brokers", default=None, help="Kafka bootstrap servers [default: settings].")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def record_command(
    topic: str | None,
    out: Path,
    start: str,
    follow: bool,
    count: int | None,
    duration: float | None,
    brokers: str | None,
    progress: bool,
) -> None:
    """Capture a topic to a file, with each record's Kafka timestamp, for later replay.

    \b
    Examples:
      streamrec record -o run/events.jsonl                  # what `events` holds now
      streamrec record -o live.jsonl --from end --duration 60
      streamrec replay --from run/events.jsonl --speed 2    # twice as fast as recorded

    Ctrl-C stops the capture and keeps what was written.
    """
    settings = Settings.from_env(brokers=brokers)
    try:
        report = capture(
            settings,
            topic or settings.events_topic,
            out,
            from_beginning=start == "beginning",
            follow=follow,
            count=count,
            duration_s=duration,
            progress=progress,
        )
    except (KafkaUnavailable, KafkaConfigError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(report.describe())
