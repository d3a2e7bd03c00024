"""The session store of one shard (one partition of the events topic): every event uses it.

>>> import tempfile
>>> from streamrec.contracts import Event
>>> from streamrec.settings import Settings
>>> store = SessionStore.open(Path(tempfile.mkdtemp()), 0, 1, Settings())
>>> event = Event("e1", "u1", "i9", "view", 1_700_000_000_000)
>>> store.apply(event, partition=0, offset=7).applied
True
>>> store.apply(event, partition=0, offset=7).applied  # replayed after a crash
False
>>> store.get("u1").item_ids, store.counters.duplicates
(['i9'], 1)
>>> store.stage(Event("e2", "u1", "i4", "view", 1_700_000_000_500), 0, 8).session.item_ids
['i9', 'i4']
>>> store.commit()  # the micro-batch's writes, in one atomic batch
1
>>> store.close()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Protocol, cast

import numpy as np
from rocksdict import Rdict, WriteBatch

from streamrec.contracts import Event
from streamrec.lru import MB, SizedLRU
from streamrec.settings import Settings
from streamrec.state.consumed import ConsumedItems, parse_types
from streamrec.state.consumed_chunks import (
    MAX_CAP,
    ConsumedUpdate,
    assembled,
    chunk_value,
    consumed_update,
    is_chunk_key,
    parse_chunk_key,
    put_aside,
    removal,
    whole_value,
)
from streamrec.state.erasure import (
    Erasure,
    delete_session,
    erase,
    holds_later,
    quarantine,
    read_as_stored,
    records_of,
    scrub,
)
from streamrec.state.errors import CorruptSessionError, StateWriteError
from streamrec.state.expiry import NO_CLOCK, SWEEP_BATCH_DEFAULT, Expiry, read_voters, wall_clock_ms
from streamrec.state.keys import (
    APPLIED_PREFIX,
    CHANGELOG_CONSUMED_TAG,
    CONSUMED_PREFIX,
    OPEN_KEY,
    SESSION_PREFIX,
    SHAPE_KEY,
    VERSION_KEY,
    applied_key,
    consumed_key_of,
    session_key,
    user_of,
)
from streamrec.state.layout import check_shard_record, ensure_layout, shard_dir, shard_record
from streamrec.state.memory import session_bytes
from streamrec.state.rocks import (
    CLOCK,
    ShardStats,
    damaged,
    is_corruption,
    open_read_write,
    read_clock,
    read_record,
    scan_stats,
    session_bounds,
    write_options,
)
from streamrec.state.session import EVENT_TYPES, NO_REPLAY, Session, decode_session, encode_session

# A session's replay tail holds at most this many windows' worth of interactions.
REPLAY_TAIL_WINDOWS: Final = 2
_PREFIX_LEN: Final = len(SESSION_PREFIX)
_CONSUMED_LEN: Final = len(CONSUMED_PREFIX)
_OFFSET_VALUE: Final = CLOCK  # one signed 64-bit integer, as the clock


class ChangeListener(Protocol):
    """Where a store sends each commit's changes (the changelog): never blocks for long."""

    def send(
        self, partition: int, changes: Iterable[tuple[bytes, bytes | None]], applied: int | None
    ) -> None: ...


class Stamp(NamedTuple):
    """Exactly once: the changelog version a write belongs to, and the writer that makes it.

    Versions count the committed transactions that changed the shard; the writer
    (a random token per transactional producer) tells apart two processes that
    each made "version V+1", one of them fenced before it could commit.
    """

    version: int
    writer: str = ""


class ApplyResult(NamedTuple):
    """The session after ``apply``, and whether the event changed it (False: a duplicate)."""

    session: Session
    applied: bool


