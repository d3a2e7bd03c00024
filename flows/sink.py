"""Recommendations and dead letters out of the dataflow; no record is lost and none is fatal.

``write_batch`` returns once Kafka has every record of the batch, so an epoch
that Bytewax has snapshotted never has outputs in flight (at-least-once
output).  Until then the worker waits, which stops its reading: memory stays
bounded however long Kafka is away.  Each record's delivery report decides
what happens to it:

* a transient failure (broker down, leader moving, delivery timed out) sends
  it again, in the batch's order; a wait longer than ``BLOCKED_AFTER_S`` is said once in
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
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Final

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from flows import metrics
from flows.kafka_log import kafka_logger
from flows.shutdown import STOP_READING
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

Headers = list[tuple[str, str | bytes | None]]
# (topic, key, value, headers): what the flow hands the sink, with no wrapper per record.
OutputRecord = tuple[str, bytes | None, bytes | None, Headers | None]


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
# The outcome of a record queued in a producer that was then replaced, before its report.
_UNCONFIRMED: Final = KafkaError(KafkaError._PURGE_QUEUE, "not confirmed before a new producer")


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
        f"flow: ERROR: dropped a dead letter's stub that {topic} refused too "
        f"({error.str()}); its headers: {headers}"
    )
    return None


class _BatchWriter(StatelessSinkPartition[OutputRecord]):
    """One worker's producer: delivers every batch whole before it returns, whatever fails."""

    def __init__(self, config: dict[str, Any], settings: Settings, limits: dict[str, int]) -> None:
        self._config = config | {"error_cb": self._on_error, "logger": kafka_logger("producer")}
        self._producer = Producer(self._config)
        self._settings = settings
        self._limits = limits
        self._dlq_topic = settings.dlq_topic
        # One delivery callback per position in a round, made once per producer and
        # reused: the hot path allocates nothing per record for its report.
        self._callbacks: list[Callable[[KafkaError | None, Message], None]] = []
        self._generation = 0
        # Per position of the round being delivered: None once Kafka has it, else the error.
        self._outcomes: list[KafkaError | None] = []
        self._delivered = 0
        self._fatal: KafkaError | None = None
        self._last_error = ""
        self._waiting_since = 0.0
        self._blocked_since: float | None = None
        self._stop_noted = False

    def write_batch(self, items: list[OutputRecord]) -> None:
        self._waiting_since = time.monotonic()
        records = items
        while records:
            outcomes = self._send(records)
            self._await_reports()
            if self._delivered == len(records):
                break
            records = self._next_round(records, outcomes)
        if self._blocked_since is not None:
            self._resumed()

    def close(self) -> None:
        # write_batch returned only with everything delivered: nothing is left to wait for.
        self._producer.flush(POLL_S)

    def _send(self, records: list[OutputRecord]) -> list[KafkaError | None]:
        """Queue ``records`` in order; their delivery reports fill the returned outcomes."""
        if self._fatal is not None:
            self._replace_producer()
        outcomes = self._outcomes = [_UNCONFIRMED] * len(records)
        self._delivered = 0
        callbacks = self._callbacks
        while len(callbacks) < len(records):
            callbacks.append(partial(self._on_delivery, self._generation, len(callbacks)))
        produce = self._producer.produce
        for index, (topic, key, value, headers) in enumerate(records):
            try:
                produce(topic, value, key, headers=headers, on_delivery=callbacks[index])
            except (BufferError, KafkaException) as err:
                if not self._send_slowly(index, records[index], err):
                    # The rest stays unconfirmed: a new producer sends it, in order.
                    break
                produce = self._producer.produce
        return outcomes

    def _send_slowly(self, index: int, record: OutputRecord, err: Exception) -> bool:
        """Queue a record that ``produce`` did not take at once; False on a fatal error."""
        topic, key, value, headers = record
        while True:
            if isinstance(err, KafkaException):
                error: KafkaError = err.args[0]
                if error.fatal():
                    self._fatal = error
                    return False
                if error.code() in REFUSED:
                    self._outcomes[index] = error
                    return True
                # Not refused, so not lost: the topic may be missing for now, the broker away.
                metrics.OUTPUT_FAILURES.labels(error.name(), "retried").inc()
                self._last_error = error.str()
            else:
                self._last_error = "the producer's queue is full"
            # Reports are served meanwhile, which makes room in the queue.
            self._producer.poll(POLL_S)
            self._note_waiting(len(self._producer))
            try:
                self._producer.produce(
                    topic, value, key, headers=headers, on_delivery=self._callbacks[index]
                )
                return True
            except (BufferError, KafkaException) as again:
                err = again

    def _await_reports(self) -> None:
        """Wait, in short steps, until every queued record has its delivery report."""
        while True:
            undelivered = self._producer.flush(POLL_S)
            if self._fatal is not None:
                self._replace_producer()
                return
            if undelivered == 0:
                return
            self._note_waiting(undelivered)

    def _next_round(
        self, records: list[OutputRecord], outcomes: list[KafkaError | None]
    ) -> list[OutputRecord]:
        """What to send next: failed records again, in order, then what replaces refused ones."""
        again: list[OutputRecord] = []
        replacements: list[OutputRecord] = []
        for record, error in zip(records, outcomes, strict=True):
            if error is None:
                continue
            if error.code() in REFUSED:
                replacement = self._set_aside(record, error)
                if replacement is not None:
                    replacements.append(replacement)
            else:
                metrics.OUTPUT_FAILURES.labels(error.name(), "retried").inc()
                self._last_error = error.str()
                again.append(record)
        if again:
            # Kafka has already retried these for message.timeout.ms or refused them
            # as a whole topic (missing, unauthorized): no hurry, and no busy loop.
            time.sleep(POLL_S)
            self._note_waiting(len(again))
        return again + replacements

    def _set_aside(self, record: OutputRecord, error: KafkaError) -> OutputRecord | None:
        return set_aside(record, error, self._limits, self._dlq_topic, self._say)

    def _replace_producer(self) -> None:
        error, self._fatal = self._fatal, None
        old = self._producer
        # Every record still queued or in flight gets its report now, as failed: the new
        # producer sends them again (an in-flight one may arrive twice: at-least-once).
        old.purge()
        deadline = time.monotonic() + 10 * POLL_S
        while len(old) and time.monotonic() < deadline:
            old.poll(POLL_S / 5)
        self._producer = Producer(self._config)
        # A report the old producer might still give must not land on a later round.
        self._generation += 1
        self._callbacks = []
        name = error.name() if error is not None else "_FATAL"
        metrics.OUTPUT_FAILURES.labels(name, "new_producer").inc()
        self._say(f"flow: output producer failed ({error}); a new one sends what was undelivered")

    def _on_delivery(
        self, generation: int, index: int, err: KafkaError | None, msg: Message
    ) -> None:
        if generation != self._generation:
            return
        self._outcomes[index] = err
        if err is None:
            self._delivered += 1
        elif err.fatal():
            self._fatal = err

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = err.str()
        if err.fatal():
            self._fatal = err

    def _note_waiting(self, undelivered: int) -> None:
        waited = time.monotonic() - self._waiting_since
        if self._blocked_since is None and waited >= BLOCKED_AFTER_S:
            self._blocked_since = self._waiting_since
            metrics.OUTPUT_BLOCKED.inc()
            self._say(
                f"flow: output blocked: {undelivered} records undelivered for {waited:.0f} s "
                f"(last error: {self._last_error or 'none reported'}); reading is paused "
                "until Kafka takes them"
            )
        if self._blocked_since is not None and STOP_READING.is_set() and not self._stop_noted:
            self._stop_noted = True
            self._say(
                "flow: stopping once the undelivered output is delivered; a second SIGTERM "
                "abandons it (it is read and sent again on the next run)"
            )

    def _resumed(self) -> None:
        assert self._blocked_since is not None
        self._say(f"flow: output resumed after {time.monotonic() - self._blocked_since:.0f} s")
        self._blocked_since = None
        metrics.OUTPUT_BLOCKED.dec()

    def _say(self, line: str) -> None:
        print(redact(line, self._settings), file=sys.stderr, flush=True)


class OutputSink(DynamicSink[OutputRecord]):
    """Recommendations and dead letters, each record naming its topic; one producer per worker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _BatchWriter:
        limits = output_limits(self._settings)
        # The deployment's own settings (in producer_config) still win over the sizes.
        config: dict[str, Any] = size_limits(limits) | producer_config(self._settings)
        return _BatchWriter(config, self._settings, limits)


def output_limits(settings: Settings) -> dict[str, int]:
    """The output topics' record batch limits; Kafka's default where they cannot be read."""
    topics = [settings.recommendations_topic, settings.dlq_topic]
    try:
        return max_message_bytes(settings, topics)
    except KafkaUnavailable as err:
        # Refusals are still handled record by record; only the sizes are guessed.
        print(
            f"flow: {err}; assuming {KAFKA_DEFAULT_MAX_MESSAGE_BYTES} bytes",
            file=sys.stderr,
            flush=True,
        )
        return dict.fromkeys(topics, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
