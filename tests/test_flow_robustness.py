"""No single event, record or operation on the topic may cost sessions: the real flow and broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from rocksdict import Rdict

from streamrec.contracts import Event
from streamrec.flows.cli import (
    EXIT_CONFIGURATION,
    EXIT_STATE_UNUSABLE,
    EXIT_STATE_UNWRITABLE,
    EXIT_UNAVAILABLE,
)
from streamrec.kafka_clients import producer_config, topic_partitions
from streamrec.settings import Settings
from streamrec.state.keys import session_key
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import db_options
from streamrec.state.store import SessionStore
from streamrec.topics import create_topics, delete_topics
from tests.conftest import fill
from tests.flow_harness import (
    FlowProcess,
    RecommendationCollector,
    dead_letters,
    produce,
    serve_until_answered,
    sessions_applied_once,
    sessions_in,
)

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("no_flow_left_behind")]

DAY_MS = 24 * 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def events_of(users: int, ts: int, prefix: str = "e") -> list[Event]:
    return [Event(f"{prefix}{n}", f"u{n}", f"i{n % 7}", "view", ts + n) for n in range(users)]


def test_events_from_a_clock_that_lies_never_expire_other_users_sessions(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # A one-hour TTL: under the old rule, any event an hour ahead expired every other session.
    settings = kafka_settings.replace(session_ttl_s=3600.0)
    start = now_ms() - 600_000
    honest = events_of(35, start)
    ahead_within_skew = Event("ahead", "u0", "i1", "view", now_ms() + 12 * 3600 * 1000)
    from_the_future = [
        Event(f"future{n}", f"liar{n}", "i1", "view", now_ms() + 31 * DAY_MS) for n in range(4)
    ]
    produce(settings, [*honest, ahead_within_skew, *from_the_future])
    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    try:
        collector.wait_for({e.event_id for e in honest} | {"ahead"}, flow)
        # The sweep runs every 5 s of wall time, on a batch: give it batches to run on.
        for round_ in range(3):
            time.sleep(6)
            produce(settings, events_of(3, now_ms(), prefix=f"late{round_}-"))
        collector.wait_for({f"late2-{n}" for n in range(3)}, flow)
    finally:
        collector.close()
        assert flow.stop() == 0, flow.output()[-2000:]

    letters = dead_letters(settings, expected=4)
    assert sorted(letter.code for letter in letters) == ["bad_timestamp"] * 4
    assert not {f"future{n}" for n in range(4)} & collector.by_event.keys()
    # Every honest user's session is still in RocksDB: no sweep removed it.
    assert stored_users(settings) == {f"u{n}" for n in range(35)}


def stored_users(settings: Settings) -> set[str]:
    users: set[str] = set()
    for partition in topic_partitions(settings, settings.events_topic):
        with SessionStore.open(settings.state_dir, partition, 2, settings) as store:
            users.update(store.user_ids())
    return users


def test_a_recreated_events_topic_is_refused_until_the_state_is_reset(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    first = events_of(20, now_ms() - 60_000, prefix="old")
    produce(kafka_settings, first)
    serve_until_answered(kafka_settings, {e.event_id for e in first})

    delete_topics(kafka_settings, [kafka_settings.events_topic])
    deadline = time.monotonic() + 60
    while True:  # deletion completes in the background
        try:
            create_topics(kafka_settings)
            topic_partitions(kafka_settings, kafka_settings.events_topic)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(1)
    second = events_of(20, now_ms(), prefix="new")
    produce(kafka_settings, second)

    refused = FlowProcess(kafka_settings).start()
    assert refused.process is not None
    assert refused.process.wait(120) == EXIT_STATE_UNUSABLE
    assert "deleted and recreated" in refused.output()
    assert "streamrec state reset" in refused.output()

    reset = subprocess.run(
        [sys.executable, "-m", "streamrec", "state", "reset", "--yes"],
        env={**os.environ, **kafka_settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reset.returncode == 0, reset.stderr
    serve_until_answered(kafka_settings, {e.event_id for e in second})
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")


def test_an_unreadable_session_record_is_moved_aside_and_its_user_starts_afresh(
    kafka_settings: Settings,
) -> None:
    first = events_of(10, now_ms() - 60_000, prefix="a")
    produce(kafka_settings, first)
    serve_until_answered(kafka_settings, {e.event_id for e in first})
    damaged = [p for p in range(2) if shard_dir(kafka_settings.state_dir, p).exists()]
    for partition in damaged:
        db = Rdict(str(shard_dir(kafka_settings.state_dir, partition)), db_options())
        for n in range(10):
            if db.get(session_key(f"u{n}")) is not None:
                db[session_key(f"u{n}")] = b"\x03garbage"
                victim = f"u{n}"
                break
        db.close()
    later = Event("b-victim", victim, "i9", "view", now_ms())
    produce(kafka_settings, [later])
    flow, collector = serve_until_answered(kafka_settings, {"b-victim"})
    assert "could not be read; it was moved aside" in flow.output()
    session = sessions_in(kafka_settings)[victim]
    assert [i["item_id"] for i in session["interactions"]] == ["i9"]


def test_a_model_that_cannot_be_served_stops_the_flow_with_one_line_and_its_exit_code(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("card.json", "manifest.json"):  # sealed, but with no model file
        shutil.copy(kafka_settings.model_dir / name, broken / name)
    flow = FlowProcess(kafka_settings.replace(model_dir=broken)).start()
    assert flow.process is not None
    assert flow.process.wait(120) == EXIT_CONFIGURATION
    lines = [line for line in flow.output().splitlines() if "cannot go on" in line]
    assert len(lines) == 1 and "has no ONNX file" in lines[0], flow.output()


@pytest.mark.parametrize("missing", ["recommendations", "dead letters"])
def test_a_missing_output_topic_stops_the_flow_at_start_with_exit_69(
    kafka_settings: Settings, missing: str
) -> None:
    # Found by review: the flow started, and every answer waited as "output blocked".
    topic = (
        kafka_settings.recommendations_topic
        if missing == "recommendations"
        else kafka_settings.dlq_topic
    )
    delete_topics(kafka_settings, [topic])
    flow = FlowProcess(kafka_settings).start()
    assert flow.process is not None
    assert flow.process.wait(120) == EXIT_UNAVAILABLE
    lines = [line for line in flow.output().splitlines() if "cannot go on" in line]
    assert len(lines) == 1 and f"topic {topic!r} does not exist" in lines[0], flow.output()


def test_a_full_disk_stops_the_flow_with_one_line_and_exit_74(
    kafka_settings: Settings, small_disk: Path, tmp_path: Path
) -> None:
    # With RocksDB's log, every micro-batch reaches the disk at once (without it, a full
    # disk is met at the next memtable flush, megabytes later).
    settings = kafka_settings.replace(state_dir=small_disk / "state", state_wal=True)
    first = events_of(10, now_ms() - 60_000, prefix="a")
    produce(settings, first)
    # The log on another disk: the flow's last line must have somewhere to go.
    flow = FlowProcess(settings, log=tmp_path / "flow.log").start()
    collector = RecommendationCollector(settings)
    try:
        collector.wait_for({e.event_id for e in first}, flow)
        fill(small_disk)
        produce(settings, events_of(200, now_ms(), prefix="b"))
        assert flow.process is not None
        assert flow.process.wait(120) == EXIT_STATE_UNWRITABLE
    finally:
        collector.close()
    lines = [line for line in flow.output().splitlines() if "cannot go on" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0], flow.output()[-3000:]


def produce_to(settings: Settings, partition: int, events: list[Event]) -> None:
    """Events on a partition of our choosing (the flow needs only key == user_id)."""
    producer = Producer(producer_config(settings))
    for event in events:
        producer.produce(settings.events_topic, event.to_json(), event.key, partition=partition)
    assert producer.flush(30) == 0


def test_a_partition_hours_behind_and_events_far_in_the_past_expire_no_one_else(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings.replace(session_ttl_s=3600.0)
    behind = now_ms() - 5 * 3600 * 1000  # partition 0 replays traffic five hours old
    produce_to(
        settings, 0, [Event(f"p0-{n}", f"a{n}", "i1", "view", behind + n) for n in range(15)]
    )
    produce_to(settings, 1, [Event(f"p1-{n}", f"b{n}", "i2", "view", now_ms()) for n in range(15)])
    produce_to(settings, 1, [Event("ancient", "b-1995", "i3", "view", 800_000_000_000)])
    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    try:
        collector.wait_for({f"p0-{n}" for n in range(15)} | {"ancient"}, flow)
        for round_ in range(3):  # sweeps run on batches, every 5 s of wall time
            time.sleep(6)
            produce_to(settings, 0, [Event(f"late0-{round_}", "a0", "i4", "view", behind + 9)])
            produce_to(settings, 1, [Event(f"late1-{round_}", "b0", "i4", "view", now_ms())])
        collector.wait_for({"late0-2", "late1-2"}, flow)
    finally:
        collector.close()
        assert flow.stop() == 0, flow.output()[-2000:]
    # The 1995 session is idle by its shard's clock and may be swept; nobody else's is.
    assert stored_users(settings) - {"b-1995"} == {f"a{n}" for n in range(15)} | {
        f"b{n}" for n in range(15)
    }


def test_a_damaged_rocksdb_stops_the_flow_with_one_line_and_exit_65(
    kafka_settings: Settings,
) -> None:
    first = events_of(10, now_ms() - 60_000, prefix="a")
    produce_to(kafka_settings, 0, first)
    serve_until_answered(kafka_settings, {e.event_id for e in first})
    with SessionStore.open(kafka_settings.state_dir, 0, 2, kafka_settings):
        pass  # reopening moves the write-ahead log into a table file
    for table in shard_dir(kafka_settings.state_dir, 0).glob("*.sst"):
        damaged = bytearray(table.read_bytes())
        damaged[20] ^= 0xFF
        table.write_bytes(bytes(damaged))
    produce_to(kafka_settings, 0, events_of(1, now_ms(), prefix="b"))
    flow = FlowProcess(kafka_settings).start()
    assert flow.process is not None
    assert flow.process.wait(120) == EXIT_STATE_UNUSABLE
    lines = [line for line in flow.output().splitlines() if "cannot go on" in line]
    assert len(lines) == 1 and "is damaged" in lines[0], flow.output()[-3000:]
