"""RocksDB through rocksdict, tuned for the store's workload: one point read and write per event.

Everything rocksdict-specific that the store and the read-only view share lives
here: the options, opening (with RocksDB's lock turned into a named error), and
scans over the session keys.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DataBlockIndexType,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteOptions,
)

from streamrec.state.errors import (
    CorruptSessionError,
    StateError,
    StateLockedError,
    StateNotFoundError,
)
from streamrec.state.keys import CLOCK_KEY, SESSION_PREFIX, SESSIONS_END
from streamrec.state.session import last_seen_of

# Block cache of each shard DB: the warm set of sessions should be served from memory
# (the setting ``rocksdb_block_cache_mb``; this is its default).
BLOCK_CACHE_BYTES: Final = 64 * 1024 * 1024
BLOOM_BITS_PER_KEY: Final = 10
LEVELS: Final = 7  # RocksDB's default number of levels
UNCOMPRESSED_LEVELS: Final = 2
CLOCK: Final = struct.Struct("<q")
_PREFIX_LEN: Final = len(SESSION_PREFIX)


def db_options(block_cache_bytes: int = BLOCK_CACHE_BYTES) -> Options:
    """Options for a shard DB: raw bytes keys, bloom filters and a hash index for point reads."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    table = BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    if block_cache_bytes > 0:
        table.set_block_cache(Cache(block_cache_bytes))
    else:
        table.disable_cache()
    # A hash index inside each data block turns the in-block binary search into one probe.
    table.set_data_block_index_type(DataBlockIndexType.binary_and_hash())
    table.set_data_block_hash_ratio(0.75)
    options.set_block_based_table_factory(table)
    options.set_memtable_whole_key_filtering(True)
    options.set_memtable_prefix_bloom_ratio(0.02)
    # Every event reads a session: the upper levels (recent sessions, and all of a small
    # store) stay uncompressed so that a block-cache miss costs no decompression; the
    # large lower levels are compressed.
    options.set_compression_per_level(
        [DBCompressionType.none()] * UNCOMPRESSED_LEVELS
        + [DBCompressionType.lz4()] * (LEVELS - UNCOMPRESSED_LEVELS)
    )
    options.set_max_background_jobs(2)
    options.set_keep_log_file_num(3)
    return options


def write_options(wal: bool = True) -> WriteOptions:
    """Not synced per write.  With the WAL a killed process loses nothing (a power cut may);
    without it, whatever is still in the memtable: the changelog has it."""
    options = WriteOptions()
    options.sync = False
    # A property at run time; rocksdict's type stub declares it a method.
    options.disable_wal = not wal  # type: ignore[method-assign,assignment]
    return options


def open_read_write(path: Path, block_cache_bytes: int = BLOCK_CACHE_BYTES) -> Rdict:
    """Open (creating) the shard DB at ``path`` for this process alone."""
    try:
        return Rdict(str(path), db_options(block_cache_bytes))
    except Exception as err:  # rocksdict raises plain Exception with RocksDB's status text
        if "lock" in str(err).lower():
            raise StateLockedError(
                f"shard DB {path} is already open in another process (or twice in this "
                "one): each shard DB has exactly one owner, the worker reading its partition "
                "of the events topic. Stop the other flow, or give this one its own "
                "--state-dir."
            ) from None
        if is_corruption(err):
            raise damaged(path, err) from None
        raise StateError(f"cannot open shard DB {path}: {err}") from None


def open_read_only(path: Path) -> Rdict:
    """Open the shard DB at ``path`` read-only: a point-in-time view, fine while a flow runs."""
    if not path.is_dir():
        raise StateNotFoundError(f"no shard DB at {path}")
    options = Options(raw_mode=True)
    try:
        return Rdict(str(path), options, access_type=AccessType.read_only(False))
    except Exception as err:
        raise StateError(f"cannot open shard DB {path} read-only: {err}") from None


def is_corruption(err: Exception) -> bool:
    """Whether rocksdict's error is RocksDB's "Corruption" status (a checksum failed)."""
    return str(err).startswith("Corruption")


def read_record(db: Rdict, key: bytes, user_id: str) -> bytes | None:
    """The record of ``user_id`` at ``key``, if any.

    CorruptSessionError if RocksDB cannot read it (a checksum failed).
    """
    try:
        raw: bytes | None = db.get(key)
    except Exception as err:  # rocksdict raises RocksDB's failures as plain Exception
        if is_corruption(err):
            raise CorruptSessionError(user_id, f"RocksDB: {err}") from err
        raise
    return raw


def damaged(path: Path, err: Exception) -> StateError:
    """What to say of a shard DB whose checksums fail."""
    return StateError(
        f"shard DB {path} is damaged ({err}): restore it from a backup, or move it away "
        "and let the flow rebuild the sessions from the events"
    )


def read_clock(db: Rdict) -> int | None:
    """The latest event time the DB has applied, if it has applied any."""
    raw = db.get(CLOCK_KEY)
    return None if raw is None else int(CLOCK.unpack(raw)[0])


def session_bounds() -> ReadOptions:
    """Read options that stop a scan at the last session key."""
    bounds = ReadOptions()
    bounds.set_iterate_upper_bound(SESSIONS_END)
    return bounds


def session_records(db: Rdict, start: bytes = SESSION_PREFIX) -> Iterator[tuple[bytes, bytes]]:
    """(key, record) of every session from key ``start`` on, in key order."""
    yield from db.items(from_key=start, read_opt=session_bounds())


@dataclass(frozen=True, slots=True)
class ShardStats:
    """Size of one shard DB: its sessions, how many have expired, bytes stored and on disk."""

    shard_index: int
    sessions: int
    expired: int
    record_bytes: int
    disk_bytes: int
    clock_ms: int | None


def scan_stats(
    db: Rdict, path: Path, shard_index: int, now_ms: int | None, ttl_ms: int
) -> ShardStats:
    """Count the sessions of a shard DB by a full scan; expired ones by ``now_ms``."""
    sessions = expired = record_bytes = 0
    for key, record in session_records(db):
        sessions += 1
        record_bytes += len(key) + len(record)
        try:
            if now_ms is not None and now_ms - last_seen_of(key[_PREFIX_LEN:], record) > ttl_ms:
                expired += 1
        except CorruptSessionError:
            continue  # counted as a session; the flow quarantines it when it meets it
    clock = read_clock(db)
    return ShardStats(shard_index, sessions, expired, record_bytes, disk_bytes(path), clock)


def disk_bytes(path: Path) -> int:
    """Bytes of every file of the DB directory (tables, WAL, manifest)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
