"""The sessions' changelog: a compacted Kafka topic from which any machine can rebuild a shard.

Shard ``p`` (the users of events partition ``p``) writes to changelog
partition ``p``.  Every commit of the store sends the sessions it changed
(key: the user id, value: the session record), the chunks of consumed-items
records its new items went into (``state/consumed_chunks.py``: a heavy rater's
record is not sent whole again) and ends with a *marks* record
naming the last events offset the shard has applied and the events topic's id;
an erasure, an expiry or a quarantined record sends a tombstone, so a removed
user never comes back from the changelog.  Compaction keeps the latest record
of each key, so the topic stays about as large as the state.  A user's
successive session records differ by one interaction, so the producer batches
them for a while and compresses the batches (``changelog_linger_ms``,
``changelog_compression``): the broker stores a fraction of the bytes
(``streamrec bench changelog`` measures it).

A shard whose local store is missing, or behind the changelog's marks (another
machine served the partition since, or this one stopped uncleanly before it
recorded its progress), is rebuilt from the changelog before its events are
read, and its events are then read from no later than the marks' offset + 1:
state and resume point cannot disagree.  The producer is idempotent and never
gives up on a record (``message.timeout.ms=0``), so the changelog of a
partition is a gapless prefix of its commits; when it lags behind the local
store, that store is used as it is, and a rebuild elsewhere replays the rest.

In exactly-once mode (``flows/guarantee/transactions.py``) each micro-batch's changes,
outputs and marks commit in one Kafka transaction; the marks then also carry
the next events offset to read (``next``) and the shard's ``version``, the
number of committed transactions that changed it, which the local store stamps
on every write: a store whose stamp differs from the changelog's holds writes
that were never committed (or misses some) and is rebuilt.  The changelog is
read ``read_committed``, so an aborted transaction never reaches a store.

>>> decode_marks(encode_marks(Marks(applied=41, events_topic_id="t-1")))
Marks(applied=41, events_topic_id='t-1', next=None, version=None, writer='', generation=None)
>>> record_kind(b"u1", b"..."), record_kind(MARKS_KEY, b"{}"), record_kind(b"u1", None)
('session', 'marks', 'tombstone')
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Final, NamedTuple

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from streamrec.kafka_clients import (
    NOT_ALLOWED,
    KafkaRefused,
    KafkaUnavailable,
    changelog_producer_config,
    consumer_config,
    watermark_offsets,
)
from streamrec.settings import Settings
from streamrec.state.errors import StateError
from streamrec.state.keys import CHANGELOG_CONSUMED_TAG
from streamrec.state.layout import shard_dir
from streamrec.state.store import ChangeListener, SessionStore, Stamp

log = logging.getLogger(__name__)

# Not valid UTF-8, so never the key of a user (user ids are text).
MARKS_KEY: Final = b"\xff\xfestreamrec.marks"
# How far back from its end the last marks record of a partition is looked for, at first.
MARKS_SEARCH: Final = 256
READ_TIMEOUT_S: Final = 10.0
# How long a changelog partition without a leader (a broker restarting) is waited for.
BROKER_PATIENCE_S: Final = 60.0
# The ``applied`` of a claim's marks when the shard has applied nothing yet.
NOTHING_APPLIED: Final = -1
# How long a claim waits for its marks to land before the shard is read.
CLAIM_WAIT_S: Final = 30.0


class ChangelogError(StateError):
    """The changelog cannot be read, or belongs to another events topic."""


class ChangelogTaken(ChangelogError):
    """Another process claimed this shard's changelog partition after this one: it serves it."""


@dataclass(frozen=True, slots=True)
class Marks:
    """A shard's progress as the changelog knows it: the last events offset applied.

    Exactly-once marks add ``next``, the first events offset whose outputs are not
    committed (where reading resumes), and the shard's ``version``.
    """

    applied: int
    events_topic_id: str
    next: int | None = None
    version: int | None = None
    # Exactly once: the writer (transactional producer) whose commit made ``version``; at
    # least once: the process that wrote these marks, and the generation of its claim.
    writer: str = ""
    generation: int | None = None

    @property
    def stamp(self) -> Stamp:
        """What a store holding exactly this version is stamped with."""
        return Stamp(self.version or 0, self.writer)


def encode_marks(marks: Marks) -> bytes:
    doc: dict[str, int | str] = {"applied": marks.applied, "events_topic_id": marks.events_topic_id}
    if marks.next is not None:
        doc["next"] = marks.next
    if marks.version is not None:
        doc["version"] = marks.version
    if marks.writer:
        doc["writer"] = marks.writer
    if marks.generation is not None:
        doc["generation"] = marks.generation
    return orjson.dumps(doc)


