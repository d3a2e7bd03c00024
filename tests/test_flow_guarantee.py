"""The processor hands its delivery guarantee each output with the events partition it answers.

Exactly once, each partition's outputs go into that partition's own transaction,
committed with its resume offset: an output filed under another partition
would commit with the wrong progress (lost if its own partition's transaction
commits and the other's does not; answered twice in the reverse case).
"""

from __future__ import annotations

from pathlib import Path

import orjson

from streamrec.flows.guarantee import AtLeastOnce
from streamrec.flows.models import load_model_set, parse_variants
from streamrec.flows.output import OutputRecord, SinkItem
from streamrec.settings import Settings
from tests.processor_driver import Record, as_messages, new_processor

TOPIC = "events"


class FilingClerk(AtLeastOnce):
    """At least once, noting the partition each output was filed under."""

    filed: list[tuple[OutputRecord, int]]

    def after_batch(
        self, outputs: list[SinkItem], partitions: list[int], last_offsets: dict[int, int]
    ) -> list[SinkItem]:
        records = [item for item in outputs if not hasattr(item, "next")]
        assert len(records) == len(partitions)
        self.filed = list(zip(records, partitions, strict=True))
        return super().after_batch(outputs, partitions, last_offsets)


def view(event_id: str, user: str, item: str) -> bytes:
    doc = {"event_id": event_id, "user_id": user, "item_id": item, "type": "view"}
    return orjson.dumps(doc | {"ts": 1_700_000_000_000})


def test_a_dead_letter_before_an_event_of_another_partition_is_filed_under_its_own(
    tmp_path: Path,
) -> None:
    # Found while moving the guarantee behind its seam: the dead letters lead the outputs,
    # but their partitions were listed in reading order, so an event of partition 0 read
    # before an invalid record of partition 1 swapped their transactions.
    settings = Settings(events_topic=TOPIC, changelog=False, state_dir=tmp_path)
    models = load_model_set(settings.model_dir, parse_variants("teacher"), settings)
    clerk = FilingClerk(settings)
    processor, stores = new_processor(settings, 2, models, guarantee=clerk)
    records = [
        Record(TOPIC, 0, 0, b"u0", view("e0", "u0", "1")),
        Record(TOPIC, 1, 0, b"u1", b"not json"),
        Record(TOPIC, 0, 1, b"u0", view("e1", "u0", "2")),
        Record(TOPIC, 1, 1, b"u1", view("e2", "u1", "3")),
    ]
    try:
        processor.process(as_messages(records))
    finally:
        stores.close()
    filed = {
        (topic, orjson.loads(value)["event_id"] if topic != settings.dlq_topic else "dead"): p
        for (topic, _, value, _), p in clerk.filed
        if value is not None
    }
    recs = settings.recommendations_topic
    assert filed == {
        (settings.dlq_topic, "dead"): 1,
        (recs, "e0"): 0,
        (recs, "e1"): 0,
        (recs, "e2"): 1,
    }
