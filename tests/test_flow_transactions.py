"""How a partition's transactions end when Kafka refuses them: a pure unit test.

A stand-in producer plays the broker's answers that are hard to time with a real
one (the broker itself is exercised in test_flow_exactly_once.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec.flows.guarantee import transactions as transactions_module
from streamrec.flows.guarantee.transactions import (
    PartitionTransactions,
    ProducerFenced,
    TransactionGaveUp,
    transactional_config,
)
from streamrec.kafka_clients import KafkaRefused, KafkaUnavailable
from streamrec.settings import Settings
from streamrec.state.store import SessionStore

ABORTABLE = KafkaError(KafkaError.INVALID_TXN_STATE, "commit failed", txn_requires_abort=True)
FENCED = KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True)
BROKEN = KafkaError(KafkaError._STATE, "the producer is in a state it cannot leave")


class RefusingProducer:
    """Takes every record; the commit and the abort answer what the test says."""

    commit_error: KafkaError | None = None
    abort_error: KafkaError | None = None

    def __init__(self, _config: dict[str, Any]) -> None:
        self.committed = 0

    def init_transactions(self, _timeout: float) -> None:
        pass

    def begin_transaction(self) -> None:
        pass

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def commit_transaction(self, _timeout: float) -> None:
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)
        self.committed += 1

    def abort_transaction(self, _timeout: float) -> None:
        if self.abort_error is not None:
            raise KafkaException(self.abort_error)

    def flush(self, _timeout: float) -> int:
        return 0


@pytest.fixture
def partition(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[PartitionTransactions]:
    monkeypatch.setattr(transactions_module, "Producer", RefusingProducer)
    settings = Settings(state_dir=tmp_path / "state")
    store = SessionStore.open(settings.state_dir, 0, 1, settings)
    limits = {settings.recommendations_topic: 1_000_000, settings.dlq_topic: 1_000_000}
    transactions = PartitionTransactions(settings, 0, limits)
    transactions.attach(store, None, "topic-id")
    yield transactions
    store.close()


def test_a_transaction_commits_its_outputs_and_moves_the_version(
    partition: PartitionTransactions,
) -> None:
    partition.add([("recommendations", b"u1", b"{}", None)], next_offset=1)
    partition.commit()
    assert partition.version == 0  # no session changed: the shard's version stays
    assert not partition.pending


@pytest.mark.parametrize(
    ("abort_error", "stop", "says"),
    [
        # Fencing may show only when the commit that failed for another reason is aborted.
        (FENCED, ProducerFenced, "served by another process"),
        (BROKEN, TransactionGaveUp, "could not be aborted.*rebuilt from the changelog"),
    ],
)
def test_an_abort_kafka_refuses_stops_the_flow_saying_why_every_time(
    monkeypatch: pytest.MonkeyPatch,
    partition: PartitionTransactions,
    abort_error: KafkaError,
    stop: type[Exception],
    says: str,
) -> None:
    monkeypatch.setattr(RefusingProducer, "commit_error", ABORTABLE)
    monkeypatch.setattr(RefusingProducer, "abort_error", abort_error)
    partition.add([("recommendations", b"u1", b"{}", None)], next_offset=1)
    with pytest.raises(stop, match=says):
        partition.commit()
    with pytest.raises(stop):  # and every later commit says the same
        partition.commit()


class StartlessProducer(RefusingProducer):
    """Its transactions cannot start: ``init_transactions`` raises what the test says."""

    init_error: KafkaError | None = None
    tries = 0

    def init_transactions(self, _timeout: float) -> None:
        StartlessProducer.tries += 1
        if self.init_error is not None:
            raise KafkaException(self.init_error)


def start_transactions(monkeypatch: pytest.MonkeyPatch, error: KafkaError) -> None:
    monkeypatch.setattr(transactions_module, "Producer", StartlessProducer)
    monkeypatch.setattr(StartlessProducer, "init_error", error)
    monkeypatch.setattr(StartlessProducer, "tries", 0)
    settings = Settings()
    PartitionTransactions(settings, 0, {settings.recommendations_topic: 1_000_000})


def test_a_transactional_id_the_acls_refuse_stops_at_once_for_a_person(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, fatal=True)
    with pytest.raises(KafkaRefused, match="not allowed to use transactional id"):
        start_transactions(monkeypatch, refused)
    assert StartlessProducer.tries == 1


def test_a_cluster_without_a_transaction_coordinator_stops_the_flow_for_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A single broker under the default transaction.state.log.replication.factor of 3.
    monkeypatch.setattr(transactions_module, "START_PATIENCE_S", 1.0)
    missing = KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE, retriable=True)
    with pytest.raises(KafkaUnavailable, match="transaction coordinator") as gave_up:
        start_transactions(monkeypatch, missing)
    assert not isinstance(gave_up.value, KafkaRefused)
    assert StartlessProducer.tries >= 2  # it did wait for one first


def test_exactly_once_the_changelog_records_and_answers_are_compressed_in_one_producer() -> None:
    settings = Settings(changelog_compression="lz4")
    config = transactional_config(settings, 3, {settings.recommendations_topic: 1_000_000})
    assert config["compression.type"] == "lz4"
    assert config["transactional.id"].endswith(".3")
