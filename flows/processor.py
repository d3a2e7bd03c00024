"""The work done on every event: parse → state → candidates and score → emit.

One ``EventProcessor`` per Bytewax worker thread turns a micro-batch of Kafka
records (whatever arrived together) into output records: a recommendation per
valid event, a dead letter per invalid one.  Sessions are kept per Kafka
partition: producers key events by user, so one user's events arrive, in
order, on one partition, which Bytewax reads on exactly one worker.  The
session store of a partition therefore needs no exchange between workers and
moves with its partition when the number of workers or processes changes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import cast

from confluent_kafka import Message

from streamrec.contracts import (
    ContractError,
    DeadLetter,
    Event,
    ForgetRequest,
    encode_recommendation,
    parse_message,
)
from streamrec.flows import metrics
from streamrec.flows.models import ModelSet, ModelWatcher, load_model_set, parse_variants
from streamrec.flows.output import OutputRecord, SinkItem
from streamrec.flows.stores import PartitionStores
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.model.serving import Prepared
from streamrec.settings import Settings
from streamrec.state.store import Erasure, SessionStore

log = logging.getLogger(__name__)

# Expired sessions are swept a few hundred keys at a time, once per interval of
# wall time, so the sweep never holds up the events behind it.
SWEEP_INTERVAL_S = 5.0
SWEEP_MAX_KEYS = 256


class EventProcessor:
    """Turns one worker's micro-batches of records into recommendations and dead letters."""

    def __init__(
        self,
        settings: Settings,
        stores: PartitionStores,
        models: ModelSet,
        worker: WorkerContext,
        watcher: ModelWatcher | None = None,
    ):
        self._settings = settings
        self._worker = worker
        self._stores = stores
        self._models = models
        self._watcher = watcher
        self._generation = 0
        self._events_topic = settings.events_topic
        self._recommendations_topic = settings.recommendations_topic
        self._dlq_topic = settings.dlq_topic
        self._max_bytes = settings.max_event_bytes
        self._skew_ms = round(settings.event_time_skew_s * 1000)
        self._session_length = settings.session_length
        self._top_k = settings.top_k
        self._learn_online = settings.online_candidates
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        # How busy this worker is decides whether its source fills micro-batches.
        self._pacer = worker.pacer
        # The stores of the partitions this worker reads: it alone uses them.
        self._own: dict[int, SessionStore] = {}
        # Where the outputs and the progress go (flows/guarantee/).
        self._guarantee = stores.guarantee
        self._reported_reads = (0, 0)
        self._cache_reads = metrics.SESSION_READS.labels("cache")
        self._rocksdb_reads = metrics.SESSION_READS.labels("rocksdb")

    def process(self, records: list[Message]) -> list[SinkItem]:
        """All outputs for one micro-batch: its dead letters, then its recommendations, in order."""
        began = self._pacer.now()
        out = self._process(records)
        self._pacer.worked(began, self._pacer.now())
        return out

    def _process(self, records: list[Message]) -> list[SinkItem]:
        received_ms = time.time() * 1000.0
        watcher = self._watcher
        if watcher is not None and watcher.generation != self._generation:
            self._take_new_models(watcher)
        started = time.perf_counter()
        batch = self._apply(records, int(received_ms) + self._skew_ms)
        # Before anything is emitted: a batch lost to a crash has no output and is read again.
        self._commit()
        state_done = time.perf_counter()
        if batch.events:
            self._answer(batch, received_ms, state_done)
            # The recommendations follow the dead letters in the outputs.
            batch.out_partitions += batch.event_partitions
        metrics.PARSE_SECONDS.observe(batch.parse_s)
        metrics.STATE_SECONDS.observe(state_done - started - batch.parse_s)
        out = self._guarantee.after_batch(batch.out, batch.out_partitions, batch.last_offsets)
        if time.monotonic() >= self._next_sweep:
            self._sweep()
        return out

    def _apply(self, records: list[Message], latest_ts_ms: int) -> _MicroBatch:
        """Parse each record and stage it in its user's session; dead letters for the invalid."""
        recommenders = self._models.recommenders
        batch = _MicroBatch()
        out = batch.out
        last_offsets = batch.last_offsets
        out_partitions = batch.out_partitions
        event_partitions = batch.event_partitions
        events = batch.events
        keys = batch.keys
        prepared = batch.prepared
        picks = batch.picks
        split = len(recommenders) > 1
        top_k = self._top_k
        parse_s = 0.0
        for record in records:
            t0 = time.perf_counter()
            key = record.key()
            try:
                parsed = parse_message(record.value(), key, self._max_bytes, latest_ts_ms)
            except ContractError as err:
                out.append(self._dead_letter(record, err))
                partition = cast(int, record.partition())
                last_offsets[partition] = cast(int, record.offset())
                out_partitions.append(partition)
                continue
            finally:
                parse_s += time.perf_counter() - t0
            # Records from the consumer always carry their partition and offset.
            partition = cast(int, record.partition())
            offset = last_offsets[partition] = cast(int, record.offset())
            store = self._own.get(partition)
            if store is None:
                store = self._own[partition] = self._stores.get(partition)
                store.replay_floor = self._replay_floor(partition, store)
            if isinstance(parsed, ForgetRequest):
                self._forget(store, parsed, partition, offset)
                continue
            # Written by the commit, once for the whole micro-batch.
            result = store.stage(parsed, partition, offset)
            session = result.session
            if result.applied:
                # Sessions are immutable: a later event of the same user in this
                # batch makes a new one, so no copy is needed.
                history = session.item_ids
                if self._learn_online:
                    for recommender in recommenders:
                        recommender.learn(history, parsed.user_id)
            else:
                # Read again after a restart: answered as it was first, from the session as
                # of this event, never from a newer one (which may have moved past it).
                metrics.DUPLICATES.inc()
                history = session.item_ids_as_of(offset, self._session_length, store.ttl_ms)
            events.append(parsed)
            event_partitions.append(partition)
            keys.append(key)
            user = parsed.user_id
            pick = self._models.pick(user) if split else 0
            picks.append(pick)
            # The hashes of what the user consumed beyond the window: never recommended.
            prepared.append(recommenders[pick].prepare(history, top_k, store.consumed(user), user))
        batch.parse_s = parse_s
        return batch

    def _commit(self) -> None:
        """The micro-batch's writes, one per shard; then whatever its guarantee does with them."""
        for partition, store in self._own.items():
            store.commit()
            store.replay_floor = self._replay_floor(partition, store)
            if store.counters.quarantined:
                self._report_quarantined(store)
        self._guarantee.after_commit(self._own)
        self._report_reads()

    def _answer(self, batch: _MicroBatch, received_ms: float, state_done: float) -> None:
        """Score the micro-batch's events and add a recommendation for each to its outputs."""
        recommenders = self._models.recommenders
        events = batch.events
        if len(recommenders) == 1:
            ranked = recommenders[0].answer(batch.prepared, self._top_k)
            versions = [recommenders[0].version] * len(events)
        else:
            ranked, versions = self._answer_split(batch.prepared, batch.picks)
        scored = time.perf_counter()
        emitted_ms = time.time() * 1000.0
        topic = self._recommendations_topic
        out = batch.out
        for event, key, items, model in zip(events, batch.keys, ranked, versions, strict=True):
            value = encode_recommendation(
                event.event_id, event.user_id, items, model, event.ts, received_ms, emitted_ms
            )
            out.append((topic, key, value, None))
        metrics.EVENTS.inc(len(events))
        metrics.RECOMMENDATIONS.inc(len(events))
        metrics.BATCH_SIZE.observe(len(events))
        metrics.SCORE_SECONDS.observe(scored - state_done)
        metrics.EMIT_SECONDS.observe(time.perf_counter() - scored)

    def _answer_split(
        self, prepared: list[Prepared], picks: list[int]
    ) -> tuple[list[list[tuple[str, float]]], list[str]]:
        """Each event answered by its user's variant, one call per variant; results in order."""
        ranked: list[list[tuple[str, float]]] = [[] for _ in prepared]
        versions = [""] * len(prepared)
        for variant, recommender in enumerate(self._models.recommenders):
            rows = [row for row, pick in enumerate(picks) if pick == variant]
            if not rows:
                continue
            answers = recommender.answer([prepared[row] for row in rows], self._top_k)
            for row, answer in zip(rows, answers, strict=True):
                ranked[row] = answer
                versions[row] = recommender.version
        return ranked, versions

    def _take_new_models(self, watcher: ModelWatcher) -> None:
        generation, models = watcher.take()
        self._generation = generation
        if models is not None:
            self._models = models

    def _forget(
        self, store: SessionStore, request: ForgetRequest, partition: int, offset: int
    ) -> None:
        erasure = store.forget(request.user_id, partition, offset)
        if erasure is Erasure.ERASED:
            metrics.FORGOTTEN.inc()
        elif erasure is Erasure.ALREADY_APPLIED:
            metrics.FORGETS_REPLAYED.inc()
        else:
            metrics.FORGETS_FOUND_NOTHING.inc()
            # The offset finds the request again; the user id stays out of the log.
            log.info(
                "a forget request found nothing to erase (%s partition %d offset %d)",
                self._events_topic,
                partition,
                offset,
            )

    def _dead_letter(self, record: Message, err: ContractError) -> OutputRecord:
        metrics.DEAD_LETTERS.labels(err.code).inc()
        letter = DeadLetter(
            key=record.key(),
            raw=record.value(),
            code=err.code,
            message=str(err),
            topic=record.topic() or self._events_topic,
            partition=cast(int, record.partition()),
            offset=cast(int, record.offset()),
        )
        return (self._dlq_topic, letter.key, letter.raw, letter.headers())

    def _sweep(self) -> None:
        started = time.perf_counter()
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        # Each store judges expiry by its own clock, which no single user can move.
        for store in self._own.values():
            removed = store.sweep_expired(None, SWEEP_MAX_KEYS)
            if removed:
                metrics.EXPIRED.inc(removed)
            self._guarantee.after_sweep(store)
            if store.counters.quarantined:
                self._report_quarantined(store)
        if self._settings.gc_freeze:
            # Cached sessions and the model live long and hold no cycles: out of the cyclic
            # collector's full scans, which would otherwise walk them all (hundreds of ms).
            gc.collect(1)
            gc.freeze()
        metrics.SWEEP_SECONDS.observe(time.perf_counter() - started)

    def _replay_floor(self, partition: int, store: SessionStore) -> int:
        return self._guarantee.replay_floor(self._worker, partition, store)

    def _report_quarantined(self, store: SessionStore) -> None:
        for user in store.counters.quarantined:
            metrics.QUARANTINED.inc()
            log.warning(
                "the session record of user %r (shard %d) could not be read; it was moved "
                "aside (key q:<user id> of the shard DB) and the user starts afresh",
                user,
                store.shard_index,
            )
        store.counters.quarantined.clear()

    def _report_reads(self) -> None:
        # Counted by the stores for free; published once per micro-batch, not per event.
        hits = misses = 0
        for store in self._own.values():
            hits += store.counters.cache_hits
            misses += store.counters.cache_misses
        self._cache_reads.inc(hits - self._reported_reads[0])
        self._rocksdb_reads.inc(misses - self._reported_reads[1])
        self._reported_reads = (hits, misses)


