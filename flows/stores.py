"""The session stores of the events partitions this process reads, opened as they are needed.

Sessions are kept per Kafka partition: producers key events by user, so one
user's events arrive, in order, on one partition, which Bytewax reads on
exactly one worker.  A partition's store therefore needs no exchange between
workers and moves with its partition when workers or processes change.
How a store is opened and closed is its delivery guarantee's business
(``flows/guarantee/``).
"""

from __future__ import annotations

import threading

from streamrec.flows.guarantee import Guarantee
from streamrec.state.store import SessionStore


class PartitionStores:
    """The open session store of each Kafka partition this process reads; closed together.

    ``guarantee`` opens each store (rebuilt from the changelog first if it is
    missing or behind it) and finishes it at a clean stop.
    """

    def __init__(self, partitions: int, guarantee: Guarantee) -> None:
        self._partitions = partitions
        self.guarantee = guarantee
        self._stores: dict[int, SessionStore] = {}
        self._lock = threading.Lock()

    def get(self, partition: int) -> SessionStore:
        store = self._stores.get(partition)
        if store is None:
            with self._lock:
                store = self._stores.get(partition)
                if store is None:
                    store = self.guarantee.open_store(partition, self._partitions)
                    self._stores[partition] = store
        return store

    def close(self) -> None:
        with self._lock:
            try:
                for partition, store in self._stores.items():
                    self.guarantee.close_shard(partition, store)
                    store.close()
            finally:
                self._stores.clear()
                self.guarantee.close()
