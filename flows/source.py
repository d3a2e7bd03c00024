"""The events topic into the dataflow, built for the hot path.

Bytewax's own ``KafkaSource`` blocks 1 ms on every idle partition and wraps
each record in a ``KafkaSourceMessage``; this source polls without blocking
(Bytewax itself backs off 1 ms after an empty batch) and hands the records of
librdkafka through untouched.  There is no consumer group: where reading
resumes is the delivery guarantee's decision (``flows/guarantee/``), from
Bytewax's resume state at least once and from the changelog's marks exactly once.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final, cast

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)

from streamrec.flows import metrics
from streamrec.flows.guarantee import PartitionProgress
from streamrec.flows.kafka_log import kafka_logger
from streamrec.flows.pacing import Pacer
from streamrec.flows.shutdown import STOP_READING
from streamrec.flows.stores import PartitionStores
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.kafka_clients import consumer_config, topic_partitions, watermark_offsets
from streamrec.settings import Settings

log = logging.getLogger(__name__)

# How long a partition without a leader (a broker restarting) is waited for when a reader
# starts; past that the flow stops with "Kafka unavailable" (69), which a supervisor retries.
BROKER_PATIENCE_S: Final = 60.0


class ResumeOffsetError(RuntimeError):
    """The recovery store's resume offset lies past the end of its partition."""


class WorkerConsumer:
    """One librdkafka consumer for all the events partitions a worker reads.

    A consumer per partition would mean a set of threads and a fetch per
    partition; one per worker fetches them together.  Each partition's reader
    takes its records from here: what a poll brings for the others waits in
    their buffers, which their readers empty on their next turn (Bytewax polls a
    worker's partitions in turn, on the worker's own thread).
    """

    def __init__(self, consumer: Consumer, pacer: Pacer) -> None:
        self._consumer = consumer
        self._buffers: dict[int, deque[Message]] = {}
        self._pacer = pacer
        self._buffered = 0  # records in all buffers
        self._since = 0.0  # when the oldest of them was polled (pacer clock)
        self._releasing = False  # a fuller batch is being handed over: no partition holds it
        self.closed = False

    def add(self, topic: str, partition: int, offset: int) -> int:
        """Start reading ``partition`` at ``offset`` (checked); returns the offset it reads from."""
        if offset != OFFSET_BEGINNING:
            offset = checked_resume_offset(self._consumer, topic, partition, offset)
        self._consumer.incremental_assign([TopicPartition(topic, partition, offset)])
        self._buffers[partition] = deque()
        return offset

    def take(self, partition: int, batch: int) -> list[Message]:
        """Up to ``batch`` records of ``partition``; an error with no partition comes to all.

        A busy worker's records wait in the buffers for a fuller micro-batch
        (flows/pacing.py); the first partition that hands its records over makes
        the others hand theirs over too, so Bytewax gives them to the worker together.
        """
        buffers = self._buffers
        buffer = buffers[partition]
        pacer = self._pacer
        if not pacer.busy and not self._buffered:
            # Not busy, nothing waiting: every record at once, as it comes.
            records = self._consumer.consume(batch * len(buffers), 0)
            if len(buffers) == 1 or not records:
                return records  # nearly always, on a worker reading one partition
            self._buffer(records)
        elif not buffer or not self._releasing:
            if not buffer and any(len(other) >= batch for other in buffers.values()):
                return []  # the others' records first: a backlog stays in Kafka, not here
            room = batch * len(buffers) - self._buffered
            if room > 0:
                self._buffer(self._consumer.consume(room, 0))
            if not self._releasing:
                if pacer.holds(self._buffered, self._since):
                    return []
                self._releasing = True
        if len(buffer) <= batch:
            taken = list(buffer)
            buffer.clear()
        else:
            taken = [buffer.popleft() for _ in range(batch)]
        self._buffered -= len(taken)
        if not self._buffered:
            self._releasing = False
        return taken

    def _buffer(self, records: list[Message]) -> None:
        if not records:
            return
        if not self._buffered:
            self._since = self._pacer.now()
        buffers = self._buffers
        for record in records:
            own = buffers.get(cast(int, record.partition()))
            if own is not None:
                own.append(record)
                self._buffered += 1
            else:
                for other in buffers.values():
                    other.append(record)
                    self._buffered += 1

    def remove(self, partition: int) -> None:
        """Stop reading ``partition``; the consumer closes with the worker's last partition."""
        dropped = self._buffers.pop(partition, None)
        if dropped:
            self._buffered -= len(dropped)
        if not self._buffers and not self.closed:
            self.closed = True
            self._consumer.close()


