"""The byte-bounded LRU under the caches: what it keeps, what it counts."""

from __future__ import annotations

import pytest

from streamrec.lru import SizedLRU


def test_putting_a_key_again_counts_its_new_size_only() -> None:
    cache: SizedLRU[str, str] = SizedLRU(100)
    cache.put("a", "small", 10)
    cache.put("a", "larger", 60)
    assert cache.bytes == 60 and len(cache) == 1 and cache.get("a") == "larger"


def test_an_entry_larger_than_the_bound_is_not_kept_and_drops_its_older_value() -> None:
    cache: SizedLRU[str, str] = SizedLRU(100)
    cache.put("a", "old", 10)
    cache.put("b", "kept", 10)
    cache.put("a", "huge", 101)
    assert "a" not in cache and cache.get("b") == "kept" and cache.bytes == 10


def test_a_read_keeps_an_entry_and_a_peek_does_not() -> None:
    cache: SizedLRU[str, int] = SizedLRU(30)
    for key in "abc":
        cache.put(key, ord(key), 10)
    cache.get("a")  # now the most recently used
    cache.peek("b")  # still the least recently used
    cache.put("d", 0, 10)
    assert list(cache.keys()) == ["c", "a", "d"]


def test_a_bound_of_zero_keeps_nothing_and_a_negative_one_is_refused() -> None:
    cache: SizedLRU[str, int] = SizedLRU(0)
    cache.put("a", 1, 1)
    assert len(cache) == 0 and cache.pop("a") is None
    with pytest.raises(ValueError):
        SizedLRU(-1)
