"""Reading a partition's offsets waits out a broker that restarts (a stand-in consumer).

Found by the real-broker fault schedules: a broker restarted while a flow opened
its readers left partition 0 without a leader for a moment, and the flow exited 1
(a bug, by its own table) instead of waiting, killing a two-process cluster with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec.kafka_clients import KafkaUnavailable, watermark_offsets


class Restarting:
    """Answers ``NOT_LEADER_FOR_PARTITION`` ``failures`` times, then the offsets."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.asked = 0

    def get_watermark_offsets(self, _partition: Any, timeout: float) -> tuple[int, int]:
        self.asked += 1
        if self.asked <= self.failures:
            raise KafkaException(
                KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, "Failed to get watermark offsets")
            )
        return 3, 42


def test_a_partition_without_a_leader_for_a_moment_is_waited_for() -> None:
    consumer = Restarting(failures=3)
    assert watermark_offsets(consumer, "events", 0, patience_s=30) == (3, 42)  # type: ignore[arg-type]
    assert consumer.asked == 4


def test_a_partition_without_a_leader_for_longer_than_the_patience_is_kafka_unavailable() -> None:
    consumer = Restarting(failures=10**9)
    with pytest.raises(KafkaUnavailable, match="'events' partition 0"):
        watermark_offsets(consumer, "events", 0, patience_s=0.3)  # type: ignore[arg-type]


def test_a_process_paused_while_it_asks_for_offsets_tries_again_when_it_wakes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As for the metadata (tests/test_kafka_metadata.py): a minute stopped in the middle of
    # a request is one failed request, not a minute of trying.
    from streamrec import kafka_clients

    now = [1000.0]
    monkeypatch.setattr(kafka_clients.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kafka_clients.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))

    class Paused(Restarting):
        def get_watermark_offsets(self, partition: Any, timeout: float) -> tuple[int, int]:
            if self.asked == 0:
                now[0] += 60.0  # SIGSTOP for a minute while the first request is out
            return super().get_watermark_offsets(partition, timeout)

    consumer = Paused(failures=1)
    assert watermark_offsets(consumer, "events", 0, patience_s=30) == (3, 42)  # type: ignore[arg-type]
    assert consumer.asked == 2
