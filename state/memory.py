"""What an entry of the store's in-memory caches costs, estimated in O(1) from its record.

The session and consumed-items caches are bounded in bytes
(``streamrec.lru.SizedLRU``), so every entry needs a size, on every write: no
deep walk of objects, only lengths that are at hand plus overheads measured
with ``tracemalloc`` (tests/test_state_memory.py holds each estimate at or above
what the entry takes, for ordinary and hostile ids alike).

A cached session holds its record (bytes), its decoded header, its key and user
id, and the list of its window's item ids.  Those strings are interned, so a
catalogue's ids are shared by every session that holds them; but a hostile
stream can make every id unique, and the estimate cannot tell the two apart
cheaply.  It counts every string as the session's own: an upper bound, about
three times what an ordinary full session of short shared ids takes (3 kB),
and within a few percent for sessions of long unique ids (14 to 250 kB).

>>> from streamrec.contracts import Event
>>> from streamrec.state.session import Session
>>> s = Session.empty("u1").with_event(Event("e1", "u1", "i9", "view", 0), 0, 0, 50)
>>> session_bytes(b"s:u1", s) > len(s.record)
True
"""

from __future__ import annotations

from typing import Final

import numpy as np

from streamrec.state.session import Session

# The Session object (slots), its header tuple, counts and offsets dict, the key bytes and
# user id str headers, the list of item ids, the LRU's node and its (value, size) pair:
# ~880 B measured, rounded up.
SESSION_OVERHEAD: Final = 1024
# A window item: its list slot, and a str object of its own (header and allocator rounding,
# 56 B; its entry in the interned-strings table, ~32 B); the characters come on top.
ITEM_REF_BYTES: Final = 8 + 88
# A non-ASCII str may hold up to 4 bytes a character (one wide character widens the whole
# string) and a cached UTF-8 copy: at most 5 bytes per byte of its UTF-8 form.
WIDE_FACTOR: Final = 5
# The ndarray object, its base bytes object, the key bytes header and the LRU's entry.
CONSUMED_OVERHEAD: Final = 420


def session_bytes(key: bytes, session: Session) -> int:
    """Bytes the session cache holds for ``session`` at ``key`` (an upper bound)."""
    record = session.record
    ids = session.id_bytes
    narrow = record[len(record) - ids :].isascii() and key.isascii()
    wide = 1 if narrow else WIDE_FACTOR
    # The key bytes and the user id str hold the same characters.
    return (
        SESSION_OVERHEAD
        + len(key) * (1 + wide)
        + len(record)
        + ids * wide
        + ITEM_REF_BYTES * len(session)
    )


def consumed_bytes(key: bytes, hashes: np.ndarray) -> int:
    """Bytes the consumed-items cache holds for the record ``hashes`` at ``key``."""
    return CONSUMED_OVERHEAD + len(key) + hashes.nbytes