class _MicroBatch:
    """What applying one micro-batch leaves for its answers and its guarantee."""

    __slots__ = (
        "event_partitions",
        "events",
        "keys",
        "last_offsets",
        "out",
        "out_partitions",
        "parse_s",
        "picks",
        "prepared",
    )

    def __init__(self) -> None:
        # Outputs (the dead letters, then the recommendations), and each one's events partition.
        self.out: list[SinkItem] = []
        self.out_partitions: list[int] = []
        # The last offset read of each events partition.
        self.last_offsets: dict[int, int] = {}
        # Per event answered: the event, its partition, its key, what its answer reads (taken
        # after its own update and before any later one) and the variant that answers it.
        self.events: list[Event] = []
        self.event_partitions: list[int] = []
        self.keys: list[bytes | None] = []
        self.prepared: list[Prepared] = []
        self.picks: list[int] = []
        self.parse_s = 0.0


def processor_factory(
    settings: Settings,
    stores: PartitionStores,
    variant: str | None,
    workers: Workers,
    loaded: ModelSet | None = None,
    watcher: ModelWatcher | None = None,
) -> Callable[[list[Message]], list[SinkItem]]:
    """A batch function for ``flat_map_batch`` that gives each worker its own processor.

    Each worker gets its own models: a ``Recommender`` reuses its input buffers
    between calls, so it must not be shared between threads.  ``loaded`` is
    handed to the first worker that asks; ``watcher`` brings new artifacts
    (``flows/models.py``).  Each processor shares its worker's context
    (``flows/worker.py``): the pacer and the replay floors, with the source.
    """
    processors: dict[WorkerContext, EventProcessor] = {}
    spare = [loaded] if loaded is not None else []
    lock = threading.Lock()

    def process(records: list[Message]) -> list[SinkItem]:
        worker = workers.current()
        processor = processors.get(worker)
        if processor is None:
            with lock:
                try:
                    models = spare.pop()
                except IndexError:
                    models = load_model_set(settings.model_dir, parse_variants(variant), settings)
                    log.info("a worker loaded its own copy of the model (%d workers)", len(workers))
                processor = processors[worker] = EventProcessor(
                    settings, stores, models, worker, watcher
                )
        return processor.process(records)

    return process
