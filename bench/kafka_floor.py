"""The Kafka floor: the cheapest possible events -> recommendations service, for the benchmark.

It consumes the events topic and, for each event, produces a
recommendation-shaped record (same key, same ``event_id``, no items, the
flow's wall-clock stamps filled in) -- with the same client settings as the
flow (``streamrec.kafka_clients``) and no other work.  ``streamrec latency``
measures it exactly as it measures the flow, so the difference between the
two is what the flow itself costs: parsing, state, scoring, Bytewax.  (One
consumer reads every partition and waits in ``poll`` while idle; the flow's
source keeps a consumer per partition, polled by Bytewax without blocking.)

Run it like the flow, configured by the same ``STREAMREC_*`` variables::

    python -m streamrec.bench.kafka_floor

>>> raw = b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"view","ts":1700000000000}'
>>> Recommendation.from_json(floor_recommendation(raw, 5.0, 6.0)).event_id
'e1'
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType

import click
import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    Producer,
    TopicPartition,
)

from streamrec.contracts import Recommendation
from streamrec.kafka_clients import (
    KafkaUnavailable,
    consumer_config,
    producer_config,
    topic_partitions,
)
from streamrec.settings import Settings

FLOOR_MODEL = "kafka-floor"
# Records taken from the client's queue at once (Bytewax's KafkaSource default).
DRAIN_BATCH = 1000
# How often an idle loop looks at its stop flag.
IDLE_POLL_S = 0.1


def floor_recommendation(raw: bytes | None, received_ms: float, emitted_ms: float) -> bytes | None:
    """The recommendation-shaped answer to one event, or None when the event cannot be read."""
    try:
        doc = orjson.loads(raw or b"")
        return Recommendation(
            event_id=str(doc["event_id"]),
            user_id=str(doc["user_id"]),
            items=[],
            model=FLOOR_MODEL,
            event_ts=int(doc["ts"]),
            received_ms=received_ms,
            emitted_ms=emitted_ms,
        ).to_json()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def serve_floor(
    settings: Settings, stop: Callable[[], bool], from_beginning: bool = True
) -> tuple[int, int]:
    """Answer every event until ``stop()``; returns (answered, unreadable)."""
    topic = settings.events_topic
    partitions = topic_partitions(settings, topic)
    topic_partitions(settings, settings.recommendations_topic)  # missing: say so now, not later
    consumer = Consumer(consumer_config(settings, group="streamrec-kafka-floor"))
    producer = Producer(producer_config(settings))
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in partitions])
    answered = unreadable = 0
    try:
        while not stop():
            first = consumer.poll(IDLE_POLL_S)
            if first is None:
                producer.poll(0)
                continue
            # poll() returns at the first record; consume() then takes what else
            # is queued without waiting (with a timeout it waits for a full batch).
            batch = [first, *consumer.consume(DRAIN_BATCH - 1, 0)]
            received_ms = time.time() * 1000.0
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaUnavailable(f"error while reading {topic!r}: {error}")
                value = floor_recommendation(message.value(), received_ms, time.time() * 1000.0)
                if value is None:
                    unreadable += 1
                    continue
                producer.produce(settings.recommendations_topic, value=value, key=message.key())
                producer.poll(0)
                answered += 1
    finally:
        producer.flush(10.0)
        consumer.close()
    return answered, unreadable


@click.command("kafka-floor")
@click.option(
    "--from",
    "start",
    type=click.Choice(["beginning", "end"]),
    default="beginning",
    show_default=True,
    help="Where in the events topic to start (the flow: its beginning).",
)
def main(start: str) -> None:
    """Answer each event with an empty recommendation: Kafka's own latency, for comparison.

    Reads STREAMREC_BROKERS, STREAMREC_EVENTS_TOPIC and
    STREAMREC_RECOMMENDATIONS_TOPIC like the flow. Stops on SIGTERM or Ctrl-C.
    """
    settings = Settings.from_env()
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    click.echo(
        f"kafka floor: {settings.events_topic!r} -> {settings.recommendations_topic!r} "
        f"at {settings.brokers}",
        err=True,
    )
    try:
        answered, unreadable = serve_floor(settings, lambda: stopping, start == "beginning")
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"kafka floor: answered {answered} event(s), {unreadable} unreadable", err=True)


if __name__ == "__main__":
    main()