class _PartitionReader(StatefulSourcePartition[Message, int]):
    """Reads one Kafka partition from a resume offset.

    The snapshot is the resume offset its guarantee gives: the next offset to
    read, or, at least once, the first whose outputs are not yet all acknowledged.
    """

    def __init__(
        self,
        reader: WorkerConsumer,
        topic: str,
        partition: int,
        offset: int,
        batch: int,
        progress: PartitionProgress,
    ):
        self._reader = reader
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._batch = batch
        self._progress = progress
        self._reported: set[int] = set()

    def next_batch(self) -> list[Message]:
        if STOP_READING.is_set():
            if not self._progress.may_stop(self._offset):
                return []
            raise StopIteration
        self._progress.on_poll()
        records = self._reader.take(self._partition, self._batch)
        if not records:
            return records
        good = [r for r in records if r.error() is None]
        if len(good) != len(records):
            for record in records:
                self._report(record.error())
        if good:
            self._offset = cast(int, good[-1].offset()) + 1
            self._reported.clear()
        return good

    def _report(self, error: KafkaError | None) -> None:
        # librdkafka retries by itself; each kind of error is said once until reading resumes.
        if error is None or error.code() == KafkaError._PARTITION_EOF:
            return
        metrics.CONSUMER_ERRORS.labels(error.name()).inc()
        if error.code() not in self._reported:
            self._reported.add(error.code())
            log.warning(
                "reading %s partition %d: %s (retrying; said once until records arrive again)",
                self._topic,
                self._partition,
                error.str(),
            )

    def snapshot(self) -> int:
        return self._progress.snapshot(self._offset)

    def close(self) -> None:
        self._reader.remove(self._partition)


class EventSource(FixedPartitionedSource[Message, int]):
    """The events topic, one Bytewax input partition per Kafka partition."""

    def __init__(
        self, settings: Settings, workers: Workers, batch: int, stores: PartitionStores
    ) -> None:
        self._settings = settings
        self._workers = workers
        self._batch = batch
        self._stores = stores
        self._guarantee = stores.guarantee
        # The consumer each worker's partitions share.
        self._consumers: dict[WorkerContext, WorkerConsumer] = {}

    def list_parts(self) -> list[str]:
        # The topic is part of the name, so resume offsets never carry over to another topic.
        topic = self._settings.events_topic
        return [f"{p}-{topic}" for p in topic_partitions(self._settings, topic)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _PartitionReader:
        name, topic = for_part.split("-", 1)
        partition = int(name)
        # The shard first, rebuilt if needed: its state decides where reading may resume.
        self._stores.get(partition)
        guarantee = self._guarantee
        offset = guarantee.start_offset(partition, resume_state)
        # Built on the worker that reads the partition, on its thread.
        worker = self._workers.current()
        consumer = self._consumer_of(worker)
        offset = consumer.add(topic, partition, offset)
        progress = guarantee.reading(partition, offset, worker)
        return _PartitionReader(consumer, topic, partition, offset, self._batch, progress)

    def _consumer_of(self, worker: WorkerContext) -> WorkerConsumer:
        """The consumer ``worker``'s partitions share, made anew after its last one closed it."""
        consumer = self._consumers.get(worker)
        if consumer is None or consumer.closed:
            config = consumer_config(self._settings, group="streamrec-flow")
            consumer = self._consumers[worker] = WorkerConsumer(
                Consumer({**config, "logger": kafka_logger("consumer")}), worker.pacer
            )
        return consumer


def checked_resume_offset(consumer: Consumer, topic: str, partition: int, offset: int) -> int:
    """``offset``, or the earliest one retained if retention deleted it; past the end: an error.

    Chosen on purpose and said loudly, never left to ``auto.offset.reset``.
    """
    low, high = watermark_offsets(consumer, topic, partition, BROKER_PATIENCE_S)
    if offset > high:
        raise ResumeOffsetError(
            f"the stored resume point of {topic} partition {partition} is offset {offset}, "
            f"past its end ({high}): the topic was truncated or recreated since. Start afresh "
            "with `streamrec state reset` (clears the session state and the recovery store)."
        )
    if offset < low:
        metrics.EVENTS_NEVER_READ.inc(low - offset)
        log.warning(
            "WARNING: %s partition %d resumes at offset %d, but retention has deleted "
            "everything before %d: %d events were never read and are lost; reading on from %d",
            topic,
            partition,
            offset,
            low,
            low - offset,
            low,
        )
        return low
    return offset
