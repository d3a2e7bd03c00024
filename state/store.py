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
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Protocol, cast
from zlib import crc32

import numpy as np
from rocksdict import BottommostLevelCompaction, CompactOptions, Rdict, WriteBatch

from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.consumed import (
    EMPTY,
    decode_consumed,
    encode_consumed,
    item_hash,
    parse_types,
    with_item,
)
from streamrec.state.errors import CorruptSessionError, StateWriteError
from streamrec.state.keys import (
    APPLIED_PREFIX,
    CHANGELOG_CONSUMED_TAG,
    CLOCK_KEY,
    CONSUMED_PREFIX,
    OPEN_KEY,
    QUARANTINE_PREFIX,
    SESSION_PREFIX,
    SHAPE_KEY,
    VERSION_KEY,
    VOTERS_KEY,
    applied_key,
    session_key,
    user_of,
)
from streamrec.state.layout import check_shard_record, ensure_layout, shard_dir, shard_record
from streamrec.state.rocks import (
    CLOCK,
    ShardStats,
    damaged,
    is_corruption,
    open_read_write,
    read_clock,
    scan_stats,
    session_bounds,
    write_options,
)
from streamrec.state.session import (
    EVENT_TYPES,
    NO_REPLAY,
    Session,
    applied_offset_of,
    decode_session,
    encode_session,
    last_seen_of,
)

# Before any event: earlier than every event time, so nothing counts as expired.
NO_CLOCK: Final = -(2**63)
# The store's clock counts whole seconds: expiry is judged at most this late.
CLOCK_RESOLUTION_MS: Final = 1000
# The clock is the median of the latest event times of this many recent distinct users, and
# moves only once this many have voted: one user's wrong clock cannot move it.
CLOCK_VOTERS: Final = 63
MIN_CLOCK_VOTERS: Final = 3
# A session's replay tail holds at most this many windows' worth of interactions.
REPLAY_TAIL_WINDOWS: Final = 2
SWEEP_BATCH_DEFAULT: Final = 1000
_PREFIX_LEN: Final = len(SESSION_PREFIX)
_OFFSET_VALUE: Final = CLOCK  # one signed 64-bit integer, as the clock


def wall_clock_ms() -> float:
    return time.time() * 1000.0


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


