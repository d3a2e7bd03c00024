"""The dataflow end to end, against the real broker, real RocksDB and the committed model."""

from __future__ import annotations

import random
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from streamrec.contracts import Event, ForgetRequest
from streamrec.settings import Settings
from tests.conftest import free_port
from tests.flow_harness import (
    FlowProcess,
    RecommendationCollector,
    dead_letters,
    produce,
    serve_until_answered,
    sessions_applied_once,
    sessions_in,
    stop_all,
)

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("no_flow_left_behind")]

TOP_K = 10


def history_after(events: list[Event], settings: Settings) -> dict[str, list[str]]:
    """Each event's session items once applied: the user's last items since an idle gap."""
    items: dict[str, list[str]] = {}
    last_ts: dict[str, int] = {}
    after: dict[str, list[str]] = {}
    for event in events:
        if event.ts - last_ts.get(event.user_id, event.ts) > settings.session_ttl_s * 1000:
            items[event.user_id] = []
        last_ts[event.user_id] = event.ts
        mine = items.setdefault(event.user_id, [])
        mine.append(event.item_id)
        after[event.event_id] = mine[-settings.session_length :]
    return after


def test_every_valid_event_gets_k_unseen_recommendations(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    events = movielens[:3000]
    produce(kafka_settings, events)
    flow, collector = serve_until_answered(kafka_settings, {e.event_id for e in events})

    seen = history_after(events, kafka_settings)
    for event in events:
        (rec,) = collector.by_event[event.event_id]
        assert rec.user_id == event.user_id and rec.event_ts == event.ts
        assert len(rec.items) == TOP_K
        already_seen = {i.item_id for i in rec.items} & set(seen[event.event_id])
        assert not already_seen, (event, already_seen, seen[event.event_id], rec)
        scores = [i.score for i in rec.items]
        assert scores == sorted(scores, reverse=True)
        assert rec.received_ms <= rec.emitted_ms
    assert "flow: stopped; session stores closed" in flow.output()


def test_a_stop_during_start_up_is_a_clean_exit_and_the_next_run_serves_everything(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    events = movielens[:300]
    produce(kafka_settings, events)
    flow = FlowProcess(kafka_settings).start()
    assert flow.started_handling_signals(), flow.output()
    # At once: the model is still loading and the stores opening.
    assert flow.stop() == 0, flow.output()[-2000:]
    assert "session stores closed" in flow.output()

    serve_until_answered(kafka_settings, {e.event_id for e in events})


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels, as written) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(f"{name} not in the metrics")


def listening_addresses(flow: FlowProcess) -> set[tuple[str, int]]:
    """The (address, port) pairs the flow's process accepts connections on."""
    assert flow.process is not None
    connections = psutil.Process(flow.process.pid).net_connections(kind="inet")
    return {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}


def test_the_flow_serves_prometheus_metrics_of_its_work(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    settings = kafka_settings.replace(metrics_port=free_port())
    events = movielens[:500]  # a few users, many events each: later ones find a cached session
    produce(settings, events)
    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    try:
        collector.wait_for({e.event_id for e in events}, flow)
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        listening = listening_addresses(flow)
    finally:
        collector.close()
        flow.stop()
    # Nothing of the flow's listens beyond this machine unless STREAMREC_METRICS_HOST says so.
    assert listening == {("127.0.0.1", settings.metrics_port)}
    assert metric(text, "streamrec_events_total") == len(events)
    assert metric(text, "streamrec_recommendations_total") == len(events)
    users = len({e.user_id for e in events})
    cached = metric(text, 'streamrec_session_reads_total{source="cache"}')
    assert cached + metric(text, 'streamrec_session_reads_total{source="rocksdb"}') == len(events)
    assert cached >= len(events) - users  # every user's first event found no session
    # Every cyclic garbage collection is timed (a full one is a stall to look for).
    assert metric(text, 'streamrec_gc_pause_seconds_count{generation="0"}') > 0


def test_a_new_item_is_a_valid_event_and_still_gets_recommendations(
    kafka_settings: Settings,
) -> None:
    cold = [
        Event("c1", "newcomer", "never-seen-item", "view", 1_700_000_000_000),
        Event("c2", "newcomer", "another-unknown", "click", 1_700_000_001_000),
    ]
    produce(kafka_settings, cold)
    flow = FlowProcess(kafka_settings).start()
    collector = RecommendationCollector(kafka_settings)
    try:
        collector.wait_for({"c1", "c2"}, flow, timeout_s=60)
    finally:
        collector.close()
        flow.stop()
    for event_id in ("c1", "c2"):
        (rec,) = collector.by_event[event_id]
        assert len(rec.items) == TOP_K
        assert not {"never-seen-item", "another-unknown"} & {i.item_id for i in rec.items}
    assert (
        sessions_in(kafka_settings)["newcomer"]["interactions"][-1]["item_id"] == "another-unknown"
    )


BAD_RECORDS: list[tuple[str, bytes | None, bytes | None]] = [
    ("malformed_json", b"u1", b"{not json"),
    ("not_an_object", b"u1", b"[1, 2, 3]"),
    (
        "missing_field",
        b"u1",
        b'{"event_id": "b3", "user_id": "u1", "type": "view", "ts": 1700000000000}',
    ),
    (
        "wrong_type",
        b"u1",
        b'{"event_id": "b4", "user_id": "u1", "item_id": 5, "type": "view", "ts": 1700000000000}',
    ),
    (
        "unknown_event_type",
        b"u1",
        b'{"event_id": "b5", "user_id": "u1", "item_id": "i", "type": "like", "ts": 1700000000000}',
    ),
    (
        "bad_timestamp",
        b"u1",
        b'{"event_id": "b6", "user_id": "u1", "item_id": "i", "type": "view", "ts": 1700000000}',
    ),
    (
        "key_mismatch",
        None,
        b'{"event_id": "b7", "user_id": "u1", "item_id": "i", "type": "view", "ts": 1700000000000}',
    ),
    (
        "key_mismatch",
        b"someone-else",
        b'{"event_id": "b8", "user_id": "u1", "item_id": "i", "type": "view", "ts": 1700000000000}',
    ),
    ("too_large", b"u1", b'{"event_id": "b9", "pad": "' + b"x" * 5000 + b'"}'),
    ("malformed_json", b"u1", None),
    ("malformed_json", b"u1", b"\xff\xfe\x00 not utf-8"),
]


def test_bad_records_go_to_the_dead_letter_topic_and_the_flow_goes_on(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    good = movielens[:40]
    mixed: list[Event | tuple[bytes | None, bytes | None]] = []
    for i, (_, key, value) in enumerate(BAD_RECORDS):
        mixed.extend(good[i * 3 : i * 3 + 3])
        mixed.append((key, value))
    mixed.extend(good[len(BAD_RECORDS) * 3 :])
    produce(kafka_settings, mixed)
    flow = FlowProcess(kafka_settings).start()
    collector = RecommendationCollector(kafka_settings)
    try:
        collector.wait_for({e.event_id for e in good}, flow, timeout_s=60)
        letters = dead_letters(kafka_settings, expected=len(BAD_RECORDS))
    finally:
        collector.close()
        flow.stop()

    assert sorted(((d.code, d.key, d.raw) for d in letters), key=repr) == sorted(
        BAD_RECORDS, key=repr
    )
    assert all(d.topic == kafka_settings.events_topic and d.offset >= 0 for d in letters)
    assert all(d.message for d in letters)
    assert len(collector.by_event) == len(good)


def test_a_forget_request_erases_the_session_and_a_later_event_starts_afresh(
    kafka_settings: Settings,
) -> None:
    t = 1_700_000_000_000
    produce(
        kafka_settings,
        [
            Event("f1", "alice", "1", "view", t),
            Event("f2", "alice", "2", "click", t + 1),
            Event("f3", "bob", "1", "view", t + 2),
            ForgetRequest("f4", "alice", t + 3),
            ForgetRequest("f5", "bob", t + 4),
            Event("f6", "alice", "3", "purchase", t + 5),
        ],
    )
    flow = FlowProcess(kafka_settings).start()
    collector = RecommendationCollector(kafka_settings)
    try:
        collector.wait_for({"f1", "f2", "f3", "f6"}, flow, timeout_s=60)
    finally:
        collector.close()
        flow.stop()
    sessions = sessions_in(kafka_settings)
    assert "bob" not in sessions
    assert [i["item_id"] for i in sessions["alice"]["interactions"]] == ["3"]
    assert {"f4", "f5"}.isdisjoint(collector.by_event)


def test_after_kill_9_at_random_points_nothing_is_lost_or_applied_twice(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    events = movielens[:4000]
    wanted = {e.event_id for e in events}
    produce(kafka_settings, events)
    collector = RecommendationCollector(kafka_settings)
    rng = random.Random(7)
    try:
        for kill_at in sorted(rng.uniform(0.1, 0.8) for _ in range(3)):
            flow = FlowProcess(kafka_settings).start()
            deadline = time.monotonic() + 120
            # Short polls: a kill lands a fraction of a second after its point, not a second later.
            while collector.poll(0.1) < kill_at * len(events) and time.monotonic() < deadline:
                assert flow.alive(), flow.output()[-3000:]
            flow.kill()
        flow = FlowProcess(kafka_settings).start()
        collector.wait_for(wanted, flow)
        assert flow.stop() == 0
    finally:
        collector.close()

    assert wanted <= collector.by_event.keys()  # 0 lost
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")
    # Every answer, first or repeated after a kill, comes from the session as of its event.
    seen = history_after(events, kafka_settings)
    for event in events:
        for rec in collector.by_event[event.event_id]:
            assert not {i.item_id for i in rec.items} & set(seen[event.event_id]), (event, rec)


def test_two_processes_give_the_same_sessions_and_recommendations_as_one(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    from streamrec.topics import create_topics

    events = movielens[:1500]
    produce(kafka_settings, events)
    wanted = {e.event_id for e in events}
    # int8 dynamic quantization scales activations per micro-batch, and batches
    # form differently in one and two processes; the fp32 teacher and no online
    # count updates make recommendations a function of the session alone.
    args = ["--variant", "teacher"]
    single = kafka_settings.replace(online_candidates=False)
    flow = FlowProcess(single, args).start()
    one = RecommendationCollector(single)
    try:
        one.wait_for(wanted, flow)
    finally:
        one.close()
        flow.stop()

    # Its own state from scratch: its own changelog too (else it would be rebuilt from the first).
    pair = single.replace(
        recommendations_topic=single.recommendations_topic + "-pair",
        changelog_topic=single.sessions_changelog + "-pair",
        state_dir=tmp_path / "pair-state",
        recovery_dir=tmp_path / "pair-recovery",
    )
    create_topics(pair)
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    flows = [FlowProcess(pair, [*args, "-i", str(i), "-a", addresses]).start() for i in (0, 1)]
    two = RecommendationCollector(pair)
    try:
        two.wait_for(wanted, flows)
    finally:
        two.close()
        stop_all(flows)

    # One worker per process: each uses the model loaded at start, and only that one (Bytewax
    # runs cluster workers on threads whose Python thread state is made anew for each call).
    assert not any("loaded its own copy of the model" in flow.output() for flow in flows)
    assert sessions_in(pair) == sessions_in(single)
    for event_id in wanted:
        a, b = one.by_event[event_id][0], two.by_event[event_id][0]
        scores_a = {i.item_id: i.score for i in a.items}
        scores_b = {i.item_id: i.score for i in b.items}
        assert scores_a == pytest.approx(scores_b, abs=1e-4)


def test_more_workers_on_existing_state_carry_on_from_it(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    first, second = movielens[:500], movielens[500:1000]
    produce(kafka_settings, first)
    flow = FlowProcess(kafka_settings).start()
    collector = RecommendationCollector(kafka_settings)
    try:
        collector.wait_for({e.event_id for e in first}, flow)
        flow.stop()
        produce(kafka_settings, second)
        flow = FlowProcess(kafka_settings, ["-w", "2"]).start()
        collector.wait_for({e.event_id for e in first + second}, flow)
        flow.stop()
        assert flow.output().count("loaded its own copy of the model") <= 1  # the second worker
    finally:
        collector.close()
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")


def test_a_topic_with_another_partition_count_than_the_state_is_refused(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    from streamrec.topics import create_topics

    produce(kafka_settings, movielens[:10])
    flow = FlowProcess(kafka_settings).start()
    collector = RecommendationCollector(kafka_settings)
    try:
        collector.wait_for({e.event_id for e in movielens[:10]}, flow, timeout_s=60)
    finally:
        collector.close()
        flow.stop()
    wider = kafka_settings.replace(events_topic=kafka_settings.events_topic + "-wide")
    create_topics(wider, partitions=3)
    refused = FlowProcess(wider).start()
    assert refused.process is not None
    assert refused.process.wait(60) != 0
    output = refused.output()
    assert "2" in output and "3" in output and "partition" in output, output[-2000:]


def test_no_recommendation_names_an_item_the_user_rated_within_the_ttl(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    # A short window: most of what a user rated has left it, only the consumed record holds it.
    settings = kafka_settings.replace(session_length=5)
    events = movielens[:3000]
    produce(settings, events)
    flow, collector = serve_until_answered(settings, {e.event_id for e in events})

    rated: dict[str, set[str]] = {}
    last_ts: dict[str, int] = {}
    beyond_window = 0
    for event in events:
        if event.ts - last_ts.get(event.user_id, event.ts) > settings.session_ttl_s * 1000:
            rated[event.user_id] = set()
        last_ts[event.user_id] = event.ts
        mine = rated.setdefault(event.user_id, set())
        mine.add(event.item_id)
        (rec,) = collector.by_event[event.event_id]
        named = {i.item_id for i in rec.items}
        assert not named & mine, (event, named & mine)
        assert len(rec.items) == TOP_K
        beyond_window += len(mine) > settings.session_length
    assert beyond_window > len(events) // 2  # the window alone would not have covered them
