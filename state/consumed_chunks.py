"""How the consumed-items records travel in the changelog: in chunks, so an item costs a chunk.

A consumed-items record (``streamrec.state.consumed``) only grows at its end,
and past its cap loses its oldest items; sent whole with every change, it cost
up to 40 kB per item a heavy rater rated.  In the changelog it is cut instead
into chunks of ``CHUNK_ITEMS`` items by *sequence number* (an item's position
since the record began: the local record keeps its oldest item's, ``first``),
each chunk under a key of its own, so that a commit re-sends only the chunks its
new items went into and removes (tombstones) those the cap pushed out.  Every
chunk carries the record's ``first`` as of its writing: the last chunk's is the
record's.  Chunk numbers stay below ``CHUNKS``: a record whose next item would
need a higher one, or that changed otherwise (a new session), is written afresh
from number 0, and its old chunks are removed.

A restore reads a user's chunks wherever they are in the partition: it puts them
aside in the shard's RocksDB (``put_aside``) and assembles each user's record
at the end (``assembled``).  A changelog written before chunks holds whole
records, under ``CHANGELOG_CONSUMED_TAG`` and the user id: they are restored as
they are, and the first change of such a record writes it in chunks and removes
the whole one.  (An older streamrec restoring a changelog written in chunks
loses the consumed items only: it finds no record it can read.)

>>> from streamrec.item_hashes import item_hashes
>>> update = consumed_update(b"u1", None, item_hashes(["a", "b"]))
>>> update.record == encode_consumed(item_hashes(["a", "b"]), first=0)
True
>>> [parse_chunk_key(key) for key, _ in update.changes]  # the user's chunk 0
[(b'u1', 0)]
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import Final, NamedTuple, cast

import numpy as np
from rocksdict import Rdict

from streamrec.item_hashes import HASH_DTYPE
from streamrec.state.consumed import FORMAT_1, decode_consumed, encode_consumed, first_of
from streamrec.state.errors import CorruptSessionError
from streamrec.state.keys import (
    CHANGELOG_CONSUMED_CHUNK_TAG,
    CHANGELOG_CONSUMED_TAG,
    CONSUMED_PREFIX,
    RESTORING_CHUNK_PREFIX,
)

log = logging.getLogger(__name__)

# 512 bytes of hashes a chunk: what a new item costs, at most, before compression.
CHUNK_ITEMS: Final = 64
# Chunk numbers are below this, so a removal the record cannot tell can name every key.
CHUNKS: Final = 1024
# The largest consumed_cap whose records always fit below CHUNKS, however they are cut.
MAX_CAP: Final = (CHUNKS - 1) * CHUNK_ITEMS
CHUNK_FORMAT_VERSION: Final = 1
# Version, padding, the record's ``first`` when the chunk was written; the hashes follow.
_CHUNK_HEADER: Final = struct.Struct("<B3xI")
_NUMBER: Final = struct.Struct(">H")
_USER_SIZE: Final = struct.Struct(">I")
_TAG_LEN: Final = len(CHANGELOG_CONSUMED_CHUNK_TAG)
_PREFIX_LEN: Final = len(CONSUMED_PREFIX)

Changes = list[tuple[bytes, bytes | None]]


class ConsumedUpdate(NamedTuple):
    """A consumed-items record to write locally (None: delete), and its changelog records."""

    record: bytes | None
    changes: Changes


class _Before(NamedTuple):
    """The record as the changelog holds it: its hashes and ``first``, in chunks or not."""

    hashes: np.ndarray
    first: int
    chunked: bool


# A record that cannot be read: its chunks are not known, so every number is removed.
_UNREADABLE: Final = _Before(np.empty(0, dtype=HASH_DTYPE), 0, chunked=False)


def chunk_key(user: bytes, number: int) -> bytes:
    """The changelog key of chunk ``number`` of the consumed items of ``user`` (a user id)."""
    return CHANGELOG_CONSUMED_CHUNK_TAG + _NUMBER.pack(number) + user


def is_chunk_key(key: bytes) -> bool:
    return key.startswith(CHANGELOG_CONSUMED_CHUNK_TAG)


def parse_chunk_key(key: bytes) -> tuple[bytes, int]:
    """(user id, chunk number) of a chunk's changelog key."""
    (number,) = _NUMBER.unpack_from(key, _TAG_LEN)
    return key[_TAG_LEN + _NUMBER.size :], int(number)


