"""A read-only look at all the shard DBs of a state directory, for the command line.

It can be opened while a flow runs: RocksDB lets a read-only reader in beside
the writer, and the reader sees the state as it was when it opened.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from rocksdict import Rdict, ReadOptions

from streamrec.settings import Settings
from streamrec.state.errors import StateError
from streamrec.state.keys import QUARANTINE_PREFIX, SESSION_PREFIX, session_key, user_of
from streamrec.state.layout import Layout, existing_shards, read_layout, shard_dir
from streamrec.state.rocks import ShardStats, open_read_only, read_clock, scan_stats, session_bounds
from streamrec.state.session import Session, decode_session

# The first key after every quarantined record: the upper bound of their scan.
_QUARANTINE_END: Final = QUARANTINE_PREFIX[:-1] + bytes([QUARANTINE_PREFIX[-1] + 1])


@dataclass(frozen=True, slots=True)
class FoundSession:
    """A session found in a shard DB, and whether it has expired by the view's clock."""

    shard_index: int
    session: Session
    expired: bool


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """A session record of a shard DB that does not decode, skipped by a scan."""

    shard_index: int
    user_key: str  # the key after its prefix, escaped where it is not UTF-8
    reason: str


@dataclass(frozen=True, slots=True)
class DamagedShard:
    """A shard DB whose scan RocksDB broke off (a block failed its checksum): the rest is unread."""

    shard_index: int
    after_user_key: str | None  # the last key read before the damage; None: none was
    reason: str


ScannedRecord = FoundSession | UnreadableRecord | DamagedShard


class StateView:
    """Every shard DB of one state directory, opened read-only.

    Responsibilities: find a user's session in whichever shard DB holds it (the
    producer's partitioner decides the shard, so each DB gets one point read),
    stream every session shard by shard (``scan``), and report per-shard sizes.
    ``find`` and ``stats`` judge expiry against the latest event time any shard
    has applied, ``scan`` against each shard's own clock, as the flow does, unless
    the caller names another "now".  Open it with ``open_state_view``.
    """

    def __init__(self, state_dir: Path, layout: Layout, dbs: dict[int, Rdict], ttl_ms: int):
        self.state_dir = state_dir
        self.layout = layout
        self.ttl_ms = ttl_ms
        self._dbs = dbs
        clocks = [c for c in (read_clock(db) for db in dbs.values()) if c is not None]
        self.clock_ms: int | None = max(clocks) if clocks else None

    def find(self, user_id: str, now_ms: int | None = None) -> FoundSession | None:
        """``user_id``'s session wherever it is stored (expired or not), or None."""
        key = session_key(user_id)
        now = self.clock_ms if now_ms is None else now_ms
        for index, db in self._dbs.items():
            raw = db.get(key)
            if raw is not None:
                session = decode_session(user_id, raw)
                expired = now is not None and session.is_expired(now, self.ttl_ms)
                return FoundSession(index, session, expired)
        return None

    def scan(
        self, shards: Iterable[int] | None = None, now_ms: int | None = None
    ) -> Generator[ScannedRecord, None, None]:
        """Every session record of ``shards`` (default: all open), shard by shard, in key order.

        One record in memory at a time.  A record that does not decode comes as an
        ``UnreadableRecord``; a shard DB that RocksDB cannot read to its end ends
        with a ``DamagedShard``.  Close the iterator before the view.
        """
        wanted = self.shards if shards is None else sorted(set(shards) & set(self._dbs))
        for index in wanted:
            db = self._dbs[index]
            now = read_clock(db) if now_ms is None else now_ms
            # A raw cursor, not ``items()``: that one ends quietly where a block is damaged,
            # and only the cursor's status says the scan was cut short.
            cursor = db.iter(session_bounds())
            cursor.seek(SESSION_PREFIX)
            last_key: bytes | None = None
            while cursor.valid():
                last_key = cursor.key()
                yield self._read(index, last_key, cursor.value(), now)
                cursor.next()
            try:
                cursor.status()
            except Exception as err:  # rocksdict raises RocksDB's status as plain Exception
                after = None if last_key is None else _readable_key(last_key)
                yield DamagedShard(index, after, str(err))

    def _read(self, index: int, key: bytes, raw: bytes, now: int | None) -> ScannedRecord:
        # Any failure means these bytes are not a session we can show: a damaged record may
        # break any step (key, header, item ids), so every one is tried here, not later.
        try:
            session = decode_session(user_of(key), raw)
            _ = session.item_ids  # parsed now, so that bad item ids count here
        except StateError as err:
            return UnreadableRecord(index, _readable_key(key), str(err))
        except Exception as err:
            return UnreadableRecord(index, _readable_key(key), f"{type(err).__name__}: {err}")
        expired = now is not None and session.is_expired(now, self.ttl_ms)
        return FoundSession(index, session, expired)

    def estimated_keys(self, shards: Iterable[int] | None = None) -> int:
        """RocksDB's estimate of the keys in ``shards`` (metadata included): a progress total."""
        wanted = self.shards if shards is None else [i for i in shards if i in self._dbs]
        return sum(
            self._dbs[i].property_int_value("rocksdb.estimate-num-keys") or 0 for i in wanted
        )

    def quarantined(self) -> dict[int, int]:
        """Records set aside as unreadable (under ``q:``) in every shard DB: a prefix scan each."""
        bounds = ReadOptions()
        bounds.set_iterate_upper_bound(_QUARANTINE_END)
        return {
            index: sum(1 for _ in db.keys(from_key=QUARANTINE_PREFIX, read_opt=bounds))
            for index, db in self._dbs.items()
        }

    def stats(self) -> list[ShardStats]:
        """Sessions and bytes of every shard DB present (full scans)."""
        return [
            scan_stats(db, shard_dir(self.state_dir, index), index, self.clock_ms, self.ttl_ms)
            for index, db in self._dbs.items()
        ]

    @property
    def shards(self) -> list[int]:
        """The shards whose DB is open in this view."""
        return list(self._dbs)

    @property
    def missing_shards(self) -> list[int]:
        """Shards of the layout without a DB yet (no event of their partition processed)."""
        return [i for i in range(self.layout.shard_count) if i not in self._dbs]

    def close(self) -> None:
        """Close every DB."""
        for db in self._dbs.values():
            db.close()
        self._dbs = {}

    def __enter__(self) -> StateView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _readable_key(key: bytes) -> str:
    return key[len(SESSION_PREFIX) :].decode("utf-8", errors="backslashreplace")


def open_state_view(state_dir: Path, settings: Settings) -> StateView:
    """Open every shard DB of ``state_dir`` read-only; its layout must be readable."""
    layout = read_layout(state_dir)
    present = [i for i in existing_shards(state_dir) if i < layout.shard_count]
    dbs: dict[int, Rdict] = {}
    try:
        for index in present:
            dbs[index] = open_read_only(shard_dir(state_dir, index))
    except BaseException:
        for db in dbs.values():
            db.close()
        raise
    return StateView(state_dir, layout, dbs, round(settings.session_ttl_s * 1000))
