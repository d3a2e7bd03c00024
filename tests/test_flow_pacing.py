"""Micro-batches: an idle worker hands every record over at once, a busy one fills batches.

A pure unit test: a stand-in consumer hands out the records the test gives it,
and the pacer's clock is the test's.  The flows against the real broker
(test_flow*.py) run with pacing on, as every flow does.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from streamrec.flows.pacing import BUSY_ABOVE, IDLE_BELOW, WINDOW_S, Pacer
from streamrec.flows.source import WorkerConsumer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ArrivingRecords:
    """Stands in for librdkafka's consumer: records arrive when the test says."""

    def __init__(self) -> None:
        self.queue: list[Any] = []
        self.offsets: dict[int, int] = {}

    def arrive(self, partition: int, count: int = 1) -> None:
        for _ in range(count):
            offset = self.offsets.get(partition, 0)
            self.offsets[partition] = offset + 1
            self.queue.append(
                SimpleNamespace(
                    partition=lambda p=partition: p,
                    offset=lambda o=offset: o,
                    error=lambda: None,
                )
            )

    def consume(self, count: int, _timeout: float) -> list[Any]:
        taken, self.queue = self.queue[:count], self.queue[count:]
        return taken

    def incremental_assign(self, _partitions: list[Any]) -> None:
        pass

    def close(self) -> None:
        pass


def busy_pacer(clock: Clock, fill: int = 8, linger_s: float = 0.003) -> Pacer:
    pacer = Pacer(fill, linger_s, clock=clock)
    work(pacer, clock, share=0.9)
    assert pacer.busy
    return pacer


def work(pacer: Pacer, clock: Clock, share: float, seconds: float = 2 * WINDOW_S) -> None:
    """The worker spends ``share`` of ``seconds`` processing, in 10 ms rounds."""
    for _ in range(round(seconds / 0.01)):
        pacer.worked(clock.now, clock.now + 0.01 * share)
        clock.now += 0.01


def reader(pacer: Pacer, partitions: int = 1) -> tuple[WorkerConsumer, ArrivingRecords]:
    kafka = ArrivingRecords()
    consumer = WorkerConsumer(kafka, pacer)  # type: ignore[arg-type]
    for partition in range(partitions):
        consumer.add("events", partition, -2)  # OFFSET_BEGINNING: no watermark check
    return consumer, kafka


def offsets(records: list[Any]) -> list[tuple[int, int]]:
    return [(r.partition(), r.offset()) for r in records]


def test_an_idle_worker_hands_each_record_over_as_it_comes() -> None:
    clock = Clock()
    consumer, kafka = reader(Pacer(fill=8, linger_s=0.003, clock=clock))
    kafka.arrive(0)
    assert offsets(consumer.take(0, 32)) == [(0, 0)]


def test_a_busy_worker_lets_records_wait_for_a_fuller_batch() -> None:
    clock = Clock()
    consumer, kafka = reader(busy_pacer(clock, fill=8))
    kafka.arrive(0, 3)
    assert consumer.take(0, 32) == []  # waits for more
    clock.now += 0.001
    kafka.arrive(0, 5)
    assert offsets(consumer.take(0, 32)) == [(0, o) for o in range(8)]  # full: all, in order


def test_no_record_waits_longer_than_the_linger() -> None:
    clock = Clock()
    consumer, kafka = reader(busy_pacer(clock, fill=8, linger_s=0.003))
    kafka.arrive(0, 2)
    assert consumer.take(0, 32) == []
    clock.now += 0.002
    kafka.arrive(0)
    assert consumer.take(0, 32) == []  # the oldest has waited 2 ms
    clock.now += 0.001
    assert offsets(consumer.take(0, 32)) == [(0, 0), (0, 1), (0, 2)]


def test_a_released_batch_is_handed_over_by_every_partition_in_the_same_round() -> None:
    clock = Clock()
    consumer, kafka = reader(busy_pacer(clock, fill=6), partitions=3)
    kafka.arrive(0, 2)
    kafka.arrive(2, 2)
    assert consumer.take(0, 32) == []
    assert consumer.take(1, 32) == []
    kafka.arrive(1, 2)
    assert offsets(consumer.take(2, 32)) == [(2, 0), (2, 1)]  # 6 buffered: released
    assert offsets(consumer.take(0, 32)) == [(0, 0), (0, 1)]  # ... for every partition
    assert offsets(consumer.take(1, 32)) == [(1, 0), (1, 1)]
    kafka.arrive(0)
    assert consumer.take(0, 32) == []  # all handed over: the next batch fills again


def test_a_backlog_is_handed_over_a_read_at_a_time() -> None:
    clock = Clock()
    consumer, kafka = reader(busy_pacer(clock, fill=4, linger_s=0.003))
    kafka.arrive(0, 9)
    assert [len(consumer.take(0, 4)) for _ in range(3)] == [4, 4, 0]  # the last one waits
    clock.now += 0.003
    assert offsets(consumer.take(0, 4)) == [(0, 8)]


def test_a_worker_stops_filling_batches_once_it_is_no_longer_busy() -> None:
    clock = Clock()
    pacer = busy_pacer(clock)
    work(pacer, clock, share=(BUSY_ABOVE + IDLE_BELOW) / 2)
    assert pacer.busy  # between the thresholds: stays as it was
    work(pacer, clock, share=IDLE_BELOW / 2)
    assert not pacer.busy
    work(pacer, clock, share=(BUSY_ABOVE + IDLE_BELOW) / 2)
    assert not pacer.busy
    consumer, kafka = reader(pacer)
    kafka.arrive(0)
    assert len(consumer.take(0, 32)) == 1


@pytest.mark.parametrize("fill, linger_s", [(1, 0.003), (16, 0.0)])
def test_pacing_can_be_turned_off(fill: int, linger_s: float) -> None:
    clock = Clock()
    pacer = Pacer(fill, linger_s, clock=clock)
    work(pacer, clock, share=1.0)
    assert not pacer.busy
    consumer, kafka = reader(pacer)
    kafka.arrive(0)
    assert len(consumer.take(0, 32)) == 1


def test_records_of_a_removed_partition_no_longer_count_as_waiting() -> None:
    clock = Clock()
    consumer, kafka = reader(busy_pacer(clock, fill=4), partitions=2)
    kafka.arrive(1, 3)
    assert consumer.take(0, 32) == []
    consumer.remove(1)
    kafka.arrive(0, 3)
    assert consumer.take(0, 32) == []  # 3 waiting, not 6
    kafka.arrive(0)
    assert len(consumer.take(0, 32)) == 4
