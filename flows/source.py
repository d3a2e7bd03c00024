"""The events topic into the dataflow, built for the hot path.

Bytewax's own ``KafkaSource`` blocks 1 ms on every idle partition and wraps
each record in a ``KafkaSourceMessage``; this source polls without blocking
(Bytewax itself backs off 1 ms after an empty batch) and hands the records of
librdkafka through untouched.  Offsets are Bytewax resume state, as in
``KafkaSource``: no consumer group, so recovery decides where reading resumes.
"""

from __future__ import annotations

from typing import cast

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)

from flows.shutdown import STOP_READING
from streamrec.kafka_clients import consumer_config, topic_partitions
from streamrec.settings import Settings


class _PartitionReader(StatefulSourcePartition[Message, int]):
    """Reads one Kafka partition from a resume offset; the snapshot is the next offset to read."""

    def __init__(self, config: dict[str, str], topic: str, partition: int, offset: int, batch: int):
        self._consumer = Consumer(config)
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        self._offset = offset
        self._batch = batch

    def next_batch(self) -> list[Message]:
        if STOP_READING.is_set():
            raise StopIteration
        records = self._consumer.consume(self._batch, 0)
        if not records:
            return records
        good = [r for r in records if r.error() is None]
        if len(good) != len(records):
            for record in records:
                error = record.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    # librdkafka retries by itself; these are reported, not fatal.
                    print(f"flow: consumer error on {record.topic()}: {error}", flush=True)
        if good:
            self._offset = cast(int, good[-1].offset()) + 1
        return good

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class EventSource(FixedPartitionedSource[Message, int]):
    """The events topic, one Bytewax input partition per Kafka partition."""

    def __init__(self, settings: Settings, batch: int) -> None:
        self._settings = settings
        self._batch = batch

    def list_parts(self) -> list[str]:
        # The topic is part of the name, so resume offsets never carry over to another topic.
        topic = self._settings.events_topic
        return [f"{p}-{topic}" for p in topic_partitions(self._settings, topic)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _PartitionReader:
        partition, topic = for_part.split("-", 1)
        config = consumer_config(self._settings, group="streamrec-flow")
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        return _PartitionReader(config, topic, int(partition), offset, self._batch)
