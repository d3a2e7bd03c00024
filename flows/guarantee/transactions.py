"""Exactly-once output: a partition's outputs, session changes and progress in one transaction.

With ``--guarantee exactly-once`` every events partition has its own
transactional producer (``transactional.id`` names the changelog and the
partition, so whichever process takes a partition next fences the previous
owner and aborts its open transaction).  One transaction of a partition holds,
for the micro-batches it collected,

* the session changes its store committed (and any removals since the last),
  to the changelog partition of the events partition,
* the batches' recommendations and dead letters,
* the marks: the last offset applied, the next offset to read and the shard's
  version (``state/changelog.py``),

committed when it has been open ``STREAMREC_TRANSACTION_INTERVAL_MS`` (100
ms, as Kafka Streams commits under exactly-once; 0: every micro-batch), at the
first micro-batch or poll of the partition after that, so a ``read_committed``
consumer sees each event's answer once, however often the flow is killed: the
marks are the resume point, and a store holding writes of a transaction that
never committed is rebuilt from the changelog.  Kafka's
``send_offsets_to_transaction`` needs a consumer group's metadata, which
Bytewax's ``assign``-ed readers do not have; offsets in the changelog need none.

Failures: a record the broker refuses is set aside (dead letter or stub, as in
``flows/output.py``) and the transaction is made again; a transaction Kafka
aborts (an outage longer than ``transaction.timeout.ms``) is made again,
reading waiting meanwhile; a fenced producer means another process serves the
partition now, and this one stops.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamrec.flows import metrics
from streamrec.flows.kafka_log import kafka_logger
from streamrec.flows.output import (
    POLL_S,
    REFUSED,
    BlockedOutput,
    OutputRecord,
    set_aside,
    size_limits,
)
from streamrec.kafka_clients import (
    NOT_ALLOWED,
    KafkaUnavailable,
    TimeTried,
    changelog_producer_config,
    not_allowed,
)
from streamrec.settings import Settings
from streamrec.state.changelog import MARKS_KEY, Marks, encode_marks
from streamrec.state.errors import StateError
from streamrec.state.store import SessionStore, Stamp

log = logging.getLogger(__name__)

# A transaction open longer is aborted by Kafka; one micro-batch's takes milliseconds.
TRANSACTION_TIMEOUT_MS: Final = 30_000
# How long a new producer tries to start its transactions before the flow stops (exit 69): a
# cluster without a transaction coordinator (fewer brokers than the transaction log's
# replication factor) would otherwise keep the flow waiting, silently, forever.
START_PATIENCE_S: Final = 60.0

Changes = list[tuple[bytes, bytes | None]]


class ProducerFenced(StateError):
    """Another process took this events partition: its producer fenced ours."""


class TransactionGaveUp(StateError):
    """A transaction did not commit within the time it was given (at shutdown only)."""


def transactional_id(settings: Settings, partition: int) -> str:
    """One per events partition of a deployment: the next owner fences the last."""
    return f"streamrec.{settings.sessions_changelog}.{partition}"


def transactional_config(
    settings: Settings, partition: int, limits: dict[str, int]
) -> dict[str, Any]:
    """The settings of ``partition``'s transactional producer: the changelog producer's.

    Its answers are compressed with the changelog's records: one producer cannot
    compress one topic and not another, and no consumer sees them before the
    commit, which is up to ``transaction_interval_ms`` away (a commit sends what
    lingers at once).
    """
    return (
        size_limits(limits)
        | changelog_producer_config(settings)
        | {
            "transactional.id": transactional_id(settings, partition),
            "transaction.timeout.ms": str(TRANSACTION_TIMEOUT_MS),
            "message.timeout.ms": str(TRANSACTION_TIMEOUT_MS - 5_000),
        }
    )


class PartitionTransactions:
    """One events partition's transactional producer, and the changes awaiting its next commit.

    Used by the worker that reads the partition only.  ``send`` (the store's
    change listener) and ``add`` (a micro-batch's outputs) collect; ``commit``
    makes the transaction, which ``add`` and the partition's reader do when it is ``due``.
    """

    def __init__(self, settings: Settings, partition: int, limits: dict[str, int]) -> None:
        self.partition = partition
        self.version = 0
        # Who made ``version`` (a commit of this producer or of an earlier owner), and this
        # producer's own token: a fenced owner's uncommitted "version V+1" is never ours.
        self.version_writer = ""
        self.writer = secrets.token_hex(8)
        self.next_offset: int | None = None
        self._settings = settings
        self._changelog = settings.sessions_changelog
        self._dlq_topic = settings.dlq_topic
        self._limits = limits
        self._events_topic_id = ""
        self._store: SessionStore | None = None
        self._applied = -1
        self._changes: list[Changes] = []
        config = transactional_config(settings, partition, limits)
        self._producer = Producer(config | {"logger": kafka_logger("producer")})
        # Per output position of the transaction being made: None once delivered, else why not.
        self._outcomes: list[KafkaError | None] = []
        self._callbacks: list[Callable[[KafkaError | None, Message], None]] = []
        self._failing_since: float | None = None
        self._blocked = BlockedOutput(settings)
        self._last_error = "none reported"
        self._fenced: ProducerFenced | None = None
        self._give_up_at = float("inf")
        # The transaction being filled: its outputs, and when its first micro-batch came.
        self._outputs: list[OutputRecord] = []
        self._opened_at: float | None = None
        self._interval_s = settings.transaction_interval_ms / 1000.0
        self._start()

    def _start(self) -> None:
        """Register the transactional id with its coordinator, fencing any earlier owner."""
        tried = TimeTried(least_s=POLL_S, most_s=POLL_S * 10)
        while True:
            began = time.monotonic()
            try:
                self._producer.init_transactions(POLL_S * 10)
                return
            except KafkaException as err:
                error: KafkaError = err.args[0]
                self._refuse_if_not_allowed(error)
                if not error.retriable() or error.fatal():
                    raise
                if tried.failed(began) >= START_PATIENCE_S:
                    raise KafkaUnavailable(
                        f"partition {self.partition}: could not start its transactions in "
                        f"{START_PATIENCE_S:g} s ({error.str()}). Has the cluster a transaction "
                        "coordinator? It needs as many brokers as transaction.state.log."
                        "replication.factor (default 3) and transaction.state.log.min.isr"
                    ) from None

    def _refuse_if_not_allowed(self, error: KafkaError) -> None:
        if error.code() in NOT_ALLOWED:
            raise not_allowed(
                self._settings,
                error,
                f"use transactional id {transactional_id(self._settings, self.partition)!r}",
                "write and describe the transactional ids streamrec.<changelog>.* (exactly "
                "once), and write the changelog, recommendations and dead-letter topics",
            )

    def attach(self, store: SessionStore, marks: Marks | None, events_topic_id: str) -> None:
        """Continue from the changelog's ``marks``: ``store`` was opened (or rebuilt) to them."""
        self._store = store
        self._events_topic_id = events_topic_id
        if marks is not None:
            self.version = marks.version or 0
            self.version_writer = marks.writer
            self._applied = marks.applied
            self.next_offset = marks.next if marks.next is not None else marks.applied + 1
        store.stamp = Stamp(self.version + 1, self.writer)

    def send(
        self, partition: int, changes: Iterable[tuple[bytes, bytes | None]], _: int | None
    ) -> None:
        # The store calls this after its RocksDB write, stamped with the next version.
        self._changes.append(changes if isinstance(changes, list) else list(changes))

    def add(self, outputs: list[OutputRecord], next_offset: int | None = None) -> None:
        """Take a micro-batch's ``outputs`` into the transaction; commit it if it is due.

        ``next_offset``: the first events offset after the micro-batch (None: unchanged).
        """
        self._outputs += outputs
        if next_offset is not None:
            self.next_offset = next_offset
        if self._opened_at is None:
            self._opened_at = time.monotonic()
        if self.due():
            self.commit()

    def due(self) -> bool:
        """Whether the open transaction has been open for the commit interval."""
        opened = self._opened_at
        return opened is not None and time.monotonic() - opened >= self._interval_s

    def commit(self, give_up_after_s: float | None = None) -> None:
        """Commit the outputs taken, the changes collected and the marks, in one transaction.

        Retries for as long as it takes, or ``give_up_after_s`` (``TransactionGaveUp``).
        """
        store = self._store
        assert store is not None, "attach() comes first"
        if self._fenced is not None:
            raise self._fenced
        if give_up_after_s is not None:
            self._give_up_at = time.monotonic() + give_up_after_s
        applied = store.applied_offset(self.partition)
        if applied is not None:
            self._applied = applied
        if self._changes:
            version, writer = self.version + 1, self.writer
        else:
            version, writer = self.version, self.version_writer
        marks = encode_marks(
            Marks(self._applied, self._events_topic_id, self.next_offset, version, writer)
        )
        outputs = self._outputs
        started = time.monotonic()
        while not self._transaction(outputs, marks):
            outputs = self._next_round(outputs)
            self._note_failing()
            time.sleep(POLL_S)  # Kafka aborted it: an outage, not a hurry
        metrics.TRANSACTION_SECONDS.observe(time.monotonic() - started)
        self.version, self.version_writer = version, writer
        self._changes = []
        self._outputs = []
        self._opened_at = None
        store.stamp = Stamp(version + 1, self.writer)
        self._blocked.resumed(f"partition {self.partition}: transactions commit again")
        self._failing_since = None

    @property
    def pending(self) -> bool:
        """Whether anything waits for a commit: micro-batches taken, or changes collected."""
        return self._opened_at is not None or bool(self._changes)

    def finish(self, give_up_after_s: float) -> None:
        """At a clean stop: the store's last writes and whatever waits, committed; stamped.

        Fenced, or Kafka away for ``give_up_after_s``: said, and the stamp stays ahead, so
        the next start rebuilds the shard from what was committed.
        """
        store = self._store
        assert store is not None, "attach() comes first"
        store.commit()
        try:
            if self.pending:  # the open transaction, or removals
                self.commit(give_up_after_s=give_up_after_s)
            # It holds just what committed.
            store.stamp = Stamp(self.version, self.version_writer)
        except StateError as err:
            log.warning("%s", err)

    def close(self) -> None:
        self._producer.flush(POLL_S)

    def _transaction(self, outputs: list[OutputRecord], marks: bytes) -> bool:
        """One attempt; False if Kafka aborted it (``_outcomes`` says which outputs failed)."""
        producer = self._producer
        try:
            producer.begin_transaction()
            for changes in self._changes:
                for user, change in changes:
                    self._produce(self._changelog, user, change, None, self.partition, None)
            callbacks = self._callbacks
            while len(callbacks) < len(outputs):
                callbacks.append(partial(self._on_delivery, len(callbacks)))
            self._outcomes = [None] * len(outputs)
            for index, (topic, key, value, headers) in enumerate(outputs):
                try:
                    self._produce(topic, key, value, headers, -1, callbacks[index])
                except KafkaException as err:
                    # Refused before it left (too large): set aside in the next attempt.
                    self._outcomes[index] = err.args[0]
                    raise
            self._produce(self._changelog, MARKS_KEY, marks, None, self.partition, None)
            self._retry(lambda: producer.commit_transaction(POLL_S * 10), "commit")
            return True
        except KafkaException as err:
            error: KafkaError = err.args[0]
            self._fail(error)
            try:
                self._retry(lambda: producer.abort_transaction(POLL_S * 10), "abort")
            except KafkaException as abort_err:
                # Fencing may show first here, when the commit failed for another reason.
                refused: KafkaError = abort_err.args[0]
                self._fail(refused)
                raise TransactionGaveUp(
                    f"partition {self.partition}: a failed transaction could not be aborted "
                    f"({refused.str()}); its shard is rebuilt from the changelog on the next start"
                ) from abort_err
            metrics.TRANSACTIONS_ABORTED.inc()
            return False

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        partition: int,
        on_delivery: Callable[[KafkaError | None, Message], None] | None,
    ) -> None:
        while True:
            try:
                if on_delivery is None:
                    self._producer.produce(topic, value, key, partition=partition)
                else:
                    self._producer.produce(
                        topic, value, key, headers=headers, on_delivery=on_delivery
                    )
                return
            except BufferError:
                self._producer.poll(POLL_S)  # the queue is full: let it drain

    def _on_delivery(self, index: int, err: KafkaError | None, _message: Message) -> None:
        self._outcomes[index] = err

    def _next_round(self, outputs: list[OutputRecord]) -> list[OutputRecord]:
        """The outputs again, with what Kafka refused set aside (dead letter or stub)."""
        again: list[OutputRecord] = []
        for record, error in zip(outputs, self._outcomes, strict=True):
            if error is None or error.code() not in REFUSED:
                again.append(record)
                continue
            replacement = set_aside(record, error, self._limits, self._dlq_topic, self._blocked.say)
            if replacement is not None:
                again.append(replacement)
        return again

    def _fail(self, error: KafkaError) -> None:
        self._refuse_if_not_allowed(error)
        if error.fatal() or error.code() in (
            KafkaError._FENCED,
            KafkaError.PRODUCER_FENCED,
            KafkaError.INVALID_PRODUCER_EPOCH,
        ):
            # A fenced producer can do nothing more: every later call fails the same way.
            self._fenced = ProducerFenced(
                f"events partition {self.partition} is served by another process now (its "
                f"transactions fenced this one's: {error.str()}); this process stops, and the "
                "other goes on exactly once"
            )
            raise self._fenced
        metrics.OUTPUT_FAILURES.labels(error.name(), "retried").inc()
        self._last_error = error.str()

    def _retry(self, call: Callable[[], None], what: str) -> None:
        """``call`` until it succeeds; a retriable failure (a timeout, Kafka away) waits."""
        while True:
            try:
                call()
                return
            except KafkaException as err:
                error: KafkaError = err.args[0]
                self._refuse_if_not_allowed(error)
                if not error.retriable() or error.fatal():
                    raise
                self._last_error = f"{what}: {error.str()}"
                self._note_failing()

    def _note_failing(self) -> None:
        now = time.monotonic()
        if now > self._give_up_at:
            raise TransactionGaveUp(
                f"partition {self.partition}: a transaction did not commit in time "
                f"({self._last_error}); its shard is rebuilt from the changelog on the next start"
            )
        if self._failing_since is None:
            self._failing_since = now
        else:
            self._blocked.waiting(self._failing_since, self._describe_blocked)

    def _describe_blocked(self, waited_s: float) -> str:
        return (
            f"output blocked: partition {self.partition}'s transaction has not committed for "
            f"{waited_s:.0f} s (last error: {self._last_error}); reading waits until it does"
        )
