"""At least once: outputs delivered asynchronously, resume offsets only past what was delivered.

The sink queues a micro-batch's records and returns, and the batch after it is
read while Kafka acknowledges them (``flows/guarantee/acked_sink.py``).  An
offset may become a resume point only once every output of the events before
it is acknowledged, else a crash would lose those outputs.  So each
micro-batch's outputs end with an ``OffsetMark`` per events partition; the sink
releases the marks in order, as the outputs queued before them are delivered,
into its worker's ``delivered`` (``flows/worker.py``); and a partition's reader
never snapshots past it.  A worker's source, processor and sink run on one
thread, and each events partition is read by exactly one worker, so none of
this needs a lock.

Resume offsets live in Bytewax's recovery store (when there is one).  With a
changelog, every commit of a shard goes to it; a shard found missing or behind
it is rebuilt and its events read again from where the changelog ends
(``state/changelog.py``), and a later claim of the partition by another
process is detected after each micro-batch.

>>> AtLeastOnce(Settings()).after_batch([], [], {0: 41})
[OffsetMark(partition=0, next=42)]
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Final

from bytewax.outputs import DynamicSink
from confluent_kafka import OFFSET_BEGINNING

from streamrec.flows import metrics
from streamrec.flows.guarantee.acked_sink import OutputSink
from streamrec.flows.guarantee.base import Guarantee, PartitionProgress
from streamrec.flows.output import OffsetMark, SinkItem
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.settings import AT_LEAST_ONCE, Settings
from streamrec.state.changelog import ChangelogWriter, open_shard
from streamrec.state.session import NO_REPLAY
from streamrec.state.store import SessionStore

log = logging.getLogger(__name__)

# Bytewax writes a snapshot when its epoch closes, so the one taken two snapshots back is
# surely in the recovery store: its resume offset is the partition's replay floor.
SNAPSHOTS_UNTIL_COMMITTED: Final = 2


class AtLeastOnce(Guarantee):
    """Every event answered at least once; with ``changelog``, shards restore anywhere.

    ``recovery_store``: Bytewax's recovery store keeps the resume offsets (else
    every run reads the topic from its start).
    """

    name = AT_LEAST_ONCE

    def __init__(
        self,
        settings: Settings,
        changelog: ChangelogWriter | None = None,
        events_topic_id: str = "",
        recovery_store: bool = True,
    ) -> None:
        self._settings = settings
        self._changelog = changelog
        self._events_topic_id = events_topic_id
        self.recovery_store = recovery_store
        # Per rebuilt partition: the first events offset its rebuilt state lacks.
        self._rebuilt_to: dict[int, int] = {}

    def open_store(self, partition: int, shard_count: int) -> SessionStore:
        settings = self._settings
        changelog = self._changelog
        if changelog is None:
            return SessionStore.open(settings.state_dir, partition, shard_count, settings)
        store, marks, rebuilt = open_shard(
            settings, partition, shard_count, changelog, self._events_topic_id
        )
        if marks is not None:
            changelog.durable[partition] = marks.applied
        changelog.claim(partition, marks)
        if rebuilt:
            metrics.SHARDS_REBUILT.inc()
            # Its events must be read again from there: the changelog had nothing later.
            self._rebuilt_to[partition] = 0 if marks is None else marks.applied + 1
        return store

    def start_offset(self, partition: int, resume_state: int | None) -> int:
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        rebuilt_to = self._rebuilt_to.get(partition)
        if rebuilt_to is not None and resume_state is not None:
            offset = min(resume_state, rebuilt_to)
        start = "the beginning" if offset == OFFSET_BEGINNING else f"offset {offset}"
        log.info("events partition %d taken at least once; reading from %s", partition, start)
        return offset

    def reading(self, partition: int, offset: int, worker: WorkerContext) -> PartitionProgress:
        return _Progress(worker, partition, offset, self.recovery_store)

    def replay_floor(self, worker: WorkerContext, partition: int, store: SessionStore) -> int:
        # From the recovery store's snapshots or, lower, from the last progress the changelog
        # holds (a rebuild resumes there).
        floor = worker.replay_floors.get(partition, store.replay_floor)
        if self._changelog is None:
            return floor
        durable = self._changelog.durable.get(partition)
        return min(floor, 0 if durable is None else durable + 1)

    def after_batch(
        self, outputs: list[SinkItem], partitions: list[int], last_offsets: dict[int, int]
    ) -> list[SinkItem]:
        # Resume points once the sink has these outputs delivered.
        for partition, last in last_offsets.items():
            outputs.append(OffsetMark(partition, last + 1))
        return outputs

    def after_commit(self, stores: Mapping[int, SessionStore]) -> None:
        """Stop if the broker refused a change or another process claimed one of ``stores``
        later; rewrite what an older claimant wrote into them."""
        writer = self._changelog
        if writer is None or (not writer.intrusions and writer.refused is None):
            return
        for partition, store in stores.items():
            writer.resolve(partition, store.resend)

    def after_sweep(self, store: SessionStore) -> None:
        pass  # its removals went to the changelog with the sweep's own write

    def sink(self, workers: Workers) -> DynamicSink[SinkItem]:
        return OutputSink(self._settings, workers)

    def close_shard(self, partition: int, store: SessionStore) -> None:
        pass  # every write is in the store and queued for the changelog already

    def close(self) -> None:
        if self._changelog is not None:
            left = self._changelog.flush()
            if left:
                log.warning("%d changelog records were not delivered", left)


class _Progress(PartitionProgress):
    """A partition's snapshots never pass an event whose outputs Kafka has yet to acknowledge."""

    def __init__(
        self, worker: WorkerContext, partition: int, offset: int, recovery_store: bool
    ) -> None:
        self._worker = worker
        self._partition = partition
        self._recovery_store = recovery_store
        self._snapshots: deque[int] = deque(maxlen=SNAPSHOTS_UNTIL_COMMITTED)
        worker.delivered[partition] = offset
        # Without a recovery store every run reads from the start: no tail can cover that.
        worker.replay_floors[partition] = max(offset, 0) if recovery_store else NO_REPLAY

    def on_poll(self) -> None:
        pass  # progress moves with the sink's acknowledgements, not with polls

    def may_stop(self, read_to: int) -> bool:
        # The end waits for the outputs of what was read.
        worker = self._worker
        worker.take_reports()
        return worker.delivered_through(self._partition, read_to) >= read_to

    def snapshot(self, read_to: int) -> int:
        worker = self._worker
        worker.take_reports()
        offset = worker.delivered_through(self._partition, read_to)
        if self._recovery_store:
            self._snapshots.append(offset)
            if len(self._snapshots) == SNAPSHOTS_UNTIL_COMMITTED:
                worker.replay_floors[self._partition] = self._snapshots[0]
        return offset