def decode_marks(raw: bytes) -> Marks:
    doc = orjson.loads(raw)
    next_offset, version = doc.get("next"), doc.get("version")
    return Marks(
        int(doc["applied"]),
        str(doc["events_topic_id"]),
        None if next_offset is None else int(next_offset),
        None if version is None else int(version),
        str(doc.get("writer", "")),
        None if doc.get("generation") is None else int(doc["generation"]),
    )


def record_kind(key: bytes, value: bytes | None) -> str:
    """What a changelog record is: ``marks`` (progress, claims), ``session``, ``consumed``
    (a consumed-items record) or ``tombstone`` (a removal)."""
    if key == MARKS_KEY:
        return "marks"
    if value is None:
        return "tombstone"
    return "consumed" if key.startswith(CHANGELOG_CONSUMED_TAG) else "session"


def restore_consumer(settings: Settings) -> Consumer:
    """A consumer of the changelog that sees committed records only, and says where it ends."""
    return Consumer(
        consumer_config(settings, group="streamrec-restore")
        | {"isolation.level": "read_committed", "enable.partition.eof": "true"}
    )


class ChangelogWriter:
    """Sends each shard's committed changes to its changelog partition; one per process.

    ``send`` returns at once (the producer delivers in the background, in order,
    retrying for as long as it takes); when librdkafka's queue is full it waits,
    which holds the flow back rather than dropping a change.

    At least once there are no transactions to fence a second process that serves
    the same shards (a duplicate deployment, a machine thought dead): instead every
    marks record carries this process's ``writer`` token and the ``generation`` of
    its claim (one more than the latest marks it found when it opened the shard),
    and one producer's records land on consecutive offsets, so a hole between two
    of them is another writer's records (``intrusions``).  ``resolve`` reads them:
    if that writer claimed later, this process stops (``ChangelogTaken``); if earlier,
    it is the stale one, and this process writes its own records of the keys again.
    A record the broker refuses would leave a rebuilt shard wrong: it stops the flow.
    """

    def __init__(self, settings: Settings, events_topic_id: str) -> None:
        self.topic = settings.sessions_changelog
        self._settings = settings
        self._events_topic_id = events_topic_id
        # Per partition: the last events offset whose marks the broker has acknowledged.
        self.durable: dict[int, int] = {}
        self.writer = secrets.token_hex(8)
        self.generations: dict[int, int] = {}
        # Per partition: where this producer's next record should land, and the holes
        # other writers' records made since (first offset, end), until ``resolve``.
        self._next_offset: dict[int, int] = {}
        self.intrusions: dict[int, list[tuple[int, int]]] = {}
        self.refused: KafkaError | None = None
        # Key and value bytes handed to the producer, and records, by ``record_kind``.
        self.produced_bytes: Counter[str] = Counter()
        self.produced_records: Counter[str] = Counter()
        self._producer = Producer(
            {
                **changelog_producer_config(settings),
                # Never give up on a change: a gap would make a rebuilt shard wrong.
                "message.timeout.ms": "0",
                "error_cb": self._on_error,
            }
        )

    def claim(self, partition: int, marks: Marks | None) -> None:
        """Take changelog ``partition`` after its latest ``marks``: a generation later.

        The claim is written at once, as marks of its own (the changelog's progress
        unchanged), and waited for: a process that claimed the partition before
        then finds it on its next write even if it had written nothing yet, and a
        later claimant reads this generation, not the one before it.
        """
        latest = 0 if marks is None or marks.generation is None else marks.generation
        generation = self.generations[partition] = latest + 1
        claim = Marks(
            NOTHING_APPLIED if marks is None else marks.applied,
            self._events_topic_id,
            writer=self.writer,
            generation=generation,
        )
        self._produce(partition, MARKS_KEY, encode_marks(claim))
        self._producer.flush(CLAIM_WAIT_S)

    def send(
        self, partition: int, changes: Iterable[tuple[bytes, bytes | None]], applied: int | None
    ) -> None:
        """``changes``: (user id, session record, or None for a removal) of one commit."""
        for key, value in changes:
            self._produce(partition, key, value)
        if applied is not None:
            marks = encode_marks(
                Marks(
                    applied,
                    self._events_topic_id,
                    writer=self.writer,
                    generation=self.generations.get(partition, 1),
                )
            )
            self._produce(partition, MARKS_KEY, marks, partial(self._marks_delivered, applied))
        self._producer.poll(0)

    def _marks_delivered(self, applied: int, err: KafkaError | None, message: Message) -> None:
        self._on_delivery(err, message)
        if err is None:
            partition = message.partition()
            if partition is not None and applied > self.durable.get(partition, -1):
                self.durable[partition] = applied

    def _produce(
        self,
        partition: int,
        key: bytes,
        value: bytes | None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        kind = record_kind(key, value)
        self.produced_bytes[kind] += len(key) + (0 if value is None else len(value))
        self.produced_records[kind] += 1
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value,
                    key,
                    partition=partition,
                    on_delivery=on_delivery or self._on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.5)  # the queue is full: let it drain

    def _on_delivery(self, err: KafkaError | None, message: Message) -> None:
        if err is not None:  # with no timeout, only a refusal of the record itself lands here
            self.refused = self.refused or err
            log.error("a changelog record was refused: %s", err.str())
            return
        partition, offset = message.partition(), message.offset()
        if partition is None or offset is None:
            return
        expected = self._next_offset.get(partition)
        if expected is not None and offset > expected:
            self.intrusions.setdefault(partition, []).append((expected, offset))
        self._next_offset[partition] = offset + 1

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("the changelog producer failed: %s", err.str())

    def resolve(self, partition: int, resend: Callable[[set[bytes]], None]) -> None:
        """Judge the other writers' records found in ``partition``; ``resend``: write this
        process's own records of the keys they wrote again (it is the rightful writer)."""
        if self.refused is not None:
            if self.refused.code() in NOT_ALLOWED:
                raise KafkaRefused(
                    f"not allowed to write changelog {self.topic!r} ({self.refused.name()}): "
                    "the cluster's ACLs must let this client write it"
                )
            raise ChangelogError(
                f"changelog {self.topic!r} refused a record ({self.refused.str()}): a shard "
                "rebuilt from it would be wrong; check the topic's max.message.bytes"
            )
        holes = self.intrusions.pop(partition, [])
        if not holes:
            return
        mine = (self.generations.get(partition, 1), self.writer)
        keys: set[bytes] = set()
        consumer = restore_consumer(self._settings)
        try:
            for start, end in holes:
                for key, value, _ in _read(consumer, self.topic, partition, start, end):
                    if key != MARKS_KEY:
                        keys.add(key)
                        continue
                    if value is None:
                        continue
                    theirs = decode_marks(value)
                    if theirs.writer and (theirs.generation or 0, theirs.writer) > mine:
                        raise ChangelogTaken(
                            f"another process took shard {partition}: it writes changelog "
                            f"{self.topic!r} partition {partition} too, and claimed it later "
                            f"(generation {theirs.generation}, this process's {mine[0]}). "
                            "This process stops; it must not serve the same partitions as "
                            "another (give each its own events partitions, or run one)"
                        )
        finally:
            consumer.close()
        log.warning(
            "another process wrote %d records into changelog %r partition %d (an older claim: "
            "it will stop); writing them again",
            len(keys),
            self.topic,
            partition,
        )
        resend(keys)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for the changes in flight; how many are still undelivered."""
        return int(self._producer.flush(timeout_s))


def latest_marks(settings: Settings, partition: int) -> Marks | None:
    """The last marks record of changelog ``partition``, or None if it has none."""
    topic = settings.sessions_changelog
    consumer = restore_consumer(settings)
    try:
        low, high = watermark_offsets(consumer, topic, partition, BROKER_PATIENCE_S)
        search = MARKS_SEARCH
        while True:
            start = max(low, high - search)
            found = None
            for key, value, _ in _read(consumer, topic, partition, start, high):
                if key == MARKS_KEY and value is not None:
                    found = value
            if found is not None:
                return decode_marks(found)
            if start <= low:
                return None
            search *= 4
    finally:
        consumer.close()


def changelog_records(
    settings: Settings, partition: int
) -> Iterator[tuple[bytes, bytes | None, int]]:
    """(key, value, offset) of every record of changelog ``partition``, up to its end as of now."""
    topic = settings.sessions_changelog
    consumer = restore_consumer(settings)
    try:
        low, high = watermark_offsets(consumer, topic, partition, BROKER_PATIENCE_S)
        yield from _read(consumer, topic, partition, low, high)
    finally:
        consumer.close()


def _read(
    consumer: Consumer, topic: str, partition: int, start: int, end: int
) -> Iterator[tuple[bytes, bytes | None, int]]:
    if start >= end:
        return
    consumer.assign([TopicPartition(topic, partition, start if start > 0 else OFFSET_BEGINNING)])
    deadline = time.monotonic() + READ_TIMEOUT_S
    while True:
        records = consumer.consume(1000, 0.5)
        if not records and time.monotonic() > deadline:
            # The broker stalled (or left) in the middle: a later start may well finish.
            raise KafkaUnavailable(
                f"changelog {topic!r} partition {partition}: no record arrived for "
                f"{READ_TIMEOUT_S:g} s before its end ({end}); the shard is rebuilt again "
                "on the next start"
            )
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    # The end of what is committed: transaction markers, never
                    # delivered, may fill the offsets up to ``end``.
                    return
                raise _read_failure(topic, error)
            offset = record.offset()
            key = record.key()
            if offset is None or key is None:
                continue
            if offset >= end:
                return
            yield key, record.value(), offset
            if offset + 1 >= end:
                return
        if records:
            deadline = time.monotonic() + READ_TIMEOUT_S


def _read_failure(topic: str, error: KafkaError) -> Exception:
    """What a changelog read that failed is: refused (78), passing (69), or the data (65)."""
    what = f"reading changelog {topic!r}: {error.str()}"
    if error.code() in NOT_ALLOWED:
        return KafkaRefused(f"{what}: the cluster's ACLs must let this client read it")
    if error.retriable() or error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
        return KafkaUnavailable(what)
    return ChangelogError(what)


class OpenedShard(NamedTuple):
    """A shard as opened: its store, the changelog's latest marks, whether it was rebuilt."""

    store: SessionStore
    marks: Marks | None
    rebuilt: bool