class Erasure(Enum):
    """What ``forget`` did."""

    ERASED = "erased"  # the user had records, and they are gone
    NOTHING = "nothing"  # the user had none (a metric and a log line, never the user id)
    ALREADY_APPLIED = "already applied"  # read again after a restart: applied before


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

    Responsibilities: apply events to sessions exactly once per source offset (read,
    update and write back in one atomic batch, the offset stamp inside the session
    record); treat sessions idle for longer than the TTL, in event time, as absent,
    and remove them in bounded sweeps; erase a user on request.  ``apply`` writes
    at once; ``stage`` defers the write to the next ``commit``, so that a
    micro-batch costs one write-ahead log append (the flow commits before it emits
    anything, so an event whose write was lost to a crash has no output either and
    is read again).  The latest ``cache_size`` sessions written stay decoded in
    memory: the store is the DB's only writer, so they are never stale.

    The store also keeps the last applied offset of each source partition (the
    shard's watermark), written in the same batch as any removal of sessions
    (sweep, erasure, quarantine): an event at or below it is a replay even if its
    user's session has gone since, so no removal can let a replay apply an event
    twice (a session that exists carries its own offsets).  The "clock" (persisted,
    whole seconds) is the default "now" of expiry: the median of the latest event times of the last
    ``CLOCK_VOTERS`` distinct users, never ahead of the wall clock by more than
    the allowed skew, so no single user's clock can expire the others.  While a
    crash may still replay events from ``replay_floor`` on (the flow sets it),
    sessions keep the interactions such a replay needs (see ``Session.with_event``).
    The items of consumption events (``consumed_types``) are kept apart from the
    session, under ``c:``, beyond its window (``consumed``): written in the same
    batch as the session, dropped with it when it expires or is erased.
    A session record that cannot be read is moved aside under ``q:`` and its user
    starts afresh (``counters.quarantined``).  The worker reading the partition
    uses the store; RocksDB's lock keeps any second opener out.  Open it with
    ``open``.
    """

    def __init__(
        self,
        db: Rdict,
        path: Path,
        shard_index: int,
        session_length: int,
        ttl_ms: int,
        cache_size: int = 0,
        skew_ms: int = 24 * 3600 * 1000,
        wall_ms: Callable[[], float] = wall_clock_ms,
        consumed_types: frozenset[str] = frozenset(),
        consumed_cap: int = 0,
        wal: bool = True,
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
        clock = read_clock(db)
        self._clock_ms = NO_CLOCK if clock is None else clock
        self._next_tick_ms = NO_CLOCK if clock is None else clock + CLOCK_RESOLUTION_MS
        self._skew_ms = skew_ms
        self._wall_ms = wall_ms
        self._voters = _read_voters(db)
        # Whether a vote since the last count could move the clock (only one at or past
        # its next tick can: the median of votes below it stays below it).
        self._clock_due = True
        self._applied = _read_applied(db)
        self._applied_written = dict(self._applied)
        self._staged_applied: dict[int, int] = {}
        self._sweep_from = SESSION_PREFIX
        self._cache: OrderedDict[bytes, Session] = OrderedDict()
        self._cache_size = cache_size
        # Staged since the last commit: the sessions by key, their writes, the events.
        self._staged: dict[bytes, Session] = {}
        self._staged_events = 0
        # The same for consumed-items records (None: delete), and the latest read or written
        # (EMPTY where the user has none, so that users who never consume cost no read).
        self._consumed_types = consumed_types if consumed_cap > 0 else frozenset()
        self._consumed_cap = consumed_cap
        self._staged_consumed: dict[bytes, np.ndarray | None] = {}
        self._consumed_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
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
        if settings.session_cache < 0:
            raise ValueError(f"session_cache must be 0 or more, got {settings.session_cache}")
        if settings.consumed_cap < 0:
            raise ValueError(f"consumed_cap must be 0 or more, got {settings.consumed_cap}")
        consumed_types = parse_types(settings.consumed_types, EVENT_TYPES)
        ensure_layout(state_dir, shard_count)
        path = shard_dir(state_dir, shard_index)
        db = open_read_write(path)
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
            settings.session_cache,
            round(settings.event_time_skew_s * 1000),
            consumed_types=consumed_types,
            consumed_cap=settings.consumed_cap,
            # With the changelog, RocksDB's own log is a second copy, as in Kafka Streams.
            wal=settings.state_wal or not settings.changelog,
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
            restarted = stored is not None and self._has_expired(stored, event)
            if restarted or event.type in self._consumed_types:
                self._stage_consumed(CONSUMED_PREFIX + user, event, restarted)
            self._staged_events += 1
            self._staged_applied[partition] = offset
            # By a hash of the key: the voters' keys must hold no user id (erasure).
            voter = crc32(key)
            voters = self._voters
            voters[voter] = event.ts
            voters.move_to_end(voter)
            if event.ts >= self._next_tick_ms:
                self._clock_due = True
            if len(voters) > CLOCK_VOTERS:
                voters.popitem(last=False)
        return result

    def _stage_consumed(self, key: bytes, event: Event, restarted: bool) -> None:
        before = self._consumed_of(key, event.user_id)
        if restarted and len(before):
            before = EMPTY  # the consumed items expire with the session
            self._staged_consumed[key] = None
        if event.type in self._consumed_types:
            after = with_item(before, item_hash(event.item_id), self._consumed_cap)
            if after is not None:
                self._staged_consumed[key] = after

    def consumed(self, user_id: str) -> np.ndarray:
        """The hashes (``streamrec.state.consumed.item_hash``) of the items ``user_id`` consumed.

        As of their latest event, staged ones included; read-only, oldest first.
        """
        return self._consumed_of(CONSUMED_PREFIX + user_id.encode(), user_id)

    def _consumed_of(self, key: bytes, user_id: str) -> np.ndarray:
        if key in self._staged_consumed:
            staged = self._staged_consumed[key]
            return EMPTY if staged is None else staged
        cached = self._consumed_cache.get(key)
        if cached is not None:
            return cached
        try:
            raw = self._read(key, user_id)
            consumed = EMPTY if raw is None else decode_consumed(user_id, raw)
        except CorruptSessionError:
            # Only the exclusion is lost: the next consumption writes a fresh record.
            consumed = EMPTY
        if self._cache_size:
            self._remember_consumed(key, consumed)
        return consumed

    def _remember_consumed(self, key: bytes, consumed: np.ndarray) -> None:
        cache = self._consumed_cache
        cache[key] = consumed
        cache.move_to_end(key)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def commit(self) -> int:
        """Write everything staged in one atomic batch; how many events it applied."""
        staged = self._staged
        if not staged:
            return 0
        applied, offsets = self._staged_events, self._staged_applied
        self._staged, self._staged_events, self._staged_applied = {}, 0, {}
        consumed = self._staged_consumed
        if consumed:
            self._staged_consumed = {}
            consumed_records = [
                (key, None if c is None else encode_consumed(c)) for key, c in consumed.items()
            ]
        self._applied.update(offsets)
        tick = self._clock_candidate() if self._clock_due else NO_CLOCK
        self._clock_due = False
        advance = tick != NO_CLOCK and tick >= self._next_tick_ms
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
                    for key, record in consumed_records:
                        if record is None:
                            batch.delete(key)
                        else:
                            batch.put(key, record)
                if advance:
                    # About once a second of event time: the clock, with what voted for it.
                    batch.put(CLOCK_KEY, CLOCK.pack(tick))
                    self._write_marks(batch)
                elif self.stamp is not None:
                    batch.put(VERSION_KEY, _pack_stamp(self.stamp))
                self._db.write(batch, self._write_options)
        except Exception as err:  # rocksdict raises RocksDB's failures as plain Exception
            raise StateWriteError(f"cannot write to shard DB {self.path}: {err}") from err
        if advance:
            self._clock_ms, self._next_tick_ms = tick, tick + CLOCK_RESOLUTION_MS
        if self.changes is not None:
            changes: list[tuple[bytes, bytes | None]] = [
                (key[_PREFIX_LEN:], encode_session(s)) for key, s in staged.items()
            ]
            if consumed:
                changes += [
                    (CHANGELOG_CONSUMED_TAG + key[_PREFIX_LEN:], record)
                    for key, record in consumed_records
                ]
            self.changes.send(self.shard_index, changes, self._applied.get(self.shard_index))
        self.counters.applied += applied
        if self._cache_size:
            for key, session in staged.items():
                self._remember(key, session)
            for key, c in consumed.items():
                self._remember_consumed(key, EMPTY if c is None else c)
        return applied

    def _clock_candidate(self) -> int:
        """The clock the recent users vote for, in whole seconds; NO_CLOCK without a quorum."""
        voters = self._voters
        if len(voters) < MIN_CLOCK_VOTERS:
            return NO_CLOCK
        times = sorted(voters.values())
        # Capped by the wall clock: a majority of wrong clocks still cannot run it far ahead.
        median = min(times[len(times) // 2], int(self._wall_ms()) + self._skew_ms)
        return median - median % CLOCK_RESOLUTION_MS

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
            if self._has_expired(stored, event):
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

    def _has_expired(self, stored: Session, event: Event) -> bool:
        return event.ts - stored.last_seen_ms > self.ttl_ms

    def get(self, user_id: str, now_ms: int | None = None) -> Session | None:
        """``user_id``'s session, or None if there is none or it expired by ``now_ms``."""
        session = self._stored(session_key(user_id), user_id)
        if session is None:
            return None
        now = self._clock_ms if now_ms is None else now_ms
        return None if session.is_expired(now, self.ttl_ms) else session

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
        consumed = _consumed_key_of(key)
        quarantined = QUARANTINE_PREFIX + key[_PREFIX_LEN:]
        stored = self._read_raw(key)
        if partition is not None and offset is not None:
            if offset <= self._applied.get(partition, -1) or _holds_later(
                key, stored, partition, offset
            ):
                self.counters.duplicates += 1
                return Erasure.ALREADY_APPLIED
            self._applied[partition] = offset
        self._cache.pop(key, None)
        self._consumed_cache.pop(consumed, None)
        self._voters.pop(crc32(key), None)
        found = [k for k in (consumed, quarantined) if self._read_raw(k) is not None]
        if stored is not None:
            found.append(key)
        batch = WriteBatch(raw_mode=True)
        for removed in (key, consumed, quarantined):
            batch.delete(removed)
        self._write_marks(batch)
        try:
            self._db.write(batch, self._write_options)
        except Exception as err:  # rocksdict raises RocksDB's failures as plain Exception
            raise StateWriteError(f"cannot write to shard DB {self.path}: {err}") from err
        if not found:
            return Erasure.NOTHING
        self._removed([key])
        if purge:
            self._purge(found)
        return Erasure.ERASED

    def _read_raw(self, key: bytes) -> bytes | None:
        """A record as stored, undecoded (a corrupt one can be erased too)."""
        try:
            raw: bytes | None = self._db.get(key)
        except Exception:  # noqa: BLE001 - a record RocksDB cannot read is gone either way
            return b""
        return raw

    def sweep_expired(self, now_ms: int | None = None, max_keys: int = SWEEP_BATCH_DEFAULT) -> int:
        """Look at up to ``max_keys`` sessions after the last sweep's; remove the expired ones."""
        self.commit()  # the sweep reads the DB: it must see this batch's sessions
        now = self._clock_ms if now_ms is None else now_ms
        bounds = session_bounds()
        cursor = self._db.iter(bounds)
        cursor.seek(self._sweep_from)
        batch = WriteBatch(raw_mode=True)
        expired: list[bytes] = []
        examined = 0
        try:
            while examined < max_keys and cursor.valid():
                key = cursor.key()
                # Resume after this key next time, even if its record turns out corrupt.
                self._sweep_from = key + b"\x00"
                try:
                    value = cursor.value()
                    idle = now - last_seen_of(key[_PREFIX_LEN:], value) > self.ttl_ms
                    if idle and self._replay_needs(key, value):
                        idle = False  # a later sweep takes it, once reading has moved on
                except CorruptSessionError:
                    batch.put(QUARANTINE_PREFIX + key[_PREFIX_LEN:], cursor.value())
                    self.counters.quarantined.append(user_of(key))
                    idle = True
                if idle:
                    batch.delete(key)
                    batch.delete(_consumed_key_of(key))
                    expired.append(key)
                examined += 1
                cursor.next()
            if not cursor.valid():
                self._sweep_from = SESSION_PREFIX  # the end: start over next time
        finally:
            removed = len(expired)
            if len(batch):
                self._write_marks(batch)
                self._db.write(batch, self._write_options)
                self._removed(expired)
                self.counters.swept += removed
                for key in expired:
                    self._cache.pop(key, None)
                    self._consumed_cache.pop(_consumed_key_of(key), None)
        return removed

    def _replay_needs(self, key: bytes, raw: bytes) -> bool:
        """Whether a crash could make this shard read an event of this session again."""
        floor = self.replay_floor
        if floor == NO_REPLAY:
            return False
        applied = applied_offset_of(key[_PREFIX_LEN:], raw, self.shard_index)
        return applied is not None and applied >= floor

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
            self._cache.pop(key, None)
            written += 1
            if len(batch) >= batch_size:
                self._db.write(batch, self._write_options)
                batch = WriteBatch(raw_mode=True)
        if len(batch):
            self._db.write(batch, self._write_options)
        return written

    def user_ids(self) -> Iterator[str]:
        """Every user with a stored session (expired ones included), in key order."""
        for key in self._db.keys(from_key=SESSION_PREFIX, read_opt=session_bounds()):
            yield user_of(cast(bytes, key))

    @property
    def clock_ms(self) -> int | None:
        """The latest event time applied, in whole seconds, if any: the "now" of expiry."""
        return None if self._clock_ms == NO_CLOCK else self._clock_ms

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
                self._consumed_cache.clear()
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
            session = self._cache.get(key)
        if session is not None:
            self.counters.cache_hits += 1
            return session
        self.counters.cache_misses += 1
        try:
            raw = self._read(key, user_id)
            return None if raw is None else decode_session(user_id, raw)
        except CorruptSessionError:
            self._quarantine(key, user_id)
            return None

    def _remember(self, key: bytes, session: Session) -> None:
        cache = self._cache
        cache[key] = session
        cache.move_to_end(key)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)  # the least recently written

    def _read(self, key: bytes, user_id: str) -> bytes | None:
        try:
            raw: bytes | None = self._db.get(key)
        except Exception as err:  # rocksdict raises RocksDB's failures as plain Exception
            if is_corruption(err):
                raise CorruptSessionError(user_id, f"RocksDB: {err}") from err
            raise
        return raw

    def _removed(self, keys: list[bytes]) -> None:
        if self.changes is not None:
            tombstones: list[tuple[bytes, bytes | None]] = []
            for key in keys:
                user = key[_PREFIX_LEN:]
                tombstones += [(user, None), (CHANGELOG_CONSUMED_TAG + user, None)]
            self.changes.send(self.shard_index, tombstones, self._applied.get(self.shard_index))

    def resend(self, changelog_keys: set[bytes]) -> None:
        """Send this store's records of ``changelog_keys`` (user ids, or consumed-items keys)
        to the changelog again, a removal where it has none: they overwrite another writer's."""
        self.commit()
        tag = len(CHANGELOG_CONSUMED_TAG)
        changes: list[tuple[bytes, bytes | None]] = []
        for user in sorted(changelog_keys):
            consumed = user.startswith(CHANGELOG_CONSUMED_TAG)
            key = CONSUMED_PREFIX + user[tag:] if consumed else SESSION_PREFIX + user
            # Read as stored: a record RocksDB cannot read must not reach the changelog as b"".
            changes.append((user, self._db.get(key)))
        if self.changes is not None:
            self.changes.send(self.shard_index, changes, self._applied.get(self.shard_index))

    def restore(self, records: Iterable[tuple[bytes, bytes | None]], applied: int | None) -> int:
        """Rebuild an empty store from (user id, record or None) pairs, oldest first.

        A key of ``CHANGELOG_CONSUMED_TAG`` and a user id holds that user's consumed items.

        ``applied``: the last events offset these records reflect (the shard's
        watermark from then on).  Returns the number of sessions written.
        """
        batch = WriteBatch(raw_mode=True)
        written = 0
        tag = len(CHANGELOG_CONSUMED_TAG)
        for user, record in records:
            is_session = not user.startswith(CHANGELOG_CONSUMED_TAG)
            key = SESSION_PREFIX + user if is_session else CONSUMED_PREFIX + user[tag:]
            if record is None:
                batch.delete(key)
            else:
                batch.put(key, record)
                written += is_session
            if len(batch) >= SWEEP_BATCH_DEFAULT:
                self._db.write(batch, self._write_options)
                batch = WriteBatch(raw_mode=True)
        if applied is not None:
            self._applied[self.shard_index] = applied
        self._write_marks(batch)
        self._db.write(batch, self._write_options)
        self._cache.clear()
        self._consumed_cache.clear()
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
        batch.put(VOTERS_KEY, _pack_voters(self._voters))
        if self.stamp is not None:
            batch.put(VERSION_KEY, _pack_stamp(self.stamp))

    def _quarantine(self, key: bytes, user_id: str) -> None:
        # Kept for inspection under q:, out of every session scan; the user starts afresh and
        # the shard's watermark still keeps replays of their old events from being applied.
        batch = WriteBatch(raw_mode=True)
        batch.put(QUARANTINE_PREFIX + key[_PREFIX_LEN:], self._read_raw(key) or b"")
        batch.delete(key)
        batch.delete(_consumed_key_of(key))
        self._write_marks(batch)
        self._db.write(batch, self._write_options)
        self._removed([key])
        self._cache.pop(key, None)
        self._consumed_cache.pop(_consumed_key_of(key), None)
        self.counters.quarantined.append(user_id)

    def _purge(self, keys: list[bytes]) -> None:
        # A delete only hides older versions: flush the memtable (retiring the WAL that holds
        # them) and compact each key's range down to the last level, where they are dropped.
        self._db.flush()
        options = CompactOptions()
        options.set_bottommost_level_compaction(BottommostLevelCompaction.force_optimized())
        for key in keys:
            self._db.compact_range(key, key + b"\x00", options)


