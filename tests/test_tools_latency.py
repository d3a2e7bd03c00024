"""`streamrec latency`: each recommendation matched to its event, latency split into stages."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from streamrec.contracts import Event, Recommendation, ScoredItem
from streamrec.kafka_clients import producer_config
from streamrec.settings import Settings
from streamrec.tools.latency import (
    EventFields,
    LatencyCollector,
    LatencyMatcher,
    latency_command,
    read_event,
)

HDR_PRECISION = 0.001  # three significant digits
STUDENT = "student_int8_dynamic@542c3987"
TEACHER = "teacher@0b1d2e3f"


def recommendation(event_id: str, received_ms: float, emitted_ms: float) -> Recommendation:
    return Recommendation(event_id, "u1", [], "test-model", 0, received_ms, emitted_ms)


def answer(
    event_id: str, user_id: str, items: list[str], model: str = STUDENT, processing_ms: float = 1.0
) -> Recommendation:
    """A recommendation of ``items`` by ``model``, for an event stamped at 1000 ms."""
    scored = [ScoredItem(item, 1.0 / (rank + 1)) for rank, item in enumerate(items)]
    return Recommendation(event_id, user_id, scored, model, 0, 1_000.0, 1_000.0 + processing_ms)


def event(matcher: LatencyMatcher, event_id: str, user_id: str, item_id: str) -> None:
    matcher.on_event(event_id, 1_000.0, user_id=user_id, item_id=item_id)


def recommend(matcher: LatencyMatcher, rec: Recommendation) -> None:
    matcher.on_recommendation(rec, receipt_ms=1_010.0)


def judged(matcher: LatencyMatcher, model: str) -> tuple[int, int]:
    """(hits, events judged) credited to ``model``."""
    stats = matcher.stats.per_model[model]
    return stats.hits, stats.judged


def test_percentiles_of_known_latencies_come_out_right() -> None:
    matcher = LatencyMatcher()
    for i in range(1, 1001):  # latencies of 1, 2, ..., 1000 ms
        matcher.on_event(f"e{i}", kafka_ts_ms=10_000)
        matcher.on_recommendation(recommendation(f"e{i}", 10_000, 10_000), 10_000 + i)

    p = matcher.stats.total.percentiles()

    for measured, exact in [
        (p.p50, 500),
        (p.p90, 900),
        (p.p99, 990),
        (p.p99_9, 999),
        (p.max, 1000),
    ]:
        assert measured == pytest.approx(exact, rel=HDR_PRECISION)
    assert p.mean == pytest.approx(500.5, rel=HDR_PRECISION)


def test_latency_is_split_into_queueing_processing_and_output() -> None:
    matcher = LatencyMatcher()
    matcher.on_event("e1", kafka_ts_ms=1_000)
    matcher.on_recommendation(recommendation("e1", received_ms=1_004, emitted_ms=1_010), 1_013)

    s = matcher.stats
    assert s.total.percentiles().p50 == pytest.approx(13.0, rel=HDR_PRECISION)
    assert s.queueing.percentiles().p50 == pytest.approx(4.0, rel=HDR_PRECISION)
    assert s.processing.percentiles().p50 == pytest.approx(6.0, rel=HDR_PRECISION)
    assert s.output.percentiles().p50 == pytest.approx(3.0, rel=HDR_PRECISION)


def test_a_duplicated_recommendation_counts_once() -> None:
    matcher = LatencyMatcher()
    matcher.on_event("e1", kafka_ts_ms=1_000)
    matcher.on_recommendation(recommendation("e1", 1_001, 1_002), 1_005)
    matcher.on_recommendation(recommendation("e1", 1_001, 1_002), 1_900)  # replay after a crash

    assert matcher.stats.matched == 1
    assert matcher.stats.duplicates == 1
    assert matcher.stats.total.percentiles().max == pytest.approx(5.0, rel=HDR_PRECISION)


def test_a_recommendation_read_before_its_event_is_matched_when_the_event_arrives() -> None:
    matcher = LatencyMatcher()
    matcher.on_recommendation(recommendation("e1", 1_001, 1_002), receipt_ms=1_007)
    assert matcher.orphans == 1

    matcher.on_event("e1", kafka_ts_ms=1_000)

    assert (matcher.stats.matched, matcher.orphans) == (1, 0)
    assert matcher.stats.total.percentiles().p50 == pytest.approx(7.0, rel=HDR_PRECISION)


def test_events_without_recommendation_are_reported_missing() -> None:
    matcher = LatencyMatcher()
    matcher.on_event("e1", kafka_ts_ms=1_000)
    matcher.on_event("e2", kafka_ts_ms=1_000)
    matcher.on_recommendation(recommendation("e1", 1_001, 1_002), 1_003)
    assert matcher.missing == 1


def test_throughput_is_the_rate_of_receipts_whatever_the_latency() -> None:
    matcher = LatencyMatcher()
    for i in range(101):  # one event every 10 ms, each answered 300 ms later
        matcher.on_event(f"e{i}", kafka_ts_ms=10 * i)
        matcher.on_recommendation(recommendation(f"e{i}", 10 * i, 10 * i), 10 * i + 300)
    assert matcher.stats.throughput_per_s == pytest.approx(100.0)


def test_next_item_among_the_previous_recommendation_is_a_hit_for_the_model_that_made_it() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i2", "i3"]))
    event(matcher, "e2", "u1", "i3")  # i3 was recommended on e1
    recommend(matcher, answer("e2", "u1", ["i4", "i5"]))
    event(matcher, "e3", "u1", "i9")  # i9 was not recommended on e2

    assert judged(matcher, STUDENT) == (1, 2)
    assert matcher.stats.per_model[STUDENT].hit_rate == pytest.approx(0.5)


def test_interleaved_users_are_each_judged_against_their_own_previous_recommendation() -> None:
    matcher = LatencyMatcher()
    event(matcher, "u1-e1", "u1", "i1")
    event(matcher, "u2-e1", "u2", "i1")
    recommend(matcher, answer("u1-e1", "u1", ["i2"], STUDENT))
    recommend(matcher, answer("u2-e1", "u2", ["i3"], TEACHER))
    event(matcher, "u1-e2", "u1", "i2")  # in the student's answer to u1, not the teacher's to u2
    event(matcher, "u2-e2", "u2", "i2")  # not in the teacher's answer to u2

    assert judged(matcher, STUDENT) == (1, 1)
    assert judged(matcher, TEACHER) == (0, 1)


def test_the_model_that_recommended_is_credited_not_the_one_that_answers_next() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i2"], TEACHER))
    event(matcher, "e2", "u1", "i2")  # a hit for the teacher's recommendation on e1...
    recommend(matcher, answer("e2", "u1", ["i3"], STUDENT))  # ...though a new model answers e2
    event(matcher, "e3", "u1", "i9")
    event(matcher, "e4", "u1", "i3")  # e3's answer arrives after e4, from the teacher again
    recommend(matcher, answer("e3", "u1", ["i3"], TEACHER))

    assert judged(matcher, TEACHER) == (2, 2)
    assert judged(matcher, STUDENT) == (0, 1)


def test_a_users_first_event_is_not_judged() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i1"]))
    event(matcher, "e2", "u2", "i1")  # another user's first event, though its item was recommended

    assert judged(matcher, STUDENT) == (0, 0)
    assert matcher.stats.per_model[STUDENT].hit_rate is None
    assert matcher.summary()["online_hit_rate"]["rate"] is None


def test_a_recommendation_arriving_after_the_next_event_is_judged_when_it_arrives() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    event(matcher, "e2", "u1", "i3")  # before the answer to e1
    event(matcher, "e3", "u1", "i7")  # and before the answer to e2
    assert STUDENT not in matcher.stats.per_model  # nothing answered, nothing judged
    assert matcher.hit_rate.awaiting == 2

    recommend(matcher, answer("e2", "u1", ["i6"]))  # e3's item i7 is not in it: a miss
    recommend(matcher, answer("e1", "u1", ["i2", "i3"]))  # e2's item i3 is in it: a hit

    assert judged(matcher, STUDENT) == (1, 2)
    assert matcher.hit_rate.awaiting == 0


def test_a_recommendation_read_before_its_event_still_answers_that_event() -> None:
    matcher = LatencyMatcher()
    recommend(matcher, answer("e1", "u1", ["i3"]))  # its event is not read yet
    event(matcher, "e1", "u1", "i1")
    event(matcher, "e2", "u1", "i3")

    assert judged(matcher, STUDENT) == (1, 1)


def test_an_event_whose_previous_event_got_no_recommendation_is_not_judged() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i2"]))
    event(matcher, "e2", "u1", "i2")  # judged against e1's answer: a hit
    event(matcher, "e3", "u1", "i2")  # e2 never gets an answer: not judged

    assert judged(matcher, STUDENT) == (1, 1)
    assert matcher.hit_rate.awaiting == 1


def test_two_models_are_credited_and_timed_side_by_side() -> None:
    matcher = LatencyMatcher()
    # u1 is served by the student (1 ms of processing), u2 by the teacher (9 ms).
    for user, model, ms in (("u1", STUDENT, 1.0), ("u2", TEACHER, 9.0)):
        event(matcher, f"{user}-e1", user, "i1")
        recommend(matcher, answer(f"{user}-e1", user, ["i2"], model, processing_ms=ms))
        event(matcher, f"{user}-e2", user, "i2")  # both hit
        recommend(matcher, answer(f"{user}-e2", user, ["i3"], model, processing_ms=ms))
    event(matcher, "u2-e3", "u2", "i9")  # the teacher misses once

    assert judged(matcher, STUDENT) == (1, 1)
    assert judged(matcher, TEACHER) == (1, 2)
    per_model = matcher.stats.per_model
    student = matcher.stats.latency_of(per_model[STUDENT])
    teacher = matcher.stats.latency_of(per_model[TEACHER])
    assert (per_model[STUDENT].matched, per_model[TEACHER].matched) == (2, 2)
    assert student.processing.percentiles().max == pytest.approx(1.0, rel=HDR_PRECISION)
    assert teacher.processing.percentiles().max == pytest.approx(9.0, rel=HDR_PRECISION)
    assert (per_model[STUDENT].variant, per_model[TEACHER].variant) == (
        "student_int8_dynamic",
        "teacher",
    )


def test_a_models_latency_includes_what_it_answered_before_a_second_model_appeared() -> None:
    matcher = LatencyMatcher()
    for i, ms in enumerate([1.0, 2.0, 3.0]):
        event(matcher, f"s{i}", "u1", "i1")
        recommend(matcher, answer(f"s{i}", "u1", [], STUDENT, processing_ms=ms))
    event(matcher, "t0", "u2", "i1")
    recommend(matcher, answer("t0", "u2", [], TEACHER, processing_ms=50.0))
    event(matcher, "s3", "u1", "i1")
    recommend(matcher, answer("s3", "u1", [], STUDENT, processing_ms=4.0))

    stats = matcher.stats
    student = stats.latency_of(stats.per_model[STUDENT]).processing
    teacher = stats.latency_of(stats.per_model[TEACHER]).processing
    assert (student.count, teacher.count, stats.processing.count) == (4, 1, 5)
    assert student.percentiles().max == pytest.approx(4.0, rel=HDR_PRECISION)
    assert teacher.percentiles().max == pytest.approx(50.0, rel=HDR_PRECISION)


def test_with_one_model_its_figures_are_the_overall_figures() -> None:
    matcher = LatencyMatcher()
    for i in range(1, 101):
        event(matcher, f"e{i}", "u1", "i1")
        recommend(matcher, answer(f"e{i}", "u1", [], processing_ms=float(i)))

    summary = matcher.summary()
    (only,) = summary["per_model"].values()
    assert only["matched"] == summary["matched"] == 100
    assert only["latency_ms"] == summary["latency_ms"]
    assert only["stages_ms"] == summary["stages_ms"]


def test_a_duplicated_event_does_not_advance_the_users_events() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i2"]))
    event(matcher, "e1", "u1", "i1")  # produced twice: not the user's next event
    event(matcher, "e2", "u1", "i2")

    assert judged(matcher, STUDENT) == (1, 1)


def test_a_forget_request_starts_the_user_afresh() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i2"]))
    matcher.on_event("f1", 1_000.0)
    matcher.on_forget("u1")
    event(matcher, "e2", "u1", "i2")  # the first event of a fresh session

    assert judged(matcher, STUDENT) == (0, 0)


def test_events_without_user_and_item_are_timed_but_not_judged() -> None:
    matcher = LatencyMatcher()
    event(matcher, "e1", "u1", "i1")
    recommend(matcher, answer("e1", "u1", ["i2"]))
    matcher.on_event("e2", 1_000.0)  # no ids: not the user's next event
    recommend(matcher, answer("e2", "u1", []))
    event(matcher, "e3", "u1", "i2")

    assert matcher.stats.matched == 2
    assert judged(matcher, STUDENT) == (1, 1)


def test_summary_has_a_per_model_section_with_latency_and_hit_rate() -> None:
    matcher = LatencyMatcher()
    for user, model in (("u1", STUDENT), ("u2", TEACHER)):
        event(matcher, f"{user}-e1", user, "i1")
        recommend(matcher, answer(f"{user}-e1", user, ["i2", "i3"], model))
        event(matcher, f"{user}-e2", user, "i2" if model == STUDENT else "i9")

    figures = orjson.loads(orjson.dumps(matcher.summary()))  # as --json writes it

    student, teacher = figures["per_model"][STUDENT], figures["per_model"][TEACHER]
    assert student["variant"] == "student_int8_dynamic"
    assert student["hit_rate"] == {"hits": 1, "judged": 1, "rate": 1.0}
    assert teacher["hit_rate"] == {"hits": 0, "judged": 1, "rate": 0.0}
    assert (student["matched"], student["top_k"]) == (1, 2)
    assert set(student["latency_ms"]) >= {"p50", "p90", "p99"}
    assert set(teacher["stages_ms"]) == {"queueing", "processing", "output"}
    assert figures["online_hit_rate"] == {"hits": 1, "judged": 2, "rate": 0.5, "awaiting": 0}


def test_the_text_report_has_one_row_per_model() -> None:
    matcher = LatencyMatcher()
    for user, model in (("u1", STUDENT), ("u2", TEACHER)):
        event(matcher, f"{user}-e1", user, "i1")
        recommend(matcher, answer(f"{user}-e1", user, ["i2"], model))
        event(matcher, f"{user}-e2", user, "i2" if model == STUDENT else "i9")

    rows = {line.split()[0]: line.split() for line in matcher.describe().splitlines()}

    assert rows[STUDENT][1] == "student_int8_dynamic"
    assert " ".join(rows[STUDENT][-4:]) == "100.0% (1 of 1)"
    assert rows[TEACHER][1] == "teacher"
    assert " ".join(rows[TEACHER][-4:]) == "0.0% (0 of 1)"


def test_read_event_takes_the_ids_the_hit_rate_needs() -> None:
    view = Event("e1", "u1", "i9", "view", 1_700_000_000_000).to_json()
    assert read_event(view) == EventFields("e1", "u1", "i9")
    forget = b'{"event_id":"f1","user_id":"u1","type":"forget","ts":1700000000000}'
    assert read_event(forget) == EventFields("f1", "u1", forget=True)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'"e1"', b'{"user_id":"u1","item_id":"i1","type":"view"}'],
)
def test_read_event_refuses_a_record_without_event_id(raw: bytes) -> None:
    assert read_event(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id":"e1","item_id":"i1","type":"view"}',
        b'{"event_id":"e1","user_id":"u1","type":"view"}',
        b'{"event_id":"e1","user_id":7,"item_id":"i1","type":"view"}',
        b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"teleport"}',
    ],
)
def test_read_event_keeps_an_invalid_event_out_of_the_hit_rate(raw: bytes) -> None:
    assert read_event(raw) == EventFields("e1")


def test_help_explains_the_online_hit_rate() -> None:
    result = CliRunner().invoke(latency_command, ["--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "online hit rate" in text
    assert "recommended on that user's previous event" in text


def _send_events_and_answers(settings: Settings, delays_ms: list[float]) -> None:
    """Events stamped ``delay`` ms in the past, each answered at once: latency = delay (+ Kafka)."""
    producer = Producer(producer_config(settings))
    # Warm the producer (connection, producer id, both topics' leaders) so that no
    # start-up wait adds to the known delays.
    producer.produce(settings.dlq_topic, b"warm-up")
    producer.flush(10)
    for topic in (settings.events_topic, settings.recommendations_topic):
        producer.list_topics(topic, timeout=10)
    now_ms = round(time.time() * 1000)  # whole ms, as Kafka timestamps are
    for i, delay in enumerate(delays_ms):
        event = Event(f"synthetic-{i}", f"u{i % 7}", "i1", "view", 1_700_000_000_000)
        stamp = round(now_ms - delay)
        producer.produce(settings.events_topic, event.to_json(), event.key, timestamp=stamp)
        answer = recommendation(event.event_id, received_ms=stamp + delay / 2, emitted_ms=now_ms)
        producer.produce(settings.recommendations_topic, answer.to_json(), event.key)
    producer.flush(10)


@pytest.mark.kafka
def test_latency_of_a_synthetic_run_with_known_delays_comes_out_right(
    kafka_settings: Settings,
) -> None:
    collector = LatencyCollector(kafka_settings)
    collector.settle()
    delays = [100.0] * 50 + [300.0] * 45 + [1000.0] * 5  # p50 100, p90 300, p99 1000
    _send_events_and_answers(kafka_settings, delays)

    deadline = time.monotonic() + 30
    matcher = collector.run(lambda m: m.stats.matched >= len(delays) or time.monotonic() > deadline)
    collector.close()

    assert matcher.stats.matched == len(delays)
    p = matcher.stats.total.percentiles()
    # Each measured figure is its known delay plus the time the record took through Kafka
    # (a few ms; more on a busy machine, so no upper bound is asserted), never less.
    transits = [p.p50 - 100.0, p.p90 - 300.0, p.p99 - 1000.0]
    assert all(transit >= -1.0 for transit in transits)
    assert p.p50 < p.p90 < p.p99
    # The flow's stamps split each delay in two halves, exactly.
    queueing, processing = matcher.stats.queueing, matcher.stats.processing
    assert queueing.percentiles().p50 == pytest.approx(50.0, rel=HDR_PRECISION)
    assert processing.percentiles().p99 == pytest.approx(500.0, rel=HDR_PRECISION)


@pytest.mark.kafka
def test_latency_command_reports_json_and_plots(kafka_settings: Settings, tmp_path: Path) -> None:
    env = {
        "STREAMREC_BROKERS": kafka_settings.brokers,
        "STREAMREC_EVENTS_TOPIC": kafka_settings.events_topic,
        "STREAMREC_RECOMMENDATIONS_TOPIC": kafka_settings.recommendations_topic,
    }
    # The command starts reading at the end of both topics: send once it listens.
    sender = threading.Timer(3.0, _send_events_and_answers, (kafka_settings, [20.0] * 30))
    sender.start()
    result = CliRunner().invoke(
        latency_command,
        ["--count", "30", "--duration", "20", "--json", str(tmp_path / "lat.json")],
        env=env,
    )
    sender.join()

    assert result.exit_code == 0, result.output
    assert "matched 30 recommendation(s)" in result.output
    figures = orjson.loads((tmp_path / "lat.json").read_bytes())
    assert figures["matched"] == 30
    assert set(figures["latency_ms"]) >= {"p50", "p90", "p99", "p99_9", "max"}
    assert set(figures["stages_ms"]) == {"queueing", "processing", "output"}
    assert figures["per_model"]["test-model"]["matched"] == 30
    # 30 events of 7 users: each user's first is not judged, the rest all miss (no items).
    # Every event but each user's first is judged, or still awaits the previous answer when
    # the command stops at its count (the two topics are read side by side).
    online = figures["online_hit_rate"]
    assert online["hits"] == 0 and online["judged"] + online["awaiting"] == 23
    assert (tmp_path / "lat-cdf.png").stat().st_size > 0
    assert (tmp_path / "lat-over-time.png").stat().st_size > 0