def open_shard(
    settings: Settings,
    partition: int,
    shard_count: int,
    writer: ChangeListener,
    events_topic_id: str,
    exactly_once: bool = False,
) -> OpenedShard:
    """Open shard ``partition``, rebuilt from the changelog first if its store is behind it.

    The store's changes go to ``writer``.  At least once, a local store at or past
    the changelog's marks is used as it is; a rebuilt one must read its events
    again from ``marks.applied + 1`` at the latest.  Exactly once, the local store
    is used only if its version stamp equals the changelog's (it holds exactly
    what was committed); a rebuilt one is stamped with the version it restored.
    Nothing is written to the store until its caller takes it: exactly once, the
    partition's transactions (``flows/guarantee/transactions.py``) stamp every
    later write with the version being built.
    """
    store = SessionStore.open(settings.state_dir, partition, shard_count, settings)
    try:
        marks = latest_marks(settings, partition)
        if marks is not None and marks.events_topic_id != events_topic_id:
            raise ChangelogError(
                f"changelog {settings.sessions_changelog!r} was written for another "
                f"incarnation of the events topic (id {marks.events_topic_id}, now "
                f"{events_topic_id}): delete and recreate the changelog topic, and start "
                "afresh with `streamrec state reset`"
            )
        local = store.applied_offset(partition)
        if exactly_once:
            committed = Stamp(0) if marks is None else marks.stamp
            version = store.version()
            # A store stamps the version it is building before that version commits, so a
            # store one version ahead of the changelog was stopped before a commit; with no
            # marks at all, further ahead means the changelog lost what was committed.
            if marks is None and version is not None and version.version > 1:
                raise ChangelogError(
                    f"shard {partition} was written exactly-once up to changelog version "
                    f"{version.version}, but {settings.sessions_changelog!r} has no marks: it was "
                    "deleted or recreated since. Start afresh with `streamrec state reset`"
                )
            # A store never written exactly-once (None) is as current as at-least-once knows.
            current = version == committed if version is not None else _at_least(local, marks)
        else:
            current = _at_least(local, marks)
        lost_writes = store.lost_writes
        if current and not lost_writes:
            store.changes = writer
            return OpenedShard(store, marks, rebuilt=False)
    except BaseException:
        store.close()
        raise
    store.close()
    shutil.rmtree(shard_dir(settings.state_dir, partition))
    store = SessionStore.open(settings.state_dir, partition, shard_count, settings)
    started = time.monotonic()
    if lost_writes:
        why = "lost its latest writes: its process stopped without closing it, and it keeps no log"
    else:
        why = "is missing" if local is None else f"is at offset {local}"
    applied = None if marks is None else marks.applied
    log.info(
        "rebuilding shard %d from %r (its local store %s; the changelog at %s)",
        partition,
        settings.sessions_changelog,
        why,
        applied,
    )
    if exactly_once:
        store.stamp = Stamp(0) if marks is None else marks.stamp  # exactly what it restores
    records = changelog_records(settings, partition) if marks is not None else iter(())
    sessions = store.restore(
        ((key, value) for key, value, _ in records if key != MARKS_KEY), applied
    )
    resume = 0 if marks is None else marks.next if marks.next is not None else marks.applied + 1
    log.info(
        "shard %d rebuilt: %d session records in %.1f s; reading its events from offset %d at "
        "the latest",
        partition,
        sessions,
        time.monotonic() - started,
        resume,
    )
    store.changes = writer
    return OpenedShard(store, marks, rebuilt=True)


def _at_least(local: int | None, marks: Marks | None) -> bool:
    if marks is None or marks.applied == NOTHING_APPLIED:  # a claim before anything was applied
        return True
    return local is not None and local >= marks.applied