def consumed_update(user: bytes, before: bytes | None, after: np.ndarray | None) -> ConsumedUpdate:
    """The local record and the changelog records that take ``user``'s consumed items from
    the record ``before`` (as stored; None: none) to the hashes ``after`` (None: removed)."""
    was = _read(user, before)
    if after is None:
        return ConsumedUpdate(None, _removed(user, was, keep=range(0)))
    if was is not None and was.chunked:
        appended = _appended(user, was, after)
        if appended is not None:
            return appended
    # Written afresh, from chunk 0: a new record, or one that changed otherwise.
    numbers = range((len(after) - 1) // CHUNK_ITEMS + 1)
    fresh: Changes = [(chunk_key(user, n), _chunk(after, 0, n)) for n in numbers]
    return ConsumedUpdate(encode_consumed(after, 0), _removed(user, was, keep=numbers) + fresh)


def removal(user: bytes, before: bytes | None) -> Changes:
    """The tombstones that remove every consumed-items record of ``user`` from the changelog
    (``before``: their record as stored): its chunks, and a whole record of the first format."""
    changes = _removed(user, _read(user, before), keep=range(0))
    legacy = (CHANGELOG_CONSUMED_TAG + user, None)
    return changes if legacy in changes else [legacy, *changes]


def chunk_value(user: bytes, stored: bytes | None, number: int) -> bytes | None:
    """Chunk ``number`` of the record ``stored``, as the changelog should hold it (None: no
    such chunk): what a writer sends again over another writer's."""
    was = _read(user, stored)
    if was is None or not was.chunked:
        return None
    end = was.first + len(was.hashes)
    if not was.first // CHUNK_ITEMS <= number <= (end - 1) // CHUNK_ITEMS:
        return None
    return _chunk(was.hashes, was.first, number)


def whole_value(stored: bytes | None) -> bytes | None:
    """The record ``stored`` as the changelog holds it whole: only one of the first format;
    None (a tombstone) for any other (the changelog holds those in chunks)."""
    return stored if stored is not None and stored[:1] == bytes([FORMAT_1]) else None


def put_aside(key: bytes, value: bytes | None) -> tuple[bytes, bytes | None]:
    """Where a restore keeps the chunk read at changelog ``key`` until ``assembled`` (its
    RocksDB key), and what it puts there (None: delete)."""
    user, number = parse_chunk_key(key)
    aside = RESTORING_CHUNK_PREFIX + _USER_SIZE.pack(len(user)) + user + _NUMBER.pack(number)
    return aside, value


def assembled(db: Rdict) -> Iterator[tuple[bytes, bytes | None]]:
    """The writes that turn the chunks put aside in ``db`` into records: each user's
    consumed-items record (RocksDB key, record or None), and the chunks' deletions."""
    user: bytes | None = None
    chunks: list[tuple[int, bytes]] = []
    for key, value in db.items(from_key=RESTORING_CHUNK_PREFIX):
        key, value = cast(bytes, key), cast(bytes, value)
        if not key.startswith(RESTORING_CHUNK_PREFIX):
            break
        at = len(RESTORING_CHUNK_PREFIX)
        (size,) = _USER_SIZE.unpack_from(key, at)
        owner = key[at + _USER_SIZE.size : at + _USER_SIZE.size + size]
        if owner != user:
            if user is not None:
                yield CONSUMED_PREFIX + user, _assemble(chunks)
            user, chunks = owner, []
        (number,) = _NUMBER.unpack_from(key, len(key) - _NUMBER.size)
        chunks.append((int(number), value))
        yield key, None
    if user is not None:
        yield CONSUMED_PREFIX + user, _assemble(chunks)


def _read(user: bytes, raw: bytes | None) -> _Before | None:
    if raw is None:
        return None
    name = user.decode(errors="replace")
    try:
        first = first_of(name, raw)
        hashes = decode_consumed(name, raw)
    except CorruptSessionError:
        return _UNREADABLE
    if first is None:  # the first format: sent whole, never in chunks
        return _Before(hashes, 0, chunked=False)
    return _Before(hashes, first, chunked=True)


def _appended(user: bytes, was: _Before, after: np.ndarray) -> ConsumedUpdate | None:
    """The update if ``after`` is ``was`` with items appended and the oldest dropped, and its
    chunk numbers stay below ``CHUNKS``; else None."""
    before = was.hashes
    dropped = 0
    if len(before):
        if len(after) and after[0] != before[0]:
            found = np.flatnonzero(before == after[0])
            if not found.size:
                return None
            dropped = int(found[0])
        kept = len(before) - dropped
        if len(after) < kept or not np.array_equal(before[dropped:], after[:kept]):
            return None
    first = was.first + dropped
    end_before, end = was.first + len(before), first + len(after)
    if (end - 1) // CHUNK_ITEMS >= CHUNKS:
        return None
    changes: Changes = []
    # Chunks that the dropped items emptied, then those the new items went into.
    for number in range(was.first // CHUNK_ITEMS, first // CHUNK_ITEMS):
        changes.append((chunk_key(user, number), None))
    if end > end_before:
        for number in range(end_before // CHUNK_ITEMS, (end - 1) // CHUNK_ITEMS + 1):
            changes.append((chunk_key(user, number), _chunk(after, first, number)))
    return ConsumedUpdate(encode_consumed(after, first), changes)


def _removed(user: bytes, was: _Before | None, keep: range) -> Changes:
    """Tombstones of the changelog records that held ``was``, but for chunks ``keep``."""
    if was is None:
        return []
    if was is _UNREADABLE:
        everything = [(chunk_key(user, n), None) for n in range(CHUNKS) if n not in keep]
        return [(CHANGELOG_CONSUMED_TAG + user, None), *everything]
    if not was.chunked:
        return [(CHANGELOG_CONSUMED_TAG + user, None)]
    if not len(was.hashes):
        return []
    end = was.first + len(was.hashes)
    numbers = range(was.first // CHUNK_ITEMS, (end - 1) // CHUNK_ITEMS + 1)
    return [(chunk_key(user, n), None) for n in numbers if n not in keep]


def _chunk(hashes: np.ndarray, first: int, number: int) -> bytes:
    """Chunk ``number`` of the record ``hashes`` whose oldest item is number ``first``."""
    start = max(number * CHUNK_ITEMS, first) - first
    stop = min((number + 1) * CHUNK_ITEMS - first, len(hashes))
    return _CHUNK_HEADER.pack(CHUNK_FORMAT_VERSION, first) + hashes[start:stop].tobytes()


def _assemble(chunks: list[tuple[int, bytes]]) -> bytes | None:
    """One user's record from their chunks (ascending numbers); None if they do not fit."""
    try:
        last_number, last = chunks[-1]
        version, first = _CHUNK_HEADER.unpack_from(last)
        parts = []
        expected = first // CHUNK_ITEMS
        for number, value in chunks:
            if number < expected:
                continue  # emptied by the cap before: nothing of it is kept
            if number != expected or value[0] != CHUNK_FORMAT_VERSION:
                raise ValueError(f"chunk {expected} is missing")
            written_first = _CHUNK_HEADER.unpack_from(value)[1]
            start = max(number * CHUNK_ITEMS, written_first)
            hashes = np.frombuffer(value, dtype=HASH_DTYPE, offset=_CHUNK_HEADER.size)
            full = number == last_number or start + len(hashes) == (number + 1) * CHUNK_ITEMS
            if start > max(number * CHUNK_ITEMS, first) or not full:
                raise ValueError(f"chunk {number} holds other items than its number says")
            parts.append(hashes[max(first - start, 0) :])
            expected += 1
        if version != CHUNK_FORMAT_VERSION or expected != last_number + 1:
            raise ValueError("the last chunk is not the record's last")
    except (ValueError, struct.error, IndexError) as err:
        # Only the exclusion is lost, as with a record RocksDB cannot read.
        log.warning("a consumed-items record in the changelog is incomplete (%s): dropped", err)
        return None
    return encode_consumed(np.concatenate(parts), first)
