"""`streamrec replay` and `streamrec record`: traffic into Kafka, and back out to a file."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from streamrec.contracts import Event, parse_event
from streamrec.settings import Settings
from streamrec.kafka_clients import consumer_config, producer_config, topic_partitions
from tools.record import RecordedMessage, read_recording, record_command
from tools.replay import DatasetSource, replay_command


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "STREAMREC_BROKERS": settings.brokers,
        "STREAMREC_EVENTS_TOPIC": settings.events_topic,
        "STREAMREC_RECOMMENDATIONS_TOPIC": settings.recommendations_topic,
    }


def read_topic(
    settings: Settings, topic: str, count: int, timeout_s: float = 15.0
) -> list[Message]:
    consumer = Consumer(consumer_config(settings, group="test-reader"))
    consumer.assign(
        [TopicPartition(topic, p, OFFSET_BEGINNING) for p in topic_partitions(settings, topic)]
    )
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            messages.append(message)
    consumer.close()
    return messages


def test_a_dataset_replayed_past_its_end_laps_with_fresh_ids_and_later_times() -> None:
    events = [
        Event("a", "u1", "i1", "view", 1_000_000_000_000),
        Event("b", "u2", "i2", "view", 1_000_000_005_000),
    ]
    source = DatasetSource(events, start=1, count=4)

    replayed = [source.event(i) for i in range(len(source))]

    assert [e.event_id for e in replayed] == ["b", "a~1", "b~1", "a~2"]
    assert all(a.ts < b.ts for a, b in zip(replayed, replayed[1:], strict=False))
    assert len({e.event_id for e in replayed}) == 4


@pytest.mark.kafka
def test_replay_sends_dataset_events_keyed_by_user(kafka_settings: Settings) -> None:
    result = CliRunner().invoke(
        replay_command,
        ["--count", "50", "--rate", "max", "--no-progress"],
        env=cli_env(kafka_settings),
    )

    assert result.exit_code == 0, result.output
    assert "replayed 50 record(s)" in result.output
    messages = read_topic(kafka_settings, kafka_settings.events_topic, 50)
    assert len(messages) == 50
    for message in messages:
        event = parse_event(message.value(), message.key())  # raises if key != user_id
        assert event.event_id.startswith("ml:")


@pytest.mark.kafka
def test_replay_at_a_rate_stamps_each_record_with_its_scheduled_time(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    report_path = tmp_path / "replay.json"
    result = CliRunner().invoke(
        replay_command,
        ["--count", "40", "--rate", "200", "--no-progress", "--json", str(report_path)],
        env=cli_env(kafka_settings),
    )

    assert result.exit_code == 0, result.output
    report = orjson.loads(report_path.read_bytes())
    assert report["sent"] == report["delivered"] == 40
    assert report["send_rate"] == pytest.approx(200, rel=0.1)
    stamps = sorted(
        m.timestamp()[1] for m in read_topic(kafka_settings, kafka_settings.events_topic, 40)
    )
    assert stamps[-1] - stamps[0] == pytest.approx(39 * 5, abs=2)  # 5 ms apart, to the ms


@pytest.mark.kafka
def test_record_then_replay_reproduces_the_records_byte_for_byte(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    topic = kafka_settings.events_topic
    producer = Producer(producer_config(kafka_settings))
    originals = [
        (b"u1", b'{"not": "an event"}'),
        (b"u2", b"\xff\xfe binary"),
        (None, b"no key"),
        (b"u1", b"second of u1"),
    ]
    for key, value in originals:
        producer.produce(topic, value, key)
        producer.flush(10)
        time.sleep(0.02)  # recorded gaps of ~20 ms
    recording = tmp_path / "events.jsonl"

    recorded = CliRunner().invoke(
        record_command, ["-o", str(recording), "--no-progress"], env=cli_env(kafka_settings)
    )

    assert recorded.exit_code == 0, recorded.output
    assert "recorded 4 record(s)" in recorded.output
    messages = read_recording(recording)
    assert [(m.key, m.value) for m in messages] == originals
    assert all(m.timestamp_type == "create" for m in messages)

    target = kafka_settings.recommendations_topic
    replayed = CliRunner().invoke(
        replay_command,
        ["--from", str(recording), "--speed", "4", "--topic", target, "--no-progress"],
        env=cli_env(kafka_settings),
    )

    assert replayed.exit_code == 0, replayed.output
    copies = read_topic(kafka_settings, target, 4)
    by_key: dict[bytes | None, list[bytes | None]] = {}
    for message in copies:
        by_key.setdefault(message.key(), []).append(message.value())
    assert by_key[b"u1"] == [b'{"not": "an event"}', b"second of u1"]  # per-key order kept
    assert sorted(v for v in (m.value() for m in copies) if v) == sorted(v for _, v in originals)


def test_a_recording_replays_in_timestamp_order_keeping_each_partitions_order(
    tmp_path: Path,
) -> None:
    lines = [
        RecordedMessage("t", 0, 0, 1_000, "create", b"a", b"a0"),
        RecordedMessage("t", 0, 1, 900, "create", b"a", b"a1"),  # a clock step back in partition 0
        RecordedMessage("t", 1, 0, 950, "create", b"b", b"b0"),
    ]
    path = tmp_path / "rec.jsonl"
    path.write_bytes(b"\n".join(m.to_json_line() for m in lines) + b"\n")

    assert [m.value for m in read_recording(path)] == [b"b0", b"a0", b"a1"]


def test_replay_refuses_rate_and_speed_together() -> None:
    result = CliRunner().invoke(replay_command, ["--rate", "100", "--speed", "2", "--count", "1"])
    assert result.exit_code == 2
    assert "exclude each other" in result.output


def test_replay_says_how_to_get_a_broker_when_none_answers() -> None:
    result = CliRunner().invoke(
        replay_command,
        ["--count", "1", "--no-progress"],
        env={"STREAMREC_BROKERS": "127.0.0.1:1"},
    )
    assert result.exit_code == 1
    assert "streamrec kafka up" in result.output
