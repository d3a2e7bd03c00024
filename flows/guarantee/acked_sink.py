"""At least once: recommendations and dead letters out of the dataflow; none lost, none fatal.

``write_batch`` queues a micro-batch's records and returns: the next batch is
read and scored while Kafka acknowledges them.  Each batch ends with the
``OffsetMark`` of every events partition it read (flows/guarantee/at_least_once.py), released
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
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Final, cast

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamrec.flows import metrics
from streamrec.flows.kafka_log import kafka_logger
from streamrec.flows.output import (
    BLOCKED_AFTER_S,
    POLL_S,
    REFUSED,
    BlockedOutput,
    OffsetMark,
    OutputRecord,
    SinkItem,
    output_limits,
    set_aside,
    size_limits,
)
from streamrec.flows.shutdown import STOP_READING
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.kafka_clients import producer_config
from streamrec.settings import Settings

log = logging.getLogger(__name__)

# Unacknowledged records at which a worker stops reading (about 3 MB of recommendations):
# far above what flows at full speed, reached only while Kafka is away.
MAX_IN_FLIGHT: Final = 10_000


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
        self._blocked = BlockedOutput(settings)
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
        if self._blocked.blocked and (
            not batches or time.monotonic() - batches[0].queued_at < BLOCKED_AFTER_S
        ):
            # Under steady traffic a batch is always in flight: a young one means it moves.
            self._blocked.resumed("output resumed after {blocked_s:.0f} s")

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
        self._blocked.waiting(since, self._describe_blocked)
        if self._blocked.blocked and STOP_READING.is_set() and not self._stop_noted:
            self._stop_noted = True
            self._say(
                "stopping once the undelivered output is delivered; a second SIGTERM "
                "abandons it (it is read and sent again on the next run)"
            )

    def _describe_blocked(self, waited_s: float) -> str:
        undelivered = len(self._producer) + len(self._failed)
        return (
            f"output blocked: {undelivered} records undelivered for {waited_s:.0f} s "
            f"(last error: {self._last_error or 'none reported'}); reading goes on until "
            f"{MAX_IN_FLIGHT} are in flight, then waits until Kafka takes them"
        )

    def _say(self, line: str) -> None:
        self._blocked.say(line)


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
