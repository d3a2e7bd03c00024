"""Asking the cluster for metadata gives up after the time spent trying, not the time passed.

Found by the real-broker fault schedules: a flow frozen (SIGSTOP) while it asked
for the topics' metadata at start woke with its clock past the deadline, failed
the one request it had in flight and exited 69 ("cannot reach Kafka") beside a
broker that was up.  A paused process (a suspended VM, a stopped container) must
try again when it wakes.
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec import kafka_clients
from streamrec.kafka_clients import METADATA_TIMEOUT_S, KafkaUnavailable, cluster_metadata
from streamrec.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Admin:
    """Each request takes ``seconds`` of the clock; the first ``failures`` fail as unreachable."""

    def __init__(self, clock: Clock, failures: int, seconds: list[float]) -> None:
        self.clock, self.failures, self.seconds = clock, failures, seconds
        self.asked = 0

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> str:
        self.clock.now += self.seconds[min(self.asked, len(self.seconds) - 1)]
        self.asked += 1
        if self.asked <= self.failures:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))
        return "metadata"

    def poll(self, _timeout: float) -> int:
        return 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(kafka_clients.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(kafka_clients.time, "sleep", clock.sleep)
    return clock


def use(monkeypatch: pytest.MonkeyPatch, admin: Admin) -> None:
    def made(_settings: Settings, *_args: Any) -> Admin:
        return admin

    monkeypatch.setattr(kafka_clients, "admin_client", made)


def test_a_process_paused_while_it_asks_tries_again_when_it_wakes(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first request is in flight while the process is stopped for a minute.
    admin = Admin(clock, failures=1, seconds=[60.0, 0.01])
    use(monkeypatch, admin)
    assert cluster_metadata(Settings()) == "metadata"
    assert admin.asked == 2


def test_a_broker_that_is_not_there_is_given_up_on_after_the_timeout_of_trying(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = Admin(clock, failures=10**9, seconds=[0.0])  # every request refused at once
    use(monkeypatch, admin)
    started = clock.now
    with pytest.raises(KafkaUnavailable, match="cannot reach Kafka"):
        cluster_metadata(Settings())
    assert METADATA_TIMEOUT_S <= clock.now - started <= METADATA_TIMEOUT_S + 0.5
