"""The items a user has consumed (rated, bought) in their current session: never recommended.

The session record holds only the model's window (the last L interactions); this
record holds every consumed item since the session began, beyond that window,
as 64-bit hashes of the item ids in the order they were first consumed (oldest
first), at most ``cap`` of them: when full, the oldest leaves.  A hash collision
only hides one more item.  It lives under its own key (``c:<user id>``), written
only when a consumption event arrives, so the session record stays small.

>>> consumed = with_item(with_item(EMPTY, item_hash("i9"), cap=2), item_hash("i4"), cap=2)
>>> with_item(consumed, item_hash("i9"), cap=2) is None  # already there: nothing to write
True
>>> full = with_item(consumed, item_hash("i7"), cap=2)
>>> bool(np.isin(item_hashes(["i9", "i4", "i7"]), full).tolist() == [False, True, True])
True
>>> bool((decode_consumed("u1", encode_consumed(full)) == full).all())
True

Record layout, format version 2: B version, 3 bytes of padding, I ``first`` (the
sequence number of its oldest item since the record began, by which the
changelog numbers the record's chunks: ``streamrec.state.consumed_chunks``),
then one little-endian unsigned 64-bit hash per item, oldest first (8 bytes an
item: 40 kB at 5,000 items).  Version 1 (no padding, no ``first``) is still read.

``ConsumedItems`` is how a store stages, reads and caches these records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

import numpy as np
from rocksdict import Rdict

from streamrec.contracts import Event
from streamrec.item_hashes import EMPTY, HASH_DTYPE, isin_sorted, item_hash, item_hashes
from streamrec.lru import SizedLRU
from streamrec.state.errors import CorruptSessionError
from streamrec.state.keys import consumed_key_of
from streamrec.state.memory import consumed_bytes
from streamrec.state.rocks import read_record

__all__ = ["EMPTY", "HASH_DTYPE", "item_hash", "item_hashes", "isin_sorted"]

CONSUMED_FORMAT_VERSION: Final = 2
# Records of the first format: the version byte and the hashes, no ``first``.
FORMAT_1: Final = 1
# Eight bytes, so that the hashes after it are aligned.
_HEADER: Final = struct.Struct("<B3xI")


def with_item(consumed: np.ndarray, hashed: int, cap: int) -> np.ndarray | None:
    """``consumed`` with one more item, the oldest dropped past ``cap``; None if already there."""
    if (consumed == hashed).any():
        return None
    drop = max(len(consumed) + 1 - cap, 0)
    grown = np.empty(len(consumed) + 1 - drop, dtype=HASH_DTYPE)
    grown[:-1] = consumed[drop:]
    grown[-1] = hashed
    return grown


def encode_consumed(consumed: np.ndarray, first: int = 0) -> bytes:
    """The record of the hashes ``consumed``, the oldest of which is item number ``first``."""
    return _HEADER.pack(CONSUMED_FORMAT_VERSION, first) + consumed.tobytes()


def decode_consumed(user_id: str, raw: bytes) -> np.ndarray:
    """The hashes of a record: a read-only view of ``raw``, no copy."""
    return np.frombuffer(raw, dtype=HASH_DTYPE, offset=_hashes_at(user_id, raw))


def first_of(user_id: str, raw: bytes) -> int | None:
    """The sequence number of a record's oldest item; None in a version 1 record."""
    if _hashes_at(user_id, raw) == _HEADER.size:
        return int(_HEADER.unpack_from(raw)[1])
    return None


def _hashes_at(user_id: str, raw: bytes) -> int:
    version = raw[0] if raw else None
    at = _HEADER.size if version == CONSUMED_FORMAT_VERSION else 1
    if version not in (CONSUMED_FORMAT_VERSION, FORMAT_1) or (len(raw) - at) % HASH_DTYPE.itemsize:
        raise CorruptSessionError(user_id, f"consumed-items record of {len(raw)} bytes")
    return at


def parse_types(text: str, known: Iterable[str]) -> frozenset[str]:
    """The event types of a comma-separated setting, each checked against ``known``."""
    types = frozenset(t.strip() for t in text.split(",") if t.strip())
    unknown = types - set(known)
    if unknown:
        raise ValueError(
            f"consumed_types names unknown event types {sorted(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    return types


class ConsumedItems:
    """The consumed-items records of one shard's users, as its store stages, reads and caches them.

    A record is staged with the session of the same event and written in the same
    batch (``take_staged``); it expires with the session (``stage`` with
    ``restarted``).  The latest records read or written stay in memory, ``cache_bytes``
    of them at most, EMPTY where a user has none, so that users who never consume
    cost no read.

    >>> import tempfile
    >>> from streamrec.state.rocks import db_options
    >>> db = Rdict(tempfile.mkdtemp(), db_options())
    >>> items = ConsumedItems(db, frozenset({"rating"}), cap=100, cache_bytes=10_000)
    >>> items.stage(b"c:u1", Event("e1", "u1", "i9", "rating", 0), restarted=False)
    >>> bool((items.of(b"c:u1", "u1") == item_hashes(["i9"])).all())  # staged, not yet written
    True
    >>> list(items.take_staged())  # for the store to write, with the session
    [b'c:u1']
    >>> db.close()
    """

    def __init__(self, db: Rdict, types: frozenset[str], cap: int, cache_bytes: int) -> None:
        self._db = db
        # The event types whose items are kept: none without room for any.
        self.types = types if cap > 0 else frozenset()
        self._cap = cap
        # Staged since the last commit (None: delete), and the latest read or written.
        self._staged: dict[bytes, np.ndarray | None] = {}
        self._cache: SizedLRU[bytes, np.ndarray] = SizedLRU(cache_bytes)

    def of(self, key: bytes, user_id: str) -> np.ndarray:
        """The hashes in the record at ``key``, of ``user_id``, staged ones included.

        Read-only, oldest first.
        """
        if key in self._staged:
            staged = self._staged[key]
            return EMPTY if staged is None else staged
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            raw = read_record(self._db, key, user_id)
            consumed = EMPTY if raw is None else decode_consumed(user_id, raw)
        except CorruptSessionError:
            # Only the exclusion is lost: the next consumption writes a fresh record.
            consumed = EMPTY
        if self._cache.max_bytes:
            self._remember(key, consumed)
        return consumed

    def stage(self, key: bytes, event: Event, restarted: bool) -> None:
        """Stage the record at ``key`` as of ``event``; ``restarted``: a new session began."""
        before = self.of(key, event.user_id)
        if restarted and len(before):
            before = EMPTY  # the consumed items expire with the session
            self._staged[key] = None
        if event.type in self.types:
            after = with_item(before, item_hash(event.item_id), self._cap)
            if after is not None:
                self._staged[key] = after

    def take_staged(self) -> dict[bytes, np.ndarray | None]:
        """The records staged since the last call, by key (None: delete); read-only."""
        staged = self._staged
        if staged:
            self._staged = {}
        return staged

    def remember(self, written: dict[bytes, np.ndarray | None]) -> None:
        """Keep in memory the records just written (``take_staged``)."""
        if self._cache.max_bytes:
            for key, consumed in written.items():
                self._remember(key, EMPTY if consumed is None else consumed)

    def uncache(self, session_key: bytes) -> None:
        """Drop from memory the record of the user whose session key is ``session_key``."""
        self._cache.pop(consumed_key_of(session_key))

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, key: bytes, consumed: np.ndarray) -> None:
        self._cache.put(key, consumed, consumed_bytes(key, consumed))
