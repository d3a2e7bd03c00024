"""The session stores of the events partitions this process reads, opened as they are needed.

Sessions are kept per Kafka partition: producers key events by user, so one
user's events arrive, in order, on one partition, which Bytewax reads on
exactly one worker.  A partition's store therefore needs no exchange between
workers and moves with its partition when workers or processes change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from flows import metrics
from flows.sink import output_limits
from flows.transactions import PartitionTransactions
from state.changelog import ChangelogWriter, open_shard
from state.errors import StateError
from state.session import NO_REPLAY
from state.store import SessionStore, Stamp
from streamrec.settings import Settings

log = logging.getLogger(__name__)

# How long a clean stop waits for the last removals' transaction before leaving them uncommitted.
CLOSE_COMMIT_S = 30.0


class PartitionStores:
    """The open session store of each Kafka partition this process reads; closed together.

    With a changelog, a store is rebuilt from it when opened if it is missing or
    behind it (``rebuilt_to`` then holds the offset its events must be read
    from again), and every commit goes to it.  Exactly once, each partition also
    gets its transactional producer (``transactions``), made before the store is
    opened so that it fences the partition's previous owner first, and
    ``resume_at`` holds where its reading resumes: the changelog's marks.
    """

    def __init__(
        self,
        settings: Settings,
        partitions: int,
        changelog: ChangelogWriter | None = None,
        events_topic_id: str = "",
        exactly_once: bool = False,
    ) -> None:
        self._settings = settings
        self._partitions = partitions
        self._changelog = changelog
        self._events_topic_id = events_topic_id
        self._stores: dict[int, SessionStore] = {}
        # Per rebuilt partition: the first events offset its rebuilt state lacks.
        self.rebuilt_to: dict[int, int] = {}
        self.exactly_once = exactly_once
        self.transactions: dict[int, PartitionTransactions] = {}
        self.resume_at: dict[int, int] = {}
        self._limits: dict[str, int] | None = None
        self._lock = threading.Lock()

    def get(self, partition: int) -> SessionStore:
        store = self._stores.get(partition)
        if store is None:
            with self._lock:
                store = self._stores.get(partition)
                if store is None:
                    store = self._open(partition)
                    self._stores[partition] = store
        return store

    def _open(self, partition: int) -> SessionStore:
        settings = self._settings
        if self.exactly_once:
            return self._open_exactly_once(partition)
        if self._changelog is None:
            return SessionStore.open(settings.state_dir, partition, self._partitions, settings)
        store, marks, rebuilt = open_shard(
            settings, partition, self._partitions, self._changelog, self._events_topic_id
        )
        if marks is not None:
            self._changelog.durable[partition] = marks.applied
        self._changelog.claim(partition, marks)
        if rebuilt:
            metrics.SHARDS_REBUILT.inc()
            # Its events must be read again from there: the changelog had nothing later.
            self.rebuilt_to[partition] = 0 if marks is None else marks.applied + 1
        return store

    def _open_exactly_once(self, partition: int) -> SessionStore:
        if self._limits is None:
            self._limits = output_limits(self._settings)
        transactions = PartitionTransactions(self._settings, partition, self._limits)
        try:
            store, marks, rebuilt = open_shard(
                self._settings,
                partition,
                self._partitions,
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

    def check_changelog(self, partitions: Iterable[int]) -> None:
        """At least once: stop if the broker refused a change or another process claimed one
        of ``partitions`` later; rewrite what an older claimant wrote into them."""
        writer = self._changelog
        if writer is None or (not writer.intrusions and writer.refused is None):
            return
        for partition in partitions:
            writer.resolve(partition, self._stores[partition].resend)

    def changelog_floor(self, partition: int) -> int:
        """The first events offset a shard rebuilt from the changelog now would lack."""
        if self._changelog is None or self.exactly_once:
            return NO_REPLAY  # exactly once, reading resumes after the last committed batch
        durable = self._changelog.durable.get(partition)
        return 0 if durable is None else durable + 1

    def close(self) -> None:
        with self._lock:
            try:
                for partition, store in self._stores.items():
                    transactions = self.transactions.get(partition)
                    if transactions is not None:
                        store.commit()
                        try:
                            if transactions.pending:  # the open transaction, or removals
                                transactions.commit(give_up_after_s=CLOSE_COMMIT_S)
                            # It holds just what committed.
                            store.stamp = Stamp(transactions.version, transactions.version_writer)
                        except StateError as err:
                            # Fenced, or Kafka away: the stamp stays ahead, so the next
                            # start rebuilds this shard from what was committed.
                            log.warning("%s", err)
                    store.close()
            finally:
                for transactions in self.transactions.values():
                    transactions.close()
                self.transactions.clear()
                self._stores.clear()
                if self._changelog is not None:
                    left = self._changelog.flush()
                    if left:
                        log.warning("%d changelog records were not delivered", left)
