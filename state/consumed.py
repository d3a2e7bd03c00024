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

Record layout, format version 1: B version, then one little-endian unsigned
64-bit hash per item, oldest first (8 bytes an item: 40 kB at 5,000 items).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numpy as np

from streamrec.item_hashes import EMPTY, HASH_DTYPE, isin_sorted, item_hash, item_hashes
from streamrec.state.errors import CorruptSessionError

__all__ = ["EMPTY", "HASH_DTYPE", "item_hash", "item_hashes", "isin_sorted"]

CONSUMED_FORMAT_VERSION: Final = 1
_VERSION: Final = bytes([CONSUMED_FORMAT_VERSION])


def with_item(consumed: np.ndarray, hashed: int, cap: int) -> np.ndarray | None:
    """``consumed`` with one more item, the oldest dropped past ``cap``; None if already there."""
    if (consumed == hashed).any():
        return None
    drop = max(len(consumed) + 1 - cap, 0)
    grown = np.empty(len(consumed) + 1 - drop, dtype=HASH_DTYPE)
    grown[:-1] = consumed[drop:]
    grown[-1] = hashed
    return grown


def encode_consumed(consumed: np.ndarray) -> bytes:
    return _VERSION + consumed.tobytes()


def decode_consumed(user_id: str, raw: bytes) -> np.ndarray:
    """The hashes of a record: a read-only view of ``raw``, no copy."""
    if not raw or raw[0] != CONSUMED_FORMAT_VERSION or (len(raw) - 1) % HASH_DTYPE.itemsize:
        raise CorruptSessionError(user_id, f"consumed-items record of {len(raw)} bytes")
    return np.frombuffer(raw, dtype=HASH_DTYPE, offset=1)


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
