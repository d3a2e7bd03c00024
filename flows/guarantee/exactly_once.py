"""Exactly once: a partition's outputs, session changes and progress commit in one transaction.

Every events partition read gets its transactional producer
(``flows/guarantee/transactions.py``) before its shard is opened, so that it
fences the partition's previous owner first.  Reading resumes after the last
committed micro-batch, wherever it was committed: the changelog's marks, not
Bytewax's recovery store, which this guarantee does not use.  Outputs never
reach the dataflow's sink: each micro-batch's go into its partitions'
transactions, committed every ``STREAMREC_TRANSACTION_INTERVAL_MS`` (on a
micro-batch or a poll of the partition, so that answers never wait for the
next record), and once more at a clean stop.

>>> by_partition([("t", None, b"a", None), ("t", None, b"b", None)], [1, 0], {0: 7, 1: 9})
{0: [('t', None, b'b', None)], 1: [('t', None, b'a', None)]}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final, cast

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING

from streamrec.flows import metrics
from streamrec.flows.guarantee.base import Guarantee, PartitionProgress
from streamrec.flows.guarantee.transactions import PartitionTransactions
from streamrec.flows.output import OutputRecord, SinkItem, output_limits
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.settings import EXACTLY_ONCE, Settings
from streamrec.state.changelog import open_shard
from streamrec.state.session import NO_REPLAY
from streamrec.state.store import SessionStore

log = logging.getLogger(__name__)

# How long a clean stop waits for the last removals' transaction before leaving them uncommitted.
CLOSE_COMMIT_S: Final = 30.0


class ExactlyOnce(Guarantee):
    """Every event answered once for ``read_committed`` consumers, however often the flow dies."""

    name = EXACTLY_ONCE
    recovery_store = False

    def __init__(self, settings: Settings, events_topic_id: str) -> None:
        self._settings = settings
        self._events_topic_id = events_topic_id
        # Per partition opened: its transactions, and where its reading resumes.
        self.transactions: dict[int, PartitionTransactions] = {}
        self.resume_at: dict[int, int] = {}
        self._limits: dict[str, int] | None = None

    def open_store(self, partition: int, shard_count: int) -> SessionStore:
        if self._limits is None:
            self._limits = output_limits(self._settings)
        transactions = PartitionTransactions(self._settings, partition, self._limits)
        try:
            store, marks, rebuilt = open_shard(
                self._settings,
                partition,
                shard_count,
                transactions,
                self._events_topic_id,
                exactly_once=True,
            )
        except BaseException:
            transactions.close()
            raise
        transactions.attach(store, marks, self._events_topic_id)
        self.transactions[partition] = transactions
        if rebuilt:
            metrics.SHARDS_REBUILT.inc()
        applied = store.applied_offset(partition)
        if transactions.next_offset is not None:
            self.resume_at[partition] = transactions.next_offset
        elif applied is not None:  # a store from before exactly-once, without a changelog
            self.resume_at[partition] = applied + 1
        log.info(
            "events partition %d taken exactly-once (changelog version %d); reading from offset %s",
            partition,
            transactions.version,
            self.resume_at.get(partition, "the beginning"),
        )
        return store

    def start_offset(self, partition: int, resume_state: int | None) -> int:
        # After the last committed micro-batch, wherever it was committed.
        return self.resume_at.get(partition, OFFSET_BEGINNING)

    def reading(self, partition: int, offset: int, worker: WorkerContext) -> PartitionProgress:
        return _Progress(self.transactions[partition])

    def replay_floor(self, worker: WorkerContext, partition: int, store: SessionStore) -> int:
        # Reading resumes after the last committed micro-batch, and a store holding writes
        # of one that never committed is rebuilt: nothing applied is ever read again.
        return NO_REPLAY

    def after_batch(
        self, outputs: list[SinkItem], partitions: list[int], last_offsets: dict[int, int]
    ) -> list[SinkItem]:
        # Each partition's outputs and resume offset into its transaction (committed when due);
        # the outputs hold no marks.
        grouped = by_partition(cast(list[OutputRecord], outputs), partitions, last_offsets)
        for partition, records in grouped.items():
            self.transactions[partition].add(records, last_offsets[partition] + 1)
        return []  # committed already: nothing for the sink

    def after_commit(self, stores: Mapping[int, SessionStore]) -> None:
        pass  # the writes join the open transaction; fencing shows when it commits

    def after_sweep(self, store: SessionStore) -> None:
        transactions = self.transactions.get(store.shard_index)
        if transactions is not None and transactions.pending:
            transactions.add([])  # the tombstones of what expired

    def sink(self, workers: Workers) -> DynamicSink[SinkItem]:
        return NoOutput()

    def close_shard(self, partition: int, store: SessionStore) -> None:
        transactions = self.transactions.get(partition)
        if transactions is not None:
            transactions.finish(CLOSE_COMMIT_S)

    def close(self) -> None:
        for transactions in self.transactions.values():
            transactions.close()
        self.transactions.clear()


class _Progress(PartitionProgress):
    """The partition's transaction is committed from its polls too, so answers never wait."""

    def __init__(self, transactions: PartitionTransactions) -> None:
        self._transactions = transactions

    def on_poll(self) -> None:
        if self._transactions.due():
            self._transactions.commit()

    def may_stop(self, read_to: int) -> bool:
        return True  # what was read is in the open transaction, which the close commits

    def snapshot(self, read_to: int) -> int:
        return read_to  # unused: there is no recovery store


def by_partition(
    outputs: list[OutputRecord], partitions: list[int], last_offsets: dict[int, int]
) -> dict[int, list[OutputRecord]]:
    """``outputs`` grouped by their events partition; every partition read has a list."""
    grouped: dict[int, list[OutputRecord]] = {p: [] for p in last_offsets}
    for record, partition in zip(outputs, partitions, strict=True):
        grouped[partition].append(record)
    return grouped


class _Nothing(StatelessSinkPartition[SinkItem]):
    def write_batch(self, items: list[SinkItem]) -> None:
        assert not items, "exactly once, outputs go in the partitions' transactions"


class NoOutput(DynamicSink[SinkItem]):
    """The sink of a flow whose outputs leave otherwise: no producer, no start-up lookups."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Nothing:
        return _Nothing()
