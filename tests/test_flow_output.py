"""The flow's output: no record is lost, and neither one record nor an outage stops the flow.

Against the real broker and the real `streamrec run` process.
"""

from __future__ import annotations

import hashlib
import random
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Message, Producer

from streamrec.contracts import (
    OUTPUT_REFUSED,
    STUB_HEADER_REASON,
    STUB_HEADER_VALUE_SHA256,
    STUB_HEADER_VALUE_SIZE,
    DeadLetter,
    Event,
    Recommendation,
)
from streamrec.kafka_clients import max_message_bytes, producer_config
from streamrec.settings import Settings
from streamrec.tools.kafka_local import LocalKafka
from streamrec.topics import create_topics
from tests.conftest import free_port
from tests.flow_harness import (
    FlowProcess,
    RecommendationCollector,
    TopicReader,
    headers_of,
    offset_of,
    partition_of,
    produce,
    sessions_applied_once,
    sessions_in,
    set_topic_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("no_flow_left_behind")]

# librdkafka's default message.max.bytes: the flow's producer kept it and crash-looped.
PRODUCER_DEFAULT_MAX = 1_000_000
# Set on the dead-letter topic: between the producer's default and the broker's.
DLQ_TOPIC_MAX = 1_020_000
# Kafka's default message.max.bytes: the largest record batch a topic takes.
BROKER_MAX = 1_048_588
OUTAGE_S = 60


def metric(settings: Settings, sample: str) -> float:
    """One sample (name with its labels, as written) of the flow's /metrics; 0 if absent."""
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _varint_size(n: int) -> int:
    zigzag = (n << 1) ^ (n >> 63)
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


def batch_bytes(key: bytes, value_size: int) -> int:
    """Bytes of a record batch (Kafka's format v2) holding one record with no headers."""
    record = 3 + _varint_size(len(key)) + len(key) + _varint_size(value_size) + value_size + 1
    return 61 + _varint_size(record) + record


def largest_value(limit: int, key: bytes) -> int:
    """The largest value a topic that takes batches of ``limit`` bytes accepts, under ``key``."""
    return next(v for v in range(limit, 0, -1) if batch_bytes(key, v) <= limit)


