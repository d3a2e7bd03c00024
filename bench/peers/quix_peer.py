"""The job in Quix Streams 3.x: a StreamingDataFrame with RocksDB state and its changelog.

Written as the Quix Streams documentation shows it: an ``Application``, topic
definitions with their serializers, ``apply`` steps (one of them stateful),
``to_topic``, and ``on_processing_error`` sending invalid records to the
dead-letter topic.  Configuration, stated because it is what is measured:
at-least-once, RocksDB state under ``STREAMREC_STATE_DIR/quix`` with changelog
topics (Quix's defaults), commit every 5 s (the default), librdkafka's
client defaults beyond the bootstrap servers.  Quix Streams pins
confluent-kafka below 2.13, so it runs from a virtual environment of its
own (``streamrec.bench.services.ensure_quix_venv``), where this repository is
installed without its dependencies::

    run/peers/quix-venv/bin/python -m streamrec.bench.peers.quix_peer
"""

from __future__ import annotations

import logging
import time
from typing import Any

from quixstreams import Application, State, message_context
from quixstreams.models import Row

from streamrec.bench.peers.session import Session, apply_event, is_replay
from streamrec.contracts import ContractError, DeadLetter, Event, encode_recommendation, parse_event
from streamrec.model.serving import Recommender
from streamrec.settings import Settings

SESSION = "session"

settings = Settings.from_env()
recommender = Recommender.load(
    settings.model_dir,
    candidates=settings.candidates,
    half_life=settings.online_half_life_events,
    user_cap=settings.online_user_cap,
)


def validate(value: bytes, key: bytes, timestamp: int, headers: Any) -> tuple[Event, float]:
    """The event and when it was received; an invalid one raises (see ``to_dead_letters``)."""
    return parse_event(value, key), time.time() * 1000.0


def update_session(received: tuple[Event, float], state: State) -> tuple[Event, float, list[str]]:
    event, received_ms = received
    offset = message_context().offset
    session: Session | None = state.get(SESSION)
    if not is_replay(session, offset):
        session = apply_event(session, event.item_id, offset, settings.session_length)
        state.set(SESSION, session)
        if settings.online_candidates:
            recommender.learn(session["items"], event.user_id)
    assert session is not None
    return event, received_ms, session["items"]


def recommend(scored: tuple[Event, float, list[str]]) -> bytes:
    event, received_ms, items = scored
    [top] = recommender.recommend([items], settings.top_k)
    return encode_recommendation(
        event.event_id,
        event.user_id,
        top,
        recommender.version,
        event.ts,
        received_ms,
        time.time() * 1000.0,
    )


def to_dead_letters(error: Exception, row: Row | None, logger: logging.Logger) -> bool:
    """An invalid record goes to the dead-letter topic and processing goes on; others stop it."""
    if not isinstance(error, ContractError) or row is None:
        return False
    letter = DeadLetter(
        row.key, row.value, error.code, str(error), row.topic, row.partition, row.offset
    )
    dead_letters.produce(
        topic=settings.dlq_topic, key=letter.key, value=letter.raw, headers=letter.headers()
    )
    return True


app = Application(
    broker_address=settings.brokers,
    consumer_group=f"streamrec-peer-quix.{settings.events_topic}",
    auto_offset_reset="earliest",
    processing_guarantee="at-least-once",
    state_dir=settings.state_dir / "quix",
    use_changelog_topics=True,
    on_processing_error=to_dead_letters,
    loglevel="WARNING",
)
dead_letters = app.get_producer()
events = app.topic(settings.events_topic, value_deserializer="bytes", key_deserializer="bytes")
recommendations = app.topic(
    settings.recommendations_topic, value_serializer="bytes", key_serializer="bytes"
)
sdf = app.dataframe(events)
sdf = sdf.apply(validate, metadata=True)
sdf = sdf.apply(update_session, stateful=True)
sdf = sdf.apply(recommend)
sdf.to_topic(recommendations)

if __name__ == "__main__":
    app.run()
