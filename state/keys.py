"""The key space of one shard's RocksDB: session records and the store's own metadata.

Sessions and metadata share one keyspace, told apart by a one-byte prefix, so a
scan over sessions is a range scan that never meets a metadata key.

>>> session_key("u1"), user_of(session_key("u1"))
(b's:u1', 'u1')
>>> consumed_key_of(session_key("u1")), quarantine_key_of(session_key("u1"))
(b'c:u1', b'q:u1')
"""

from __future__ import annotations

from typing import Final

SESSION_PREFIX: Final = b"s:"
# The first key after every session key: the upper bound of session scans.
SESSIONS_END: Final = b"s;"
META_PREFIX: Final = b"m:"
# Format version, shard index and shard count this DB was created for (JSON).
SHAPE_KEY: Final = META_PREFIX + b"shape"
# The shard's event-time "now" (q, ms): the median latest event time of its recent users.
CLOCK_KEY: Final = META_PREFIX + b"clock"
# The latest event time of each of the shard's recent distinct users, the clock's voters,
# by a hash of the user key (no user id), oldest vote first.
VOTERS_KEY: Final = META_PREFIX + b"voters"
# The offset of the last event applied from each source partition (q), written with every
# removal of sessions: what makes a replay harmless even for a session since removed.
APPLIED_PREFIX: Final = META_PREFIX + b"applied:"
# Exactly-once mode: the changelog version (count of committed transactions that changed
# the shard) that every write since the last commit belongs to (q).  Equal to the
# changelog's, the store holds exactly what was committed; otherwise it is rebuilt.
VERSION_KEY: Final = META_PREFIX + b"version"
# Without a write-ahead log: present on disk while a process has the DB open, so a crash
# (which loses the memtable) leaves it behind and the shard is rebuilt from the changelog.
OPEN_KEY: Final = META_PREFIX + b"open"
# Session records that could not be read, kept aside for inspection (never read again).
QUARANTINE_PREFIX: Final = b"q:"
# The items each user consumed in their current session (streamrec.state.consumed), beside ``s:``.
CONSUMED_PREFIX: Final = b"c:"
# In the changelog, whose keys are raw user ids, a consumed-items record's key is this tag
# and the user id: not valid UTF-8, so never a user id (which is text) on its own.
CHANGELOG_CONSUMED_TAG: Final = b"\xff\xfdc:"
# A chunk of a consumed-items record (streamrec.state.consumed_chunks) is keyed by this tag, its
# number and the user id: the tag is the one above and a byte no user id begins with.
CHANGELOG_CONSUMED_CHUNK_TAG: Final = CHANGELOG_CONSUMED_TAG + b"\xff"
# While a shard is restored: the consumed-items chunks read so far, until they are assembled.
RESTORING_CHUNK_PREFIX: Final = b"r:"
_SESSION_PREFIX_LEN: Final = len(SESSION_PREFIX)


def session_key(user_id: str) -> bytes:
    """The RocksDB key of ``user_id``'s session."""
    return SESSION_PREFIX + user_id.encode()


def consumed_key(user_id: str) -> bytes:
    """The RocksDB key of the items ``user_id`` consumed in their current session."""
    return CONSUMED_PREFIX + user_id.encode()


def consumed_key_of(session_key: bytes) -> bytes:
    """The key of the consumed items of the user whose session key is ``session_key``."""
    return CONSUMED_PREFIX + session_key[_SESSION_PREFIX_LEN:]


def quarantine_key_of(session_key: bytes) -> bytes:
    """Where the unreadable session record at ``session_key`` is kept aside."""
    return QUARANTINE_PREFIX + session_key[_SESSION_PREFIX_LEN:]


def applied_key(partition: int) -> bytes:
    """The key of the last applied offset of source ``partition``."""
    return APPLIED_PREFIX + str(partition).encode()


def user_of(key: bytes) -> str:
    """The user id of a session key."""
    return key[len(SESSION_PREFIX) :].decode()