def produce_raw(settings: Settings, key: bytes, values: list[bytes]) -> dict[int, Message]:
    """Send each value with a producer that leaves size checks to the broker; accepted ones."""
    accepted: dict[int, Message] = {}

    def report(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            accepted[len(msg.value() or b"")] = msg
        else:
            assert err.code() == KafkaError.MSG_SIZE_TOO_LARGE, err

    producer = Producer(producer_config(settings) | {"message.max.bytes": str(4 * BROKER_MAX)})
    for value in values:
        producer.produce(settings.events_topic, value, key, on_delivery=report)
        assert producer.flush(30) == 0
    return accepted


def test_records_at_every_size_limit_get_a_dead_letter_and_the_flow_goes_on(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    settings = kafka_settings.replace(metrics_port=free_port())
    set_topic_config(settings, settings.dlq_topic, "max.message.bytes", str(DLQ_TOPIC_MAX))
    assert max_message_bytes(settings, [settings.events_topic]) == {
        settings.events_topic: BROKER_MAX
    }
    key = b"u-large"
    input_max = largest_value(BROKER_MAX, key)
    sizes = [
        limit + delta
        for limit in (PRODUCER_DEFAULT_MAX, DLQ_TOPIC_MAX, input_max, BROKER_MAX)
        for delta in (-1, 0, 1)
    ]
    values = {size: random.Random(size).randbytes(size) for size in sizes}
    before = movielens[:20]
    # Valid events of the same user (so of the same partition) after the large records.
    after = [
        Event(f"after-{i}", key.decode(), e.item_id, "view", e.ts)
        for i, e in enumerate(movielens[20:30])
    ]
    produce(settings, before)
    accepted = produce_raw(settings, key, list(values.values()))
    produce(settings, after)
    # The broker refuses what is over its limit at input: those never reach the flow.
    assert sorted(accepted) == [size for size in sizes if size <= input_max]

    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    reader = TopicReader(settings, settings.dlq_topic)
    letters: list[Message] = []
    try:
        collector.wait_for({e.event_id for e in before + after}, flow, timeout_s=120)
        deadline = time.monotonic() + 60
        while len(letters) < len(accepted) and time.monotonic() < deadline:
            letters.extend(reader.read(0.5))
        stubbed = metric(
            settings, 'streamrec_output_failures_total{action="stubbed",code="MSG_SIZE_TOO_LARGE"}'
        )
    finally:
        reader.close()
        collector.close()
        assert flow.stop() == 0, flow.output()[-3000:]

    by_source: dict[tuple[int, int], tuple[DeadLetter, dict[str, bytes]]] = {}
    for message in letters:
        letter = DeadLetter.from_record(message.key(), message.value(), headers_of(message))
        headers = {name: data for name, data in headers_of(message) if isinstance(data, bytes)}
        by_source[(letter.partition, letter.offset)] = (letter, headers)
    assert len(by_source) == len(letters) == len(accepted)
    for size, record in accepted.items():
        letter, headers = by_source[(partition_of(record), offset_of(record))]
        assert letter.code == "too_large" and letter.key == key
        # A copy fits while the value, its headers and framing stay within the topic's limit.
        if size <= PRODUCER_DEFAULT_MAX + 1:
            assert letter.raw == values[size], size
            assert STUB_HEADER_REASON not in headers
        else:
            assert letter.raw is None, size
            assert headers[STUB_HEADER_VALUE_SIZE] == str(size).encode()
            assert (
                headers[STUB_HEADER_VALUE_SHA256]
                == hashlib.sha256(values[size]).hexdigest().encode()
            )
            assert b"Message size too large" in headers[STUB_HEADER_REASON]
    assert stubbed == sum(size > PRODUCER_DEFAULT_MAX + 1 for size in accepted)


def test_a_recommendation_the_broker_refuses_is_dead_lettered_and_the_flow_goes_on(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    settings = kafka_settings.replace(metrics_port=free_port())
    # Smaller than any recommendation: the broker refuses each one.
    set_topic_config(settings, settings.recommendations_topic, "max.message.bytes", "256")
    refused, later = movielens[:20], movielens[20:40]
    produce(settings, refused)
    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    reader = TopicReader(settings, settings.dlq_topic)
    letters: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + 120
        while len(letters) < len(refused) and time.monotonic() < deadline:
            assert flow.alive(), flow.output()[-3000:]
            letters.extend(
                DeadLetter.from_record(m.key(), m.value(), headers_of(m)) for m in reader.read(0.5)
            )
        counted = metric(
            settings,
            'streamrec_output_failures_total{action="dead_lettered",code="MSG_SIZE_TOO_LARGE"}',
        )
        # Once the topic takes them again, recommendations flow with no restart.
        set_topic_config(settings, settings.recommendations_topic, "max.message.bytes", "100000")
        produce(settings, later)
        collector.wait_for({e.event_id for e in later}, flow, timeout_s=120)
    finally:
        reader.close()
        collector.close()
        assert flow.stop() == 0, flow.output()[-3000:]

    assert all(d.code == OUTPUT_REFUSED for d in letters)
    assert all(d.topic == settings.recommendations_topic for d in letters)
    assert all("Message size too large" in d.message for d in letters)
    # Small enough for the dead-letter topic: each is the recommendation, byte for byte.
    answered = [Recommendation.from_json(d.raw) for d in letters if d.raw is not None]
    assert sorted(r.event_id for r in answered) == sorted(e.event_id for e in refused)
    assert not {e.event_id for e in refused} & collector.by_event.keys()
    assert counted == len(refused)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of this test's own, to kill: the session's shared one stays up for the others."""
    settings = Settings.from_env(
        kafka_port=free_port(), kafka_controller_port=free_port(), kafka_dir=tmp_path / "kafka"
    )
    broker = LocalKafka(settings, log=lambda _: None)
    broker.up()
    yield broker
    broker.down()


def test_a_broker_outage_blocks_the_output_and_the_flow_resumes_with_nothing_lost(
    own_broker: LocalKafka, movielens: list[Event], tmp_path: Path
) -> None:
    settings = own_broker.settings.replace(
        brokers=own_broker.bootstrap,
        events_partitions=2,
        state_dir=tmp_path / "state",
        recovery_dir=tmp_path / "recovery",
        metrics_port=free_port(),
        # Longer outages than librdkafka's delivery timeout: records come back failed
        # several times over and are sent again, in order (its default is 5 minutes).
        kafka_options="message.timeout.ms=15000",
    )
    create_topics(settings)
    events = movielens[:3000]
    wanted = {e.event_id for e in events}
    produce(settings, events)
    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    exits = 0
    try:
        deadline = time.monotonic() + 120
        # The flow reads ahead: the broker dies with answers still to deliver.
        while collector.poll(0.1) == 0 and time.monotonic() < deadline:
            assert flow.alive(), flow.output()[-3000:]
        answered_before = len(collector.by_event)
        own_broker.kill()
        outage_ends = time.monotonic() + OUTAGE_S
        while time.monotonic() < outage_ends:
            exits += not flow.alive()
            time.sleep(1)
        blocked_while_down = metric(settings, "streamrec_output_blocked")
        own_broker.up()
        collector.wait_for(wanted, flow, timeout_s=300)
        sent_again = metric(
            settings, 'streamrec_output_failures_total{action="retried",code="_MSG_TIMED_OUT"}'
        )
        assert flow.stop(timeout_s=60) == 0, flow.output()[-3000:]
    finally:
        collector.close()

    log = flow.output()
    lost = len(wanted - collector.by_event.keys())
    duplicates = sum(len(answers) - 1 for answers in collector.by_event.values())
    reference = sessions_applied_once(settings, tmp_path / "reference")
    served = sessions_in(settings)
    differ = sum(served.get(user) != session for user, session in reference.items())
    differ += len(served.keys() - reference.keys())
    print(
        f"outage of {OUTAGE_S} s: {len(events)} events, {answered_before} answered before it, "
        f"{lost} lost, {duplicates} duplicate answers, {differ} sessions differ, "
        f"{exits} flow exits, {log.count('flow: output blocked')} 'output blocked' lines, "
        f"{sent_again:.0f} records sent again after a delivery timeout"
    )
    assert (lost, differ, exits) == (0, 0, 0)
    assert answered_before < len(events)
    assert log.count("flow: output blocked") == 1, log[-3000:]
    assert "flow: output resumed after" in log
    assert blocked_while_down == 1
    assert sent_again > 0
