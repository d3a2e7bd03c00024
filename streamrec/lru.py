"""A least-recently-used map bounded in bytes: the in-memory caches of state and model.

Each entry is stored with its size in bytes, which the caller estimates
(cheaply: a record's length plus a measured overhead, never a deep walk of the
object); when the total passes the bound, the least recently used entries
leave.  An entry larger than the whole bound is not kept.

>>> cache = SizedLRU(100)
>>> cache.put("a", "A", 40)
>>> cache.put("b", "B", 40)
>>> cache.get("a")  # now the most recently used
'A'
>>> cache.put("c", "C", 40)  # 120 > 100: "b", the least recently used, leaves
>>> sorted(cache.keys()), cache.bytes
(['a', 'c'], 80)

cachetools' ``LRUCache(getsizeof=...)`` does the same, at about 0.9 µs a read
and 1.5 µs a write here against 0.13 and 0.24 µs for this thin layer over
``OrderedDict``: the caches sit on every event's path, three of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MB = 1024 * 1024


class SizedLRU(Generic[K, V]):
    """Entries with their sizes, at most ``max_bytes`` in all; 0 keeps nothing."""

    __slots__ = ("max_bytes", "bytes", "_entries")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"a cache bound must be 0 or more bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value at ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def peek(self, key: K) -> V | None:
        """The value at ``key``, leaving the order as it is."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Keep ``value`` at ``key`` as the most recently used; evict past the bound."""
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return  # it alone would pass the bound (and with 0, nothing is kept)
        entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = entries.popitem(last=False)
            self.bytes -= evicted

    def pop(self, key: K) -> V | None:
        """Remove the entry at ``key``; its value, or None."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def keys(self) -> Iterator[K]:
        """The keys, least recently used first."""
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