@dataclass(slots=True)
class StoreCounters:
    """What a store has done since it was opened, for the flow's metrics."""

    applied: int = 0
    duplicates: int = 0
    # Events that found their user's session expired and started a new one.
    restarted: int = 0
    swept: int = 0
    # Sessions read from the in-memory cache (or this micro-batch), and from RocksDB.
    cache_hits: int = 0
    cache_misses: int = 0
    # Unreadable session records moved aside (their users start afresh), newest last.
    quarantined: list[str] = field(default_factory=list)


class SessionStore:
    """The sessions of the users of one events partition, in that shard's own RocksDB.

    Applies events to sessions exactly once per source offset: read, update and
    write back in one atomic batch, the offset stamp inside the session record.
    ``apply`` writes at once; ``stage`` defers the write to the next ``commit``, so
    that a micro-batch costs one write-ahead log append (the flow commits before it
    emits anything, so an event whose write was lost to a crash has no output
    either and is read again).  The latest sessions written stay decoded in memory,
    ``cache_bytes`` of them at most (``streamrec.state.memory`` says what each one
    counts): the store is the DB's only writer, so they are never stale.
    While a crash may still replay events from ``replay_floor`` on (the flow sets
    it), sessions keep the interactions such a replay needs (see
    ``Session.with_event``).

    The store also keeps the last applied offset of each source partition (the
    shard's watermark), written in the same batch as any removal of sessions
    (sweep, erasure, quarantine): an event at or below it is a replay even if its
    user's session has gone since, so no removal can let a replay apply an event
    twice (a session that exists carries its own offsets).

    The store writes every batch itself, so that what belongs together is written
    together, and three collaborators hold the rest: ``streamrec.state.expiry.Expiry``
    decides when sessions expire (the shard's clock, bounded sweeps);
    ``streamrec.state.consumed.ConsumedItems`` keeps the items of consumption events
    (``consumed_types``) under ``c:``, beyond the session's window, staged and
    written with the session; ``streamrec.state.erasure`` says what erasing a user
    (``forget``) and moving an unreadable session aside (``counters.quarantined``)
    remove.  The worker reading the partition uses the store; RocksDB's lock keeps
    any second opener out.  Open it with ``open``.
    """

    def __init__(
        self,
        db: Rdict,
        path: Path,
        shard_index: int,
        session_length: int,
        ttl_ms: int,
        cache_bytes: int = 0,
        skew_ms: int = 24 * 3600 * 1000,
        wall_ms: Callable[[], float] = wall_clock_ms,
        consumed_types: frozenset[str] = frozenset(),
        consumed_cap: int = 0,
        wal: bool = True,
        consumed_cache_bytes: int = 0,
    ) -> None:
        self.shard_index = shard_index
        self.path = path
        self.session_length = session_length
        self.ttl_ms = ttl_ms
        self.counters = StoreCounters()
        # The lowest source offset a crash may still make the flow read again.
        self.replay_floor = NO_REPLAY
        # Told of every commit and removal, after RocksDB has it (the changelog).
        self.changes: ChangeListener | None = None
        # Exactly-once mode: the changelog version every write is stamped with (``version``).
        self.stamp: Stamp | None = None
        self._max_tail = REPLAY_TAIL_WINDOWS * session_length
        self._db = db
        self._wal = wal
        self._write_options = write_options(wal)
        # Without a WAL: whether the last process to open the DB died with it open, losing
        # writes (which the changelog has).  It stays so until the shard is rebuilt.
        self.lost_writes = not wal and db.get(OPEN_KEY) is not None
        if not wal and not self.lost_writes:
            db.put(OPEN_KEY, b"", self._write_options)
            db.flush()  # on disk before any write it guards
        self._expiry = Expiry(
            ttl_ms, shard_index, skew_ms, wall_ms, read_clock(db), read_voters(db)
        )
        self._consumed = ConsumedItems(db, consumed_types, consumed_cap, consumed_cache_bytes)
        self._applied = _read_applied(db)
        self._applied_written = dict(self._applied)
        self._staged_applied: dict[int, int] = {}
        self._cache: SizedLRU[bytes, Session] = SizedLRU(cache_bytes)
        # Staged since the last commit: the sessions by key, their writes, the events.
        self._staged: dict[bytes, Session] = {}
        self._staged_events = 0
        self._closed = False

    @classmethod
    def open(
        cls, state_dir: Path, shard_index: int, shard_count: int, settings: Settings
    ) -> SessionStore:
        """Open shard ``shard_index`` of ``shard_count`` in ``state_dir``.

        The shard index is the events partition whose users it holds, the count the
        events topic's partition count; the number of workers plays no part.
        """
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(
                f"shard index {shard_index} is not in [0, {shard_count}): the index is a "
                "partition of the events topic, the count the topic's partition count"
            )
        if settings.session_length < 1:
            raise ValueError(f"session_length must be at least 1, got {settings.session_length}")
        if not 0 <= settings.consumed_cap <= MAX_CAP:
            raise ValueError(
                f"consumed_cap must be from 0 to {MAX_CAP:,}, got {settings.consumed_cap}"
            )
        consumed_types = parse_types(settings.consumed_types, EVENT_TYPES)
        ensure_layout(state_dir, shard_count)
        path = shard_dir(state_dir, shard_index)
        db = open_read_write(path, round(settings.rocksdb_block_cache_mb * MB))
        try:
            record = db.get(SHAPE_KEY)
            if record is None:
                db.put(SHAPE_KEY, shard_record(shard_index, shard_count))
            else:
                check_shard_record(path, record, shard_index, shard_count)
        except BaseException as err:
            # A damaged table may fail the close as well; the first error says more.
            with contextlib.suppress(Exception):
                db.close()
            if isinstance(err, Exception) and is_corruption(err):
                raise damaged(path, err) from err
            raise
        return cls(
            db,
            path,
            shard_index,
            settings.session_length,
            round(settings.session_ttl_s * 1000),
            round(settings.session_cache_mb * MB),
            round(settings.event_time_skew_s * 1000),
            consumed_types=consumed_types,
            consumed_cap=settings.consumed_cap,
            # With the changelog, RocksDB's own log is a second copy, as in Kafka Streams.
            wal=settings.state_wal or not settings.changelog,
            consumed_cache_bytes=round(settings.consumed_cache_mb * MB),
        )

    def apply(self, event: Event, partition: int, offset: int) -> ApplyResult:
        """Apply ``event``, read at ``offset`` of source ``partition``, unless already applied.

        Written at once, together with anything staged before it.
        """
        result = self.stage(event, partition, offset)
        self.commit()
        return result

    def stage(self, event: Event, partition: int, offset: int) -> ApplyResult:
        """Like ``apply``, but the write waits for ``commit``; reads see it at once."""
        user = event.user_id.encode()
        key = SESSION_PREFIX + user
        stored = self._stored(key, event.user_id)
        result = self._next_session(stored, event, partition, offset)
        if result.applied:
            self._staged[key] = result.session
            restarted = stored is not None and self._expiry.has_expired(stored, event)
            consumed_items = self._consumed
            if restarted or event.type in consumed_items.types:
                consumed_items.stage(CONSUMED_PREFIX + user, event, restarted)
            self._staged_events += 1
            self._staged_applied[partition] = offset
            self._expiry.vote(key, event.ts)
        return result

    def consumed(self, user_id: str) -> np.ndarray:
        """The hashes (``streamrec.state.consumed.item_hash``) of the items ``user_id`` consumed.

        As of their latest event, staged ones included; read-only, oldest first.
        """
        return self._consumed.of(CONSUMED_PREFIX + user_id.encode(), user_id)

    def commit(self) -> int:
        """Write everything staged in one atomic batch; how many events it applied."""
        staged = self._staged
        if not staged:
            return 0
        applied, offsets = self._staged_events, self._staged_applied
        self._staged, self._staged_events, self._staged_applied = {}, 0, {}
        consumed = self._consumed.take_staged()
        if consumed:
            # As the changelog holds each record (in chunks): the record before this batch.
            updates: list[tuple[bytes, ConsumedUpdate]] = [
                (key, consumed_update(key[_CONSUMED_LEN:], read_as_stored(self._db, key), c))
                for key, c in consumed.items()
            ]
        self._applied.update(offsets)
        tick = self._expiry.tick()
        advance = tick != NO_CLOCK
        # On failure nothing was written and nothing cached: the events are simply unapplied.
        try:
            if len(staged) == 1 and not advance and not consumed and self.stamp is None:
                # One session (a quiet stream, or `apply`): RocksDB's Put is a one-entry batch.
                ((key, session),) = staged.items()
                self._db.put(key, encode_session(session), self._write_options)
            else:
                batch = WriteBatch(raw_mode=True)
                for key, session in staged.items():
                    batch.put(key, encode_session(session))
                if consumed:
                    for key, update in updates:
                        if update.record is None:
                            batch.delete(key)
                        else:
                            batch.put(key, update.record)
                if advance:
                    # About once a second of event time: the clock, with what voted for it.
                    self._expiry.put_clock(batch, tick)
                    self._write_marks(batch)
                elif self.stamp is not None:
                    batch.put(VERSION_KEY, _pack_stamp(self.stamp))
                self._db.write(batch, self._write_options)
        except Exception as err:  # rocksdict raises RocksDB's failures as plain Exception
            raise StateWriteError(f"cannot write to shard DB {self.path}: {err}") from err
        if advance:
            self._expiry.advance(tick)
        if self.changes is not None:
            changes: list[tuple[bytes, bytes | None]] = [
                (key[_PREFIX_LEN:], encode_session(s)) for key, s in staged.items()
            ]
            if consumed:
                for _, update in updates:
                    changes += update.changes
            self.changes.send(self.shard_index, changes, self._applied.get(self.shard_index))
        self.counters.applied += applied
        cache = self._cache
        if cache.max_bytes:
            for key, session in staged.items():
                cache.put(key, session, session_bytes(key, session))
        if consumed:
            self._consumed.remember(consumed)
        return applied

    def apply_many(self, records: Iterable[tuple[Event, int, int]]) -> list[ApplyResult]:
        """Apply (event, partition, offset) records in order, with one atomic write for all.

        Cheaper per event than ``apply`` (one write-ahead log append for the batch), and
        the same sessions: a later event of a user builds on the earlier one.
        """
        results = [self.stage(event, partition, offset) for event, partition, offset in records]
        self.commit()
        return results

    def _next_session(
        self, stored: Session | None, event: Event, partition: int, offset: int
    ) -> ApplyResult:
        """The session after ``event``, or ``stored`` unchanged if the event is a duplicate."""
        if offset <= self._applied.get(partition, -1):
            # Below the watermark: applied before, even if the session has gone since.
            self.counters.duplicates += 1
            return ApplyResult(Session.empty(event.user_id) if stored is None else stored, False)
        if stored is None:
            session = Session.empty(event.user_id)
        else:
            applied = stored.offsets.get(partition)
            if applied is not None and offset <= applied:
                self.counters.duplicates += 1
                return ApplyResult(stored, False)
            session = stored
            if self._expiry.has_expired(stored, event):
                # The offsets outlive the expired session, so a replay cannot revive it; its
                # interactions stay for as long as a replay needs them (``replay_floor``).
                session = stored.restarted()
                self.counters.restarted += 1
        return ApplyResult(
            session.with_event(
                event, partition, offset, self.session_length, self.replay_floor, self._max_tail
            ),
            True,
        )

    def get(self, user_id: str, now_ms: int | None = None) -> Session | None:
        """``user_id``'s session, or None if there is none or it expired by ``now_ms``."""
        session = self._stored(session_key(user_id), user_id)
        if session is None:
            return None
        return None if self._expiry.is_expired(session, now_ms) else session

    def forget(
        self,
        user_id: str,
        partition: int | None = None,
        offset: int | None = None,
        purge: bool = True,
    ) -> Erasure:
        """Erase every record of ``user_id``: session, consumed items, a quarantined record.

        A request read at ``offset`` of source ``partition`` is applied once, like an
        event: at or below the shard's watermark, or older than an event the user's
        session already holds, it was applied before (a replay after a restart) and
        must not erase what the user did after it.  Without an offset (an operator's
        erasure) it always applies.  ``purge`` also scrubs the disk: it flushes and
        compacts the user's key range, so that the old versions leave the write-ahead
        log and table files at once (milliseconds: erasure is rare).  RocksDB's
        manifest may still name the key, as a table boundary, until the DB is next
        opened.  The session's offsets go too: the watermark keeps replays of the
        user's old events from being applied again.
        """
        self.commit()  # the user's staged events come before the erasure
        key = session_key(user_id)
        stored = read_as_stored(self._db, key)
        if partition is not None and offset is not None:
            if offset <= self._applied.get(partition, -1) or holds_later(
                key, stored, partition, offset
            ):
                self.counters.duplicates += 1
                return Erasure.ALREADY_APPLIED
            self._applied[partition] = offset
        self._uncache(key)
        self._expiry.unvote(key)
        found = records_of(self._db, key, stored)
        consumed = [read_as_stored(self._db, consumed_key_of(key))]
        batch = WriteBatch(raw_mode=True)
        erase(batch, key)
        self._write_marks(batch)
        self._write(batch)
        if not found:
            return Erasure.NOTHING
        self._removed([key], consumed)
        if purge:
            try:
                scrub(self._db, found)
            except Exception as err:  # a flush or compaction that cannot write
                raise StateWriteError(
                    f"cannot scrub the erased user's records from shard DB {self.path}: {err}"
                ) from err
        return Erasure.ERASED

    def sweep_expired(self, now_ms: int | None = None, max_keys: int = SWEEP_BATCH_DEFAULT) -> int:
        """Look at up to ``max_keys`` sessions after the last sweep's; remove the expired ones."""
        self.commit()  # the sweep reads the DB: it must see this batch's sessions
        batch = WriteBatch(raw_mode=True)
        expired: list[bytes] = []
        sweep = self._expiry.expired_sessions(self._db, now_ms, max_keys, self.replay_floor)
        try:
            for key, unreadable in sweep:
                if unreadable is None:
                    delete_session(batch, key)
                else:
                    quarantine(batch, key, unreadable)
                    self.counters.quarantined.append(user_of(key))
                expired.append(key)
        finally:
            # What was found before a failure goes too: the sweep has moved past it.
            removed = len(expired)
            if len(batch):
                self._write_removal(batch, expired)
                self.counters.swept += removed
        return removed

    def applied_offset(self, partition: int) -> int | None:
        """The offset of the last event this shard applied from ``partition`` (its watermark)."""
        return self._applied.get(partition)

    def version(self) -> Stamp | None:
        """The changelog version of the last write stamped with one (``stamp``), if any."""
        raw = self._db.get(VERSION_KEY)
        if raw is None:
            return None
        # Stamps written before writers were told apart hold the version alone.
        return Stamp(int(_OFFSET_VALUE.unpack_from(raw)[0]), raw[_OFFSET_VALUE.size :].decode())

    def load(self, sessions: Iterable[Session], batch_size: int = 1000) -> int:
        """Write ``sessions`` as they are (seeding, restoring); the clock does not move."""
        self.commit()
        written = 0
        batch = WriteBatch(raw_mode=True)
        for session in sessions:
            key = session_key(session.user_id)
            batch.put(key, encode_session(session))
            self._cache.pop(key)
            written += 1
            if len(batch) >= batch_size:
                self._write(batch)
                batch = WriteBatch(raw_mode=True)
        if len(batch):
            self._write(batch)
        return written

    def user_ids(self) -> Iterator[str]:
        """Every user with a stored session (expired ones included), in key order."""
        for key in self._db.keys(from_key=SESSION_PREFIX, read_opt=session_bounds()):
            yield user_of(cast(bytes, key))

    @property
    def clock_ms(self) -> int | None:
        """The latest event time applied, in whole seconds, if any: the "now" of expiry."""
        return self._expiry.clock_ms

    def stats(self) -> ShardStats:
        """Sessions, expired sessions and bytes of this shard's DB (a full scan)."""
        return scan_stats(self._db, self.path, self.shard_index, self.clock_ms, self.ttl_ms)

    def close(self) -> None:
        """Commit what is staged and close the DB; closing twice is harmless."""
        if not self._closed:
            try:
                self.commit()
                marks = WriteBatch(raw_mode=True)
                self._write_marks(marks)
                if not self._wal and not self.lost_writes:
                    marks.delete(OPEN_KEY)
                self._db.write(marks, self._write_options)
                if not self._wal:
                    self._db.flush()  # the memtable holds what no log does
            finally:
                self._closed = True
                self._cache.clear()
                self._consumed.clear_cache()
                self._db.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _stored(self, key: bytes, user_id: str) -> Session | None:
        session = self._staged.get(key)
        if session is None:
            session = self._cache.peek(key)  # evicted least recently written first
        if session is not None:
            self.counters.cache_hits += 1
            return session
        self.counters.cache_misses += 1
        try:
            raw = read_record(self._db, key, user_id)
            return None if raw is None else decode_session(user_id, raw)
        except CorruptSessionError:
            self._quarantine(key, user_id)
            return None

    def _removed(self, keys: list[bytes], consumed: list[bytes | None]) -> None:
        """Tell of the removal of the sessions at ``keys``; ``consumed``: their consumed-items
        records as they were stored (which chunks of them the changelog holds)."""
        if self.changes is not None:
            tombstones: list[tuple[bytes, bytes | None]] = []
            for key, record in zip(keys, consumed, strict=True):
                user = key[_PREFIX_LEN:]
                tombstones += [(user, None), *removal(user, record)]
            self.changes.send(self.shard_index, tombstones, self._applied.get(self.shard_index))

    def resend(self, changelog_keys: set[bytes]) -> None:
        """Send this store's records of ``changelog_keys`` (user ids, or consumed-items keys)
        to the changelog again, a removal where it has none: they overwrite another writer's."""
        self.commit()
        tag = len(CHANGELOG_CONSUMED_TAG)
        changes: list[tuple[bytes, bytes | None]] = []
        for user in sorted(changelog_keys):
            # Read as stored: a record RocksDB cannot read must not reach the changelog as b"".
            if is_chunk_key(user):
                owner, number = parse_chunk_key(user)
                stored = self._db.get(CONSUMED_PREFIX + owner)
                changes.append((user, chunk_value(owner, stored, number)))
            elif user.startswith(CHANGELOG_CONSUMED_TAG):
                changes.append((user, whole_value(self._db.get(CONSUMED_PREFIX + user[tag:]))))
            else:
                changes.append((user, self._db.get(SESSION_PREFIX + user)))
        if self.changes is not None:
            self.changes.send(self.shard_index, changes, self._applied.get(self.shard_index))

    def restore(self, records: Iterable[tuple[bytes, bytes | None]], applied: int | None) -> int:
        """Rebuild an empty store from (user id, record or None) pairs, oldest first.

        A key of ``CHANGELOG_CONSUMED_TAG`` and a user id holds that user's consumed items,
        whole or in chunks (``streamrec.state.consumed_chunks``), assembled at the end.

        ``applied``: the last events offset these records reflect (the shard's
        watermark from then on).  Returns the number of sessions written.
        """
        batch = WriteBatch(raw_mode=True)
        written = 0
        tag = len(CHANGELOG_CONSUMED_TAG)
        for user, record in records:
            if is_chunk_key(user):
                aside, chunk = put_aside(user, record)
                if chunk is None:
                    batch.delete(aside)
                else:
                    batch.put(aside, chunk)
                continue
            is_session = not user.startswith(CHANGELOG_CONSUMED_TAG)
            key = SESSION_PREFIX + user if is_session else CONSUMED_PREFIX + user[tag:]
            if record is None:
                batch.delete(key)
            else:
                batch.put(key, record)
                written += is_session
            if len(batch) >= SWEEP_BATCH_DEFAULT:
                self._write(batch)
                batch = WriteBatch(raw_mode=True)
        self._db.write(batch, self._write_options)
        batch = WriteBatch(raw_mode=True)
        for key, record in assembled(self._db):
            if record is None:
                batch.delete(key)
            else:
                batch.put(key, record)
            if len(batch) >= SWEEP_BATCH_DEFAULT:
                self._db.write(batch, self._write_options)
                batch = WriteBatch(raw_mode=True)
        if applied is not None:
            self._applied[self.shard_index] = applied
        self._write_marks(batch)
        self._write(batch)
        self._cache.clear()
        self._consumed.clear_cache()
        return written

    def _write_marks(self, batch: WriteBatch) -> None:
        """Add the applied offsets and the clock's voters to ``batch``, where they changed.

        Not with every commit: a session that exists carries its own offsets, so the
        watermark must be on disk only before a session goes (sweep, erasure), and the
        voters only as of the clock they voted for (and at close).
        """
        for partition, offset in self._applied.items():
            if self._applied_written.get(partition) != offset:
                batch.put(applied_key(partition), _OFFSET_VALUE.pack(offset))
        self._applied_written = dict(self._applied)
        self._expiry.put_voters(batch)
        if self.stamp is not None:
            batch.put(VERSION_KEY, _pack_stamp(self.stamp))

    def _quarantine(self, key: bytes, user_id: str) -> None:
        # The user starts afresh; the shard's watermark, written with the move, still keeps
        # replays of their old events from being applied.
        batch = WriteBatch(raw_mode=True)
        quarantine(batch, key, read_as_stored(self._db, key) or b"")
        self._write_removal(batch, [key])
        self.counters.quarantined.append(user_id)

    def _write_removal(self, batch: WriteBatch, keys: list[bytes]) -> None:
        """Write ``batch``, which removes the sessions at ``keys``, with the marks; tell of it."""
        self._write_marks(batch)
        consumed = [
            read_as_stored(self._db, consumed_key_of(key)) if self.changes else None for key in keys
        ]
        self._write(batch)
        self._removed(keys, consumed)
        for key in keys:
            self._uncache(key)

    def _write(self, batch: WriteBatch) -> None:
        """Write ``batch`` at once, all or nothing; RocksDB's failures as ``StateWriteError``."""
        try:
            self._db.write(batch, self._write_options)
        except Exception as err:  # rocksdict raises RocksDB's failures as plain Exception
            raise StateWriteError(f"cannot write to shard DB {self.path}: {err}") from err

    def _uncache(self, key: bytes) -> None:
        """Drop the session at ``key``, and its consumed items, from memory (removed)."""
        self._cache.pop(key)
        self._consumed.uncache(key)


def _pack_stamp(stamp: Stamp) -> bytes:
    return _OFFSET_VALUE.pack(stamp.version) + stamp.writer.encode()


def _read_applied(db: Rdict) -> dict[int, int]:
    applied = {}
    for key, value in db.items(from_key=APPLIED_PREFIX):
        key, value = cast(bytes, key), cast(bytes, value)
        if not key.startswith(APPLIED_PREFIX):
            break
        applied[int(key[len(APPLIED_PREFIX) :])] = int(_OFFSET_VALUE.unpack(value)[0])
    return applied
