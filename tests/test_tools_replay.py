"""`streamrec replay` and `streamrec record`: traffic into Kafka, and back out to a file."""

from __future__ import annotations

import doctest
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

import streamrec.tools.replay
from streamrec.contracts import MAX_TS_MS, Event, parse_event
from streamrec.kafka_clients import consumer_config, producer_config, topic_partitions
from streamrec.settings import Settings
from streamrec.tools.record import RecordedMessage, read_recording, record_command
from streamrec.tools.replay import (
    LAP_GAP_MS,
    UNBOUNDED,
    DatasetSource,
    EventTime,
    EventTimeLimitError,
    RecordingSource,
    event_json,
    open_source,
    replay_command,
)

# Two users over thirty years (1990-06-01 to 2020-01-01): each lap moves recorded times about
# thirty years on, so laps 0 to 2 end before 2100 and lap 3 passes it.
LONG_AGO = [
    Event("a", "u1", "i1", "view", 644_198_400_000),
    Event("b", "u2", "i2", "click", 1_200_000_000_000, 2.0),
    Event("c", "u1", "i3", "rating", 1_577_836_800_000, 4.5),
]
# Gaps of 400 ms and 1 s, for the timing of --speed.
SECONDS_APART = [
    Event("s1", "u1", "i1", "view", 1_700_000_000_000),
    Event("s2", "u2", "i2", "view", 1_700_000_000_400),
    Event("s3", "u1", "i3", "view", 1_700_000_001_400),
]


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "STREAMREC_BROKERS": settings.brokers,
        "STREAMREC_EVENTS_TOPIC": settings.events_topic,
        "STREAMREC_RECOMMENDATIONS_TOPIC": settings.recommendations_topic,
    }


def write_dataset(path: Path, events: Sequence[Event]) -> Path:
    path.write_bytes(b"".join(e.to_json() + b"\n" for e in events))
    return path


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


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


