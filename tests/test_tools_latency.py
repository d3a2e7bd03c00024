"""`streamrec latency`: each recommendation matched to its event, latency split into stages."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from streamrec.contracts import Event, Recommendation
from streamrec.kafka_clients import producer_config
from streamrec.settings import Settings
from tools.latency import LatencyCollector, LatencyMatcher, latency_command

HDR_PRECISION = 0.001  # three significant digits


def recommendation(event_id: str, received_ms: float, emitted_ms: float) -> Recommendation:
    return Recommendation(event_id, "u1", [], "test-model", 0, received_ms, emitted_ms)


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
    # Every record crossed Kafka in the same burst, so each measured figure is its
    # known delay plus one common transit time (a few ms; more on a busy machine).
    transits = [p.p50 - 100.0, p.p90 - 300.0, p.p99 - 1000.0]
    assert all(-1.0 <= transit < 500.0 for transit in transits)
    assert max(transits) - min(transits) <= 20.0
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
    assert (tmp_path / "lat-cdf.png").stat().st_size > 0
    assert (tmp_path / "lat-over-time.png").stat().st_size > 0
