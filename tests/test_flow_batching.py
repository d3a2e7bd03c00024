"""Batching is a speed device: an event's answer never depends on the events batched with it.

Each answer is computed after its own event's update of the online counts and
before any later event's, so the same stream answered one record at a time or
from a backlog in micro-batches gives identical answers (fp32: the teacher): the
same items in the same order, with scores equal to float32 rounding (onnxruntime
sums in another order when a batch pads its sessions to another length).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.contracts import Event
from streamrec.flows.models import load_model_set, parse_variants
from streamrec.settings import Settings
from tests.processor_driver import Answer, Record, answers_in, as_messages, new_processor

TOPIC = "events"


def stream_of(events: list[Event]) -> list[Record]:
    """The events on one partition, as the consumer would hand them over."""
    return [
        Record(TOPIC, 0, offset, event.key, event.to_json()) for offset, event in enumerate(events)
    ]


def ranked(answers: list[Answer]) -> list[tuple[str, list[str]]]:
    return [(a.event_id, [item for item, _ in a.items]) for a in answers]


def scores(answers: list[Answer]) -> list[float]:
    return [score for a in answers for _, score in a.items]


def answered_in_batches_of(
    size: int, records: list[Record], settings: Settings, state_dir: Path
) -> list[Answer]:
    settings = settings.replace(state_dir=state_dir)
    models = load_model_set(settings.model_dir, parse_variants("teacher"), settings)
    processor, stores = new_processor(settings, 1, models)
    answers: list[Answer] = []
    try:
        for lo in range(0, len(records), size):
            outputs = processor.process(as_messages(records[lo : lo + size]))
            answers += answers_in(outputs, settings.recommendations_topic)
    finally:
        stores.close()
    return answers


@pytest.fixture(scope="module")
def recent_ratings(movielens: list[Event]) -> list[Record]:
    # The last ratings by time: many users interleaved, popular items among them.
    return stream_of(movielens[-400:])


def test_a_stream_gets_the_same_answers_in_batches_of_1_4_and_32(
    recent_ratings: list[Record], tmp_path: Path
) -> None:
    settings = Settings(events_topic=TOPIC, changelog=False)
    one, four, many = (
        answered_in_batches_of(size, recent_ratings, settings, tmp_path / str(size))
        for size in (1, 4, 32)
    )
    assert len(one) == len(recent_ratings)
    assert ranked(four) == ranked(one)
    assert ranked(many) == ranked(one)
    assert scores(four) == pytest.approx(scores(one), rel=1e-5)
    assert scores(many) == pytest.approx(scores(one), rel=1e-5)


def test_answers_follow_the_online_counts_as_of_each_event(
    recent_ratings: list[Record], tmp_path: Path
) -> None:
    # Learning online changes answers (the counts move); it never lets one see the future.
    learning = Settings(events_topic=TOPIC, changelog=False)
    frozen = learning.replace(online_candidates=False)
    learned = answered_in_batches_of(32, recent_ratings, learning, tmp_path / "on")
    fixed = answered_in_batches_of(32, recent_ratings, frozen, tmp_path / "off")
    assert ranked(learned) != ranked(fixed)
