"""Asynchronous output: a resume point never passes an output Kafka has not acknowledged.

A pure unit test: a stand-in producer holds every delivery report until the
test lets Kafka answer, in whatever order it chooses.  The real broker is
exercised by test_flow.py (SIGKILLs) and test_flow_output.py (outage, limits).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec.contracts import DeadLetter
from streamrec.flows import output
from streamrec.flows.guarantee import acked_sink as sink
from streamrec.flows.guarantee.acked_sink import OutputSink
from streamrec.flows.output import OffsetMark, OutputRecord
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.settings import Settings

SETTINGS = Settings(recommendations_topic="recs", dlq_topic="dlq")
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
TIMED_OUT = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")
FATAL = KafkaError(KafkaError._FATAL, "the idempotent producer cannot go on", fatal=True)


class HeldProducer:
    """Queues records; their reports come only when the test answers for them.

    A record is known by its position among everything this producer was given.
    """

    made: list[HeldProducer] = []

    def __init__(self, _config: dict[str, Any]) -> None:
        self.queued: dict[int, tuple[OutputRecord, Any]] = {}
        self.given = 0
        self.answers: dict[int, KafkaError | None] = {}  # position -> its report
        self.sent: list[OutputRecord] = []
        HeldProducer.made.append(self)

    def produce(self, topic: str, value: Any, key: Any, headers: Any, on_delivery: Any) -> None:
        self.queued[self.given] = ((topic, key, value, headers), on_delivery)
        self.given += 1

    def in_flight(self) -> list[OutputRecord]:
        return [record for record, _ in self.queued.values()]

    def answer(self, position: int, error: KafkaError | None = None) -> None:
        self.answers[position] = error

    def poll(self, _timeout: float) -> int:
        answers, self.answers = self.answers, {}
        for position, error in sorted(answers.items()):
            record, report = self.queued.pop(position)
            if error is None:
                self.sent.append(record)
            report(error, None)
        return len(answers)

    def purge(self) -> None:
        for position in self.queued:
            self.answers[position] = KafkaError(KafkaError._PURGE_QUEUE, "purged")

    def flush(self, _timeout: float) -> int:
        return len(self.queued)

    def __len__(self) -> int:
        return len(self.queued)


@pytest.fixture
def workers() -> Workers:
    return Workers.of(SETTINGS)


@pytest.fixture
def worker(workers: Workers) -> WorkerContext:
    """The worker the sink writes for (this test's thread); reading resumed at offset 100."""
    worker = workers.current()
    worker.delivered[0] = 100
    return worker


@pytest.fixture
def writer(monkeypatch: pytest.MonkeyPatch, workers: Workers, worker: WorkerContext) -> Any:
    HeldProducer.made = []
    monkeypatch.setattr(sink, "Producer", HeldProducer)
    monkeypatch.setattr(sink, "POLL_S", 0.0)  # no waiting between rounds in a unit test
    monkeypatch.setattr(
        sink, "output_limits", lambda settings: {"recs": 1_000_000, "dlq": 1_000_000}
    )
    return OutputSink(SETTINGS, workers).build("out", 0, 1)


def rec(n: int) -> OutputRecord:
    return ("recs", f"u{n}".encode(), f"answer {n}".encode(), None)


def test_a_mark_is_released_once_its_batch_and_every_batch_before_it_are_acknowledged(
    writer: Any, worker: WorkerContext
) -> None:
    writer.write_batch([rec(1), rec(2), OffsetMark(0, 110)])
    writer.write_batch([rec(3), OffsetMark(0, 120)])
    kafka = HeldProducer.made[0]
    assert worker.delivered_through(0, 120) == 100  # nothing acknowledged: resume where we began

    kafka.answer(2)  # the second batch first: its mark still waits for the first
    worker.take_reports()
    assert worker.delivered_through(0, 120) == 100
    kafka.answer(0)
    worker.take_reports()
    assert worker.delivered_through(0, 120) == 100  # one record of the first batch is in flight
    kafka.answer(1)
    worker.take_reports()
    assert worker.delivered_through(0, 120) == 120
    assert worker.delivered_through(0, 115) == 115  # never past what was read


def test_a_batch_of_marks_alone_releases_them_at_once(writer: Any, worker: WorkerContext) -> None:
    writer.write_batch([OffsetMark(0, 105)])
    assert worker.delivered[0] == 105


def test_a_record_that_timed_out_is_sent_again_and_its_mark_waits_for_it(
    writer: Any, worker: WorkerContext
) -> None:
    writer.write_batch([rec(1), OffsetMark(0, 110)])
    kafka = HeldProducer.made[0]
    kafka.answer(0, TIMED_OUT)
    worker.take_reports()
    assert worker.delivered[0] == 100
    assert kafka.in_flight() == [rec(1)]  # queued again
    kafka.answer(1)
    worker.take_reports()
    assert kafka.sent == [rec(1)]
    assert worker.delivered[0] == 110


def test_a_refused_recommendation_becomes_a_dead_letter_and_its_mark_waits_for_that(
    writer: Any, worker: WorkerContext
) -> None:
    writer.write_batch([rec(1), rec(2), OffsetMark(0, 110)])
    kafka = HeldProducer.made[0]
    kafka.answer(0, TOO_LARGE)
    kafka.answer(1)
    worker.take_reports()
    assert worker.delivered[0] == 100
    [(topic, key, value, headers)] = kafka.in_flight()
    letter = DeadLetter.from_record(key, value, headers)
    assert (topic, letter.key, letter.raw) == ("dlq", b"u1", b"answer 1")
    assert letter.topic == "recs" and "Message size too large" in letter.message
    kafka.answer(2)
    worker.take_reports()
    assert worker.delivered[0] == 110


def test_a_dead_letter_refused_too_is_stubbed_with_the_headers_it_had(
    writer: Any, worker: WorkerContext
) -> None:
    headers = [("streamrec.error.code", b"too_large"), ("streamrec.source.offset", b"7")]
    writer.write_batch([("dlq", b"u1", b"x" * 5000, headers), OffsetMark(0, 101)])
    kafka = HeldProducer.made[0]
    kafka.answer(0, TOO_LARGE)
    worker.take_reports()
    [(topic, _key, value, stub_headers)] = kafka.in_flight()
    names = [name for name, _ in stub_headers or []]
    assert topic == "dlq" and value is None
    assert names[:2] == ["streamrec.error.code", "streamrec.source.offset"]
    assert "streamrec.stub.reason" in names


def test_a_fatal_producer_error_brings_a_new_producer_that_sends_what_was_unconfirmed(
    writer: Any, worker: WorkerContext
) -> None:
    writer.write_batch([rec(1), rec(2), OffsetMark(0, 110)])
    first = HeldProducer.made[0]
    first.answer(0)
    first.answer(1, FATAL)
    worker.take_reports()
    worker.take_reports()  # the next round replaces the producer and sends again
    second = HeldProducer.made[1]
    assert second.in_flight() == [rec(2)]
    second.answer(0)
    worker.take_reports()
    assert worker.delivered[0] == 110


def test_a_record_the_producer_refuses_at_once_is_dead_lettered_before_write_batch_returns(
    monkeypatch: pytest.MonkeyPatch, writer: Any, worker: WorkerContext
) -> None:
    kafka = HeldProducer.made[0]
    refuse_first = iter([True])

    def produce(topic: str, value: Any, key: Any, headers: Any, on_delivery: Any) -> None:
        if topic == "recs" and next(refuse_first, False):
            raise KafkaException(TOO_LARGE)
        HeldProducer.produce(kafka, topic, value, key, headers, on_delivery)

    monkeypatch.setattr(kafka, "produce", produce)
    writer.write_batch([rec(1), OffsetMark(0, 110)])
    assert [record[0] for record in kafka.in_flight()] == ["dlq"]
    kafka.answer(0)
    worker.take_reports()
    assert worker.delivered[0] == 110


def test_close_returns_only_once_everything_is_delivered(
    monkeypatch: pytest.MonkeyPatch, writer: Any, worker: WorkerContext
) -> None:
    writer.write_batch([rec(1), OffsetMark(0, 110)])
    kafka = HeldProducer.made[0]
    polls = 0
    original_poll = kafka.poll

    def poll(timeout: float) -> int:
        nonlocal polls
        polls += 1
        if polls == 3:
            kafka.answer(0)
        return original_poll(timeout)

    monkeypatch.setattr(kafka, "poll", poll)
    writer.close()
    assert polls >= 3 and kafka.sent == [rec(1)] and worker.delivered[0] == 110


def test_blocked_output_is_said_once_and_its_end_too_while_traffic_goes_on(
    monkeypatch: pytest.MonkeyPatch,
    writer: Any,
    caplog: pytest.LogCaptureFixture,
    worker: WorkerContext,
) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.flows.output")
    now = [1_000.0]
    clock = SimpleNamespace(monotonic=lambda: now[0], sleep=lambda _: 0)
    monkeypatch.setattr(sink, "time", clock)
    monkeypatch.setattr(output, "time", clock)
    kafka = HeldProducer.made[0]
    writer.write_batch([rec(1), OffsetMark(0, 110)])
    now[0] += output.BLOCKED_AFTER_S + 1  # Kafka away
    worker.take_reports()
    worker.take_reports()
    writer.write_batch([rec(2), OffsetMark(0, 120)])  # traffic goes on meanwhile
    kafka.answer(0)  # Kafka back: the first batch is acknowledged, the second is in flight
    worker.take_reports()
    said = caplog.text
    assert said.count("output blocked") == 1 and "output resumed after" in said
    assert worker.delivered[0] == 110
