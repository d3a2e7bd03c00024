"""Removing a user's records: erasure on request, and quarantine of an unreadable session.

A user's records are their session (``s:``), the items they consumed in it
(``c:``, dropped with the session) and, if a session of theirs could not be
read, that record kept aside for inspection (``q:``, out of every session scan;
the user starts afresh).  Erasure removes all three and can also scrub the disk
(``scrub``).  The store writes these deletions in one batch with its watermark,
so no removal can let a replay apply an event twice; an erasure request read
from the events topic is itself applied once, and ``holds_later`` tells a
replayed request from a new one.

>>> from streamrec.state.keys import session_key
>>> from streamrec.state.session import Session, encode_session
>>> from streamrec.contracts import Event
>>> event = Event("e1", "u1", "i9", "view", 1_700_000_000_000)
>>> stored = encode_session(Session.empty("u1").with_event(event, 0, 7, 10))
>>> holds_later(session_key("u1"), stored, partition=0, offset=5)  # erased before offset 7
True
>>> holds_later(session_key("u1"), stored, partition=0, offset=8)
False
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from rocksdict import BottommostLevelCompaction, CompactOptions, Rdict, WriteBatch

from streamrec.state.errors import CorruptSessionError
from streamrec.state.keys import SESSION_PREFIX, consumed_key_of, quarantine_key_of
from streamrec.state.session import applied_offset_of

_PREFIX_LEN: Final = len(SESSION_PREFIX)


class Erasure(Enum):
    """What ``SessionStore.forget`` did."""

    ERASED = "erased"  # the user had records, and they are gone
    NOTHING = "nothing"  # the user had none (a metric and a log line, never the user id)
    ALREADY_APPLIED = "already applied"  # read again after a restart: applied before


def delete_session(batch: WriteBatch, key: bytes) -> None:
    """Add to ``batch`` the removal of the session at ``key`` and of its consumed items."""
    batch.delete(key)
    batch.delete(consumed_key_of(key))


def quarantine(batch: WriteBatch, key: bytes, raw: bytes) -> None:
    """Add to ``batch`` the move of the unreadable session ``raw`` at ``key`` under ``q:``."""
    batch.put(quarantine_key_of(key), raw)
    delete_session(batch, key)


def erase(batch: WriteBatch, key: bytes) -> None:
    """Add to ``batch`` the removal of every record of the user of session ``key``."""
    for removed in (key, consumed_key_of(key), quarantine_key_of(key)):
        batch.delete(removed)


def records_of(db: Rdict, key: bytes, stored: bytes | None) -> list[bytes]:
    """The keys of the records the user of session ``key`` has (``stored``: their session)."""
    others = (consumed_key_of(key), quarantine_key_of(key))
    found = [k for k in others if read_as_stored(db, k) is not None]
    if stored is not None:
        found.append(key)
    return found


def read_as_stored(db: Rdict, key: bytes) -> bytes | None:
    """A record as stored, undecoded (a corrupt one can be erased too)."""
    try:
        raw: bytes | None = db.get(key)
    except Exception:  # noqa: BLE001 - a record RocksDB cannot read is gone either way
        return b""
    return raw


def holds_later(key: bytes, raw: bytes | None, partition: int, offset: int) -> bool:
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


def scrub(db: Rdict, keys: list[bytes]) -> None:
    """Scrub the old versions of ``keys`` from the disk (erased: already deleted)."""
    # A delete only hides older versions: flush the memtable (retiring the WAL that holds
    # them) and compact each key's range down to the last level, where they are dropped.
    db.flush()
    options = CompactOptions()
    options.set_bottommost_level_compaction(BottommostLevelCompaction.force_optimized())
    for key in keys:
        db.compact_range(key, key + b"\x00", options)