def test_the_replay_docstring_examples_hold() -> None:
    result = doctest.testmod(streamrec.tools.replay, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


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


def test_under_event_time_now_each_event_carries_the_send_time_it_is_given() -> None:
    source = DatasetSource(LONG_AGO, count=9, event_time=EventTime.NOW)
    send_ms = 1_750_000_000_000

    sent = [source.record(i, send_ms + i) for i in range(len(source))]

    events = [parse_event(r.value, r.key) for r in sent]
    assert [e.ts for e in events] == [send_ms + i for i in range(9)]
    assert [e.event_id for e in events][2:5] == ["c", "a~1", "b~1"]
    assert [(e.user_id, e.item_id, e.type, e.value) for e in events[3:6]] == [
        (e.user_id, e.item_id, e.type, e.value) for e in LONG_AGO
    ]


def test_under_event_time_recorded_each_lap_keeps_the_dataset_times_one_span_later() -> None:
    source = DatasetSource(LONG_AGO, count=9, event_time=EventTime.RECORDED)
    span_ms = LONG_AGO[-1].ts - LONG_AGO[0].ts + LAP_GAP_MS

    sent = [source.record(i, 1_750_000_000_000) for i in range(len(source))]

    events = [parse_event(r.value, r.key) for r in sent]
    assert [e.ts for e in events] == [e.ts + lap * span_ms for lap in range(3) for e in LONG_AGO]


def test_a_restamped_event_is_encoded_as_the_contract_encodes_it() -> None:
    odd = Event('say "hi",\\ ~ é', "ü1", '","ts":1', "rating", 1_000_000_000_000, 3.0)
    for event in [*LONG_AGO, odd]:
        expected = Event(
            event.event_id + "~7", event.user_id, event.item_id, event.type, 1_234, event.value
        )

        assert event_json(event, event.event_id + "~7", 1_234) == expected.to_json()


def test_a_recorded_time_replay_that_would_pass_2100_is_refused_before_it_sends(
    tmp_path: Path,
) -> None:
    dataset = write_dataset(tmp_path / "long-ago.jsonl", LONG_AGO)

    result = CliRunner().invoke(
        replay_command,
        ["--data", str(dataset), "--count", "12", "--event-time", "recorded", "--no-progress"],
        env={"STREAMREC_BROKERS": "127.0.0.1:1"},  # no broker: refused before connecting
    )

    assert result.exit_code == 2, result.output
    assert "during lap 3 they would pass 2100-01-01" in result.output
    assert "3 whole lap(s) (0 to 2) fit, 11 events" in result.output  # and 2 of lap 3
    assert "--count 11 or less" in result.output
    assert "--event-time now" in result.output


def test_a_recorded_time_replay_without_a_count_ends_before_2100() -> None:
    source = DatasetSource(LONG_AGO, start=1, count=UNBOUNDED, event_time=EventTime.RECORDED)

    assert len(source) == 10  # 11 positions before 2100, less the one skipped
    assert source.recorded_ms(len(source) - 1) < MAX_TS_MS <= source.recorded_ms(len(source))
    with pytest.raises(EventTimeLimitError, match="lap 3"):
        DatasetSource(LONG_AGO, start=11, count=UNBOUNDED, event_time=EventTime.RECORDED)


def test_a_datasets_event_time_is_a_setting_and_a_recording_stays_byte_exact(
    tmp_path: Path,
) -> None:
    dataset = write_dataset(tmp_path / "d.jsonl", LONG_AGO)
    recording = tmp_path / "r.jsonl"
    recording.write_bytes(
        RecordedMessage("events", 0, 0, 1, "create", b"u1", LONG_AGO[0].to_json()).to_json_line()
    )
    settings = Settings.from_env({"STREAMREC_REPLAY_EVENT_TIME": "recorded"})

    from_dataset = open_source(settings, None, dataset, 0, None, None)
    from_recording = open_source(Settings(), recording, None, 0, None, None)

    assert Settings().replay_event_time == EventTime.NOW
    assert from_dataset.event_time is EventTime.RECORDED
    assert from_recording.event_time is EventTime.RECORDED
    assert from_recording.record(0, 1_750_000_000_000).value == LONG_AGO[0].to_json()
    with pytest.raises(ValueError, match="STREAMREC_REPLAY_EVENT_TIME takes 'now' or 'recorded'"):
        open_source(settings.replace(replay_event_time="later"), None, dataset, 0, None, None)


def test_a_recording_under_event_time_now_restamps_only_its_valid_events() -> None:
    valid = b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"view","ts":1000000000000,'
    valid += b'"extra":[1,2]}'
    forget = b'{"event_id":"f1","user_id":"u1","type":"forget","ts":1000000000001}'
    hostile = [
        (b"u1", b'{"event_id":"e2","user_id":"u1","item_id":"i1","type":"view","ts":1}'),
        (b"u2", valid),  # keyed by another user
        (b"u1", b"\xff\xfe not json"),
        (None, None),
    ]
    records = [(b"u1", valid), (b"u1", forget), *hostile]
    messages = [
        RecordedMessage("events", 0, offset, 1_000, "create", key, value)
        for offset, (key, value) in enumerate(records)
    ]
    source = RecordingSource(messages, event_time=EventTime.NOW)
    send_ms = 1_750_000_000_000

    sent = [source.record(i, send_ms) for i in range(len(source))]

    assert source.restamped == 2
    restamped = orjson.loads(valid) | {"ts": send_ms}
    assert orjson.loads(sent[0].value or b"") == restamped
    assert parse_event(sent[0].value, b"u1").ts == send_ms
    assert orjson.loads(sent[1].value or b"")["ts"] == send_ms
    assert [(r.key, r.value) for r in sent[2:]] == hostile


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
    # The achieved send rate depends on the machine's load: a benchmark figure, not asserted.
    stamps = sorted(
        m.timestamp()[1] for m in read_topic(kafka_settings, kafka_settings.events_topic, 40)
    )
    assert stamps[-1] - stamps[0] == pytest.approx(39 * 5, abs=2)  # 5 ms apart, to the ms


@pytest.mark.kafka
@pytest.mark.parametrize("rate", ["400", "max"])
def test_a_replay_of_many_laps_sends_events_of_now_that_the_contract_accepts(
    kafka_settings: Settings, tmp_path: Path, rate: str
) -> None:
    dataset = write_dataset(tmp_path / "long-ago.jsonl", LONG_AGO)
    laps = 8  # under --event-time recorded, lap 3 would pass 2100
    before_ms = wall_clock_ms()

    result = CliRunner().invoke(
        replay_command,
        ["--data", str(dataset), "--count", str(3 * laps), "--rate", rate, "--no-progress"],
        env=cli_env(kafka_settings),
    )

    after_ms = wall_clock_ms()
    assert result.exit_code == 0, result.output
    messages = read_topic(kafka_settings, kafka_settings.events_topic, 3 * laps)
    events = [parse_event(m.value(), m.key()) for m in messages]  # raises if not accepted
    assert len({e.event_id for e in events}) == 3 * laps
    assert {e.event_id for e in events} >= {"a", "c~7"}
    assert all(e.ts == m.timestamp()[1] for e, m in zip(events, messages, strict=True))
    assert all(before_ms <= e.ts <= after_ms for e in events)
    for user in ("u1", "u2"):
        times = [e.ts for e in events if e.user_id == user]  # in partition order
        assert times == sorted(times)


@pytest.mark.kafka
def test_replay_at_a_speed_keeps_the_datasets_gaps_divided_by_it(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    dataset = write_dataset(tmp_path / "seconds-apart.jsonl", SECONDS_APART)

    result = CliRunner().invoke(
        replay_command,
        ["--data", str(dataset), "--count", "6", "--speed", "4", "--no-progress"],
        env=cli_env(kafka_settings),
    )

    assert result.exit_code == 0, result.output
    events = [
        parse_event(m.value(), m.key())
        for m in read_topic(kafka_settings, kafka_settings.events_topic, 6)
    ]
    times = [e.ts for e in sorted(events, key=lambda e: e.ts)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 400 ms, 1 s, the gap between laps, 400 ms, 1 s -- each a quarter, to the millisecond.
    assert gaps == pytest.approx([100, 250, LAP_GAP_MS / 4, 100, 250], abs=1)


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
        (b"u3", LONG_AGO[0].to_json().replace(b'"u1"', b'"u3"')),  # valid: keeps its time too
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
    assert "recorded 5 record(s)" in recorded.output
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
    copies = read_topic(kafka_settings, target, 5)
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
