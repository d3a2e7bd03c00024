"""The session stores of the events partitions this process reads, opened as they are needed.

Sessions are kept per Kafka partition: producers key events by user, so one
user's events arrive, in order, on one partition, which Bytewax reads on
exactly one worker.  A partition's store therefore needs no exchange between
workers and moves with its partition when workers or processes change.
"""

from __future__ import annotations

import threading

from flows import metrics
from state.changelog import ChangelogWriter, open_shard
from state.session import NO_REPLAY
from state.store import SessionStore
from streamrec.settings import Settings


class PartitionStores:
    """The open session store of each Kafka partition this process reads; closed together.

    With a changelog, a store is rebuilt from it when opened if it is missing or
    behind it (``rebuilt_to`` then holds the offset its events must be read
    from again), and every commit goes to it.
    """

    def __init__(
        self,
        settings: Settings,
        partitions: int,
        changelog: ChangelogWriter | None = None,
        events_topic_id: str = "",
    ) -> None:
        self._settings = settings
        self._partitions = partitions
        self._changelog = changelog
        self._events_topic_id = events_topic_id
        self._stores: dict[int, SessionStore] = {}
        # Per rebuilt partition: the first events offset its rebuilt state lacks.
        self.rebuilt_to: dict[int, int] = {}
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
        if self._changelog is None:
            return SessionStore.open(settings.state_dir, partition, self._partitions, settings)
        store, marks = open_shard(
            settings, partition, self._partitions, self._changelog, self._events_topic_id
        )
        if marks is not None:
            metrics.SHARDS_REBUILT.inc()
            self.rebuilt_to[partition] = marks.applied + 1
        return store

    def changelog_floor(self, partition: int) -> int:
        """The first events offset a shard rebuilt from the changelog now would lack."""
        if self._changelog is None:
            return NO_REPLAY
        durable = self._changelog.durable.get(partition)
        return 0 if durable is None else durable + 1

    def close(self) -> None:
        with self._lock:
            try:
                for store in self._stores.values():
                    store.close()
            finally:
                self._stores.clear()
                if self._changelog is not None:
                    left = self._changelog.flush()
                    if left:
                        print(f"flow: {left} changelog records were not delivered", flush=True)
