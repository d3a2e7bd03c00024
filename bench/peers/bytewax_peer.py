"""The job in stock Bytewax 0.21: Kafka operators in and out, ``stateful_map`` for the session.

Written as the Bytewax documentation shows it: a module-level ``flow``,
``kafka.operators.input`` and ``output``, a ``branch`` for invalid records, a
``stateful_map`` keyed by user and a ``map`` that scores one event at a
time.  No recovery store is configured (Bytewax's default), and the Kafka
clients keep librdkafka's defaults beyond the bootstrap servers.  Run it with
Bytewax's own runner::

    python -m bytewax.run streamrec.bench.peers.bytewax_peer:flow

It reads ``STREAMREC_BROKERS``, ``STREAMREC_EVENTS_TOPIC``,
``STREAMREC_RECOMMENDATIONS_TOPIC``, ``STREAMREC_DLQ_TOPIC`` and the model
settings at import, as a Bytewax module does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TypeGuard

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSinkMessage, KafkaSourceMessage
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow

from streamrec.bench.peers.session import Session, apply_event, is_replay
from streamrec.contracts import ContractError, DeadLetter, Event, encode_recommendation, parse_event
from streamrec.model.serving import Recommender
from streamrec.settings import Settings

settings = Settings.from_env()
recommender = Recommender.load(
    settings.model_dir,
    candidates=settings.candidates,
    half_life=settings.online_half_life_events,
    user_cap=settings.online_user_cap,
)

Raw = KafkaSourceMessage[bytes | None, bytes | None]
Out = KafkaSinkMessage[bytes | None, bytes | None]


@dataclass(frozen=True, slots=True)
class Received:
    """A valid event with where it came from and when the flow got it."""

    event: Event
    offset: int
    received_ms: float


def validate(msg: Raw) -> Received | DeadLetter:
    try:
        event = parse_event(msg.value, msg.key)
    except ContractError as err:
        return DeadLetter(
            msg.key,
            msg.value,
            err.code,
            str(err),
            msg.topic or "",
            msg.partition if msg.partition is not None else -1,
            msg.offset if msg.offset is not None else -1,
        )
    return Received(event, msg.offset if msg.offset is not None else -1, time.time() * 1000.0)


def update_session(
    session: Session | None, received: Received
) -> tuple[Session | None, tuple[Received, list[str]]]:
    if is_replay(session, received.offset):
        assert session is not None
        return session, (received, session["items"])
    session = apply_event(session, received.event.item_id, received.offset, settings.session_length)
    if settings.online_candidates:
        recommender.learn(session["items"], received.event.user_id)
    return session, (received, session["items"])


def recommend(user_and_session: tuple[str, tuple[Received, list[str]]]) -> Out:
    user_id, (received, items) = user_and_session
    [top] = recommender.recommend([items], settings.top_k)
    event = received.event
    value = encode_recommendation(
        event.event_id,
        user_id,
        top,
        recommender.version,
        event.ts,
        received.received_ms,
        time.time() * 1000.0,
    )
    return KafkaSinkMessage(user_id.encode(), value)


def dead_letter(letter: Received | DeadLetter) -> Out:
    assert isinstance(letter, DeadLetter)  # the branch's other side
    return KafkaSinkMessage(
        letter.key,
        letter.raw,
        topic=settings.dlq_topic,
        headers=[(name, value) for name, value in letter.headers() if isinstance(value, bytes)],
    )


def is_valid(item: Received | DeadLetter) -> TypeGuard[Received]:
    return isinstance(item, Received)


flow = Dataflow("streamrec-peer-bytewax")
brokers = settings.brokers.split(",")
source = kop.input("events", flow, brokers=brokers, topics=[settings.events_topic])
checked = op.map("validate", source.oks, validate)
split = op.branch("is_valid", checked, is_valid)
keyed = op.key_on("by_user", split.trues, lambda received: received.event.user_id)
sessions = op.stateful_map("session", keyed, update_session)
answers = op.map("recommend", sessions, recommend)
dead = op.map("dead_letter", split.falses, dead_letter)
kop.output(
    "out", op.merge("all_out", answers, dead), brokers=brokers, topic=settings.recommendations_topic
)
