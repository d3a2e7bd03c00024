"""Recommendations and dead letters out of the dataflow; no record is lost and none is fatal.

``write_batch`` queues a micro-batch's records and returns: the next batch is
read and scored while Kafka acknowledges them.  Each batch ends with the
``OffsetMark`` of every events partition it read (flows/delivery.py), released
once the batch and every batch before it are acknowledged; a partition's
reader never snapshots an offset past its released mark, so a snapshotted
epoch never has outputs in flight (at-least-once output).  Each record's
delivery report decides what happens to it:

* a transient failure (broker down, leader moving, delivery timed out) sends
  it again; while failures wait, or ``MAX_IN_FLIGHT`` records are unacknowledged,
  the worker waits, which stops its reading: memory stays bounded however long
  Kafka is away.  A batch unacknowledged for ``BLOCKED_AFTER_S`` is said once in
  the log (``flow: output blocked: ...``) and on ``/metrics``;
* a refusal of that one record (too large, invalid) sets it aside: a
  recommendation becomes a dead letter, and a dead letter the dead-letter
  topic cannot take whole becomes a stub naming the payload's size and
  sha256 and the reason;
* a fatal producer error replaces the producer, which sends again whatever
  was not confirmed.

>>> size_limits({"recommendations": 1_048_588, "events.dlq": 1_048_588})
{'message.max.bytes': '1048588', 'batch.size': '1000000'}
>>> stub(("events.dlq", b"u1", b"x" * 2_000_000, None), "too large")[2:]  # doctest: +ELLIPSIS
(None, [('streamrec.stub.reason', b'too large'), ('streamrec.stub.value_size', b'2000000'), ...])
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Final, cast

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from flows import metrics
from flows.delivery import OffsetMark
from flows.kafka_log import kafka_logger
from flows.shutdown import STOP_READING
from flows.worker import WorkerContext, Workers
from streamrec.contracts import (
    OUTPUT_REFUSED,
    STUB_HEADER_KEY_SHA256,
    STUB_HEADER_KEY_SIZE,
    STUB_HEADER_REASON,
    STUB_HEADER_VALUE_SHA256,
    STUB_HEADER_VALUE_SIZE,
    STUB_MAX_KEY_BYTES,
    DeadLetter,
)
from streamrec.kafka_clients import (
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    KafkaUnavailable,
    max_message_bytes,
    producer_config,
    redact,
)
from streamrec.settings import Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
# (topic, key, value, headers): what the flow hands the sink, with no wrapper per record.
OutputRecord = tuple[str, bytes | None, bytes | None, Headers | None]
# What the processor hands the sink: output records, each micro-batch's offset marks after them.
SinkItem = OutputRecord | OffsetMark


# Every wait is this short, so a second SIGTERM (KeyboardInterrupt) is never held up.
POLL_S: Final = 0.5
# A slower delivery is reported as blocked output; shorter stalls are routine (a leader moving).
BLOCKED_AFTER_S: Final = 5.0
# librdkafka's default batch.size: batches fill up to it, and no topic limit is below it by default.
_DEFAULT_BATCH_BYTES: Final = 1_000_000
# The bounds librdkafka accepts for message.max.bytes.
_MESSAGE_MAX_BYTES_RANGE: Final = (1000, 1_000_000_000)

# Refusals of one record: sending it again cannot help, so it is set aside.  Any
# other failure is sent again: nothing is lost to an outage or a misconfiguration,
# which show as blocked output until fixed.
REFUSED: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.POLICY_VIOLATION,
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)
# Unacknowledged records at which a worker stops reading (about 3 MB of recommendations):
# far above what flows at full speed, reached only while Kafka is away.
MAX_IN_FLIGHT: Final = 10_000


def size_limits(limits: Mapping[str, int]) -> dict[str, str]:
    """librdkafka size settings for output topics that take batches of at most ``limits`` bytes.

    The broker refuses a whole batch over a topic's limit, so batches never
    grow past the smallest limit (a record larger than ``batch.size`` still goes,
    alone); the local check lets through anything the largest limit may take.
    """
    low, high = _MESSAGE_MAX_BYTES_RANGE
    return {
        "message.max.bytes": str(min(max(max(limits.values()), low), high)),
        "batch.size": str(max(1, min(_DEFAULT_BATCH_BYTES, *limits.values()))),
    }


def stub(record: OutputRecord, reason: str) -> OutputRecord:
    """``record`` (a dead letter) without its payload: its size, sha256 and why, in headers."""
    topic, key, value, headers = record
    added: Headers = [(STUB_HEADER_REASON, reason.encode())]
    if value is not None:
        added.append((STUB_HEADER_VALUE_SIZE, str(len(value)).encode()))
        added.append((STUB_HEADER_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()))
    if key is not None and len(key) > STUB_MAX_KEY_BYTES:
        added.append((STUB_HEADER_KEY_SIZE, str(len(key)).encode()))
        added.append((STUB_HEADER_KEY_SHA256, hashlib.sha256(key).hexdigest().encode()))
        key = None
    return (topic, key, None, [*(headers or []), *added])


def is_stub(headers: Headers | None) -> bool:
    return any(name == STUB_HEADER_REASON for name, _ in headers or ())


def set_aside(
    record: OutputRecord,
    error: KafkaError,
    limits: Mapping[str, int],
    dlq_topic: str,
    say: Callable[[str], None],
) -> OutputRecord | None:
    """What replaces a record Kafka refused: a dead letter, a stub, or nothing (said)."""
    topic, key, value, headers = record
    reason = f"{topic} refused the record: {error.str()}"
    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and topic in limits:
        reason += f" (it takes record batches of at most {limits[topic]} bytes)"
    if topic != dlq_topic:
        metrics.OUTPUT_FAILURES.labels(error.name(), "dead_lettered").inc()
        metrics.DEAD_LETTERS.labels(OUTPUT_REFUSED).inc()
        # Never written, so it has no partition or offset of its own.
        letter = DeadLetter(key, value, OUTPUT_REFUSED, reason, topic, -1, -1)
        return (dlq_topic, key, value, letter.headers())
    if not is_stub(headers):
        metrics.OUTPUT_FAILURES.labels(error.name(), "stubbed").inc()
        return stub(record, reason)
    # Even the stub, a few hundred bytes, was refused: the topic's own rules forbid it
    # (e.g. compaction refuses a null key).  Said, counted, and the flow goes on.
    metrics.OUTPUT_FAILURES.labels(error.name(), "dropped").inc()
    say(
        f"ERROR: dropped a dead letter's stub that {topic} refused too "
        f"({error.str()}); its headers: {headers}"
    )
    return None


class _Batch:
    """The records one ``write_batch`` queued, how many are unacknowledged, the marks after them.

    Reused once released, with its delivery callbacks (one per position, made once):
    the hot path allocates nothing per record for its report.
    """

    __slots__ = ("callbacks", "marks", "pending", "queued_at", "records", "replaced")

    def __init__(self) -> None:
        self.records: list[SinkItem] = []
        self.pending = 0
        self.marks: list[OffsetMark] = []
        self.queued_at = 0.0
        self.callbacks: list[Callable[[KafkaError | None, Message], None]] = []
        # Positions whose record was set aside, with what replaced it (rarely any).
        self.replaced: dict[int, OutputRecord] | None = None

    def record(self, index: int) -> OutputRecord:
        replaced = self.replaced
        if replaced is not None and index in replaced:
            return replaced[index]
        return cast(OutputRecord, self.records[index])


class _AsyncWriter(StatelessSinkPartition[SinkItem]):
    """One worker's producer: queues each batch and returns; marks are released as Kafka acks."""

    def __init__(
        self,
        config: dict[str, Any],
        settings: Settings,
        limits: dict[str, int],
        worker: WorkerContext,
    ) -> None:
        self._delivered = worker.delivered
        self._config = config | {"error_cb": self._on_error, "logger": kafka_logger("producer")}
        self._producer = Producer(self._config)
        # Producers replaced after a fatal error, until they have reported every record.
        self._retired: list[Producer] = []
        self._settings = settings
        self._limits = limits
        self._dlq_topic = settings.dlq_topic
        # Oldest first; a batch's marks are released once it and every batch before it is acked.
        self._batches: deque[_Batch] = deque()
        self._spare: list[_Batch] = []
        # Records Kafka failed (batch, position, why): refused ones set aside, the rest sent again.
        self._failed: list[tuple[_Batch, int, KafkaError]] = []
        self._again_at = 0.0
        self._fatal: KafkaError | None = None
        self._last_error = ""
        self._blocked_since: float | None = None
        self._stop_noted = False
        worker.take_reports = self._take_reports  # the source's snapshots release marks now

    def write_batch(self, items: list[SinkItem]) -> None:
        batch = self._spare.pop() if self._spare else _Batch()
        batch.records = items
        batch.queued_at = time.monotonic()
        callbacks = batch.callbacks
        while len(callbacks) < len(items):
            callbacks.append(partial(self._on_delivery, batch, len(callbacks)))
        produce = self._producer.produce
        marks = batch.marks
        for index, item in enumerate(items):
            if isinstance(item, OffsetMark):
                marks.append(item)
                continue
            topic, key, value, headers = item
            batch.pending += 1
            try:
                produce(topic, value, key, headers=headers, on_delivery=callbacks[index])
            except (BufferError, KafkaException) as err:
                self._send_slowly(batch, index, err)
                produce = self._producer.produce
        self._batches.append(batch)
        self._take_reports()
        # Kafka away: reading waits once this much is in flight, or records wait to be sent
        # again, so memory stays bounded however long the outage lasts.
        while self._failed or len(self._producer) > MAX_IN_FLIGHT:
            self._serve(POLL_S)

    def close(self) -> None:
        # Everything queued is delivered before the flow ends: nothing is left in flight.
        while self._batches:
            self._serve(POLL_S)

    def _take_reports(self) -> None:
        self._serve(0)

    def _serve(self, timeout_s: float) -> None:
        """Take delivery reports for up to ``timeout_s``, send failures again, release marks."""
        if self._fatal is not None:
            self._replace_producer()
        self._producer.poll(timeout_s)
        if self._retired:
            self._poll_retired()
        if self._failed:
            self._send_again()
        batches = self._batches
        while batches and batches[0].pending == 0:
            self._release(batches.popleft())
        if batches:
            self._note_waiting(batches[0].queued_at)
        if self._blocked_since is not None and (
            not batches or time.monotonic() - batches[0].queued_at < BLOCKED_AFTER_S
        ):
            self._resumed()  # under steady traffic a batch is always in flight: a young one

    def _release(self, batch: _Batch) -> None:
        for partition, next_offset in batch.marks:
            self._delivered[partition] = next_offset
        batch.marks.clear()
        batch.records = []
        batch.replaced = None
        self._spare.append(batch)

    def _send_slowly(self, batch: _Batch, index: int, err: Exception) -> None:
        """Queue a record that ``produce`` did not take at once (queue full, Kafka away)."""
        topic, key, value, headers = batch.record(index)
        while True:
            if isinstance(err, KafkaException):
                error: KafkaError = err.args[0]
                if error.fatal() or error.code() in REFUSED:
                    if error.fatal():
                        self._fatal = error
                    # Handled as a delivery report: set aside, or sent by a new producer.
                    self._failed.append((batch, index, error))
                    return
                # Not refused, so not lost: the topic may be missing for now, the broker away.
                metrics.OUTPUT_FAILURES.labels(error.name(), "retried").inc()
                self._last_error = error.str()
            else:
                self._last_error = "the producer's queue is full"
            # Reports are served meanwhile, which makes room in the queue.
            self._producer.poll(POLL_S)
            if self._batches:
                self._note_waiting(self._batches[0].queued_at)
            try:
                self._producer.produce(
                    topic, value, key, headers=headers, on_delivery=batch.callbacks[index]
                )
                return
            except (BufferError, KafkaException) as again:
                err = again

    def _on_delivery(
        self, batch: _Batch, index: int, err: KafkaError | None, _msg: Message
    ) -> None:
        if err is None:
            batch.pending -= 1
            return
        if err.fatal():
            self._fatal = err
        self._failed.append((batch, index, err))

    def _send_again(self) -> None:
        """Failed records: refused ones set aside, the rest sent again (not in a busy loop)."""
        now = time.monotonic()
        if now < self._again_at:
            return
        failed, self._failed = self._failed, []
        for batch, index, error in failed:
            record = batch.record(index)
            if error.code() in REFUSED:
                replacement = self._set_aside(record, error)
                if replacement is None:
                    batch.pending -= 1
                    continue
                if batch.replaced is None:
                    batch.replaced = {}
                batch.replaced[index] = record = replacement
            else:
                metrics.OUTPUT_FAILURES.labels(error.name(), "retried").inc()
                self._last_error = error.str()
                # Kafka has already retried it for message.timeout.ms, or refused the whole
                # topic (missing, unauthorized): the next failure waits before its turn.
                self._again_at = now + POLL_S
            topic, key, value, headers = record
            try:
                self._producer.produce(
                    topic, value, key, headers=headers, on_delivery=batch.callbacks[index]
                )
            except (BufferError, KafkaException) as err:
                self._send_slowly(batch, index, err)

    def _set_aside(self, record: OutputRecord, error: KafkaError) -> OutputRecord | None:
        return set_aside(record, error, self._limits, self._dlq_topic, self._say)

    def _replace_producer(self) -> None:
        error, self._fatal = self._fatal, None
        old = self._producer
        # Every record still queued or in flight gets its report, as failed: the new
        # producer sends them again (an in-flight one may arrive twice: at-least-once).
        old.purge()
        self._retired.append(old)
        self._producer = Producer(self._config)
        self._poll_retired()
        name = error.name() if error is not None else "_FATAL"
        metrics.OUTPUT_FAILURES.labels(name, "new_producer").inc()
        self._say(f"output producer failed ({error}); a new one sends what was undelivered")

    def _poll_retired(self) -> None:
        for old in self._retired:
            old.poll(0)
        self._retired = [old for old in self._retired if len(old)]

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = err.str()
        if err.fatal():
            self._fatal = err

    def _note_waiting(self, since: float) -> None:
        waited = time.monotonic() - since
        if self._blocked_since is None and waited >= BLOCKED_AFTER_S:
            self._blocked_since = since
            metrics.OUTPUT_BLOCKED.inc()
            undelivered = len(self._producer) + len(self._failed)
            self._say(
                f"output blocked: {undelivered} records undelivered for {waited:.0f} s "
                f"(last error: {self._last_error or 'none reported'}); reading goes on until "
                f"{MAX_IN_FLIGHT} are in flight, then waits until Kafka takes them"
            )
        if self._blocked_since is not None and STOP_READING.is_set() and not self._stop_noted:
            self._stop_noted = True
            self._say(
                "stopping once the undelivered output is delivered; a second SIGTERM "
                "abandons it (it is read and sent again on the next run)"
            )

    def _resumed(self) -> None:
        assert self._blocked_since is not None
        self._say(f"output resumed after {time.monotonic() - self._blocked_since:.0f} s")
        self._blocked_since = None
        metrics.OUTPUT_BLOCKED.dec()

    def _say(self, line: str) -> None:
        log.warning(redact(line, self._settings))


class OutputSink(DynamicSink[SinkItem]):
    """Recommendations and dead letters, each record naming its topic; one producer per worker."""

    def __init__(self, settings: Settings, workers: Workers) -> None:
        self._settings = settings
        self._workers = workers

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _AsyncWriter:
        limits = output_limits(self._settings)
        # The deployment's own settings (in producer_config) still win over the sizes.
        config: dict[str, Any] = size_limits(limits) | producer_config(self._settings)
        # Built on the worker it writes for, on its thread.
        return _AsyncWriter(config, self._settings, limits, self._workers.current())


def output_limits(settings: Settings) -> dict[str, int]:
    """The output topics' record batch limits; Kafka's default where they cannot be read."""
    topics = [settings.recommendations_topic, settings.dlq_topic]
    try:
        return max_message_bytes(settings, topics)
    except KafkaUnavailable as err:
        # Refusals are still handled record by record; only the sizes are guessed.
        log.warning("%s; assuming %d bytes", err, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
        return dict.fromkeys(topics, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
