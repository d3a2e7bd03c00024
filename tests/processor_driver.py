"""Drive the flow's processor in process, without Kafka: records in, outputs out.

The processor (``flows/processor.py``) takes librdkafka messages; a
``Record`` offers the same reading methods.  Used by the batching and fault
schedule tests, which need thousands of runs where a broker would take seconds each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import orjson
from confluent_kafka import Message

from streamrec.flows.guarantee import AtLeastOnce, Guarantee
from streamrec.flows.models import ModelSet
from streamrec.flows.output import SinkItem
from streamrec.flows.processor import EventProcessor
from streamrec.flows.stores import PartitionStores
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.settings import Settings


@dataclass(frozen=True, slots=True)
class Record:
    """One record of the events topic as the consumer hands it over."""

    topic_name: str
    partition_index: int
    offset_index: int
    key_bytes: bytes | None
    value_bytes: bytes | None

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_index

    def offset(self) -> int:
        return self.offset_index

    def key(self) -> bytes | None:
        return self.key_bytes

    def value(self) -> bytes | None:
        return self.value_bytes

    def error(self) -> None:
        return None


def as_messages(records: list[Record]) -> list[Message]:
    return cast(list[Message], records)


@dataclass(frozen=True, slots=True)
class Answer:
    """A recommendation the processor emitted."""

    event_id: str
    user_id: str
    items: tuple[tuple[str, float], ...]
    model: str


def answers_in(outputs: list[SinkItem], topic: str) -> list[Answer]:
    """The recommendations among a micro-batch's outputs, in order."""
    found = []
    for item in outputs:
        if not isinstance(item, tuple) or item[0] != topic:
            continue
        value = item[2]
        assert value is not None
        doc = orjson.loads(value)
        found.append(
            Answer(
                doc["event_id"],
                doc["user_id"],
                tuple((i["item_id"], i["score"]) for i in doc["items"]),
                doc["model"],
            )
        )
    return found


def new_processor(
    settings: Settings,
    partitions: int,
    models: ModelSet,
    worker: WorkerContext | None = None,
    guarantee: Guarantee | None = None,
) -> tuple[EventProcessor, PartitionStores]:
    """A processor over the stores of ``partitions`` events partitions in ``settings.state_dir``
    (``guarantee``: at least once without a changelog unless given), on ``worker`` (else a
    worker of its own); close the stores when done."""
    stores = PartitionStores(partitions, guarantee or AtLeastOnce(settings))
    worker = worker or Workers.of(settings).current()
    return EventProcessor(settings, stores, models, worker), stores