def _holds_later(key: bytes, raw: bytes | None, partition: int, offset: int) -> bool:
    """Whether a stored session applied an event read after ``offset`` of ``partition``.

    A user's events and forgets share one partition, in order: a session holding a
    later event began after the forget at ``offset`` was applied.
    """
    if not raw:
        return False
    try:
        applied = applied_offset_of(key[_PREFIX_LEN:], raw, partition)
    except CorruptSessionError:
        return False
    return applied is not None and applied > offset


def _pack_stamp(stamp: Stamp) -> bytes:
    return _OFFSET_VALUE.pack(stamp.version) + stamp.writer.encode()


def _consumed_key_of(session_key: bytes) -> bytes:
    return CONSUMED_PREFIX + session_key[_PREFIX_LEN:]


def _read_applied(db: Rdict) -> dict[int, int]:
    applied = {}
    for key, value in db.items(from_key=APPLIED_PREFIX):
        key, value = cast(bytes, key), cast(bytes, value)
        if not key.startswith(APPLIED_PREFIX):
            break
        applied[int(key[len(APPLIED_PREFIX) :])] = int(_OFFSET_VALUE.unpack(value)[0])
    return applied


_VOTER: Final = struct.Struct("<Iq")


def _pack_voters(voters: OrderedDict[int, int]) -> bytes:
    return b"".join([_VOTER.pack(voter, ts) for voter, ts in voters.items()])


def _read_voters(db: Rdict) -> OrderedDict[int, int]:
    return OrderedDict(_VOTER.iter_unpack(db.get(VOTERS_KEY) or b""))
