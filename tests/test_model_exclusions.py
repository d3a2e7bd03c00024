"""Per-user item codes of consumed hashes: always what a fresh lookup gives, within a bound."""

import gc
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from streamrec.item_hashes import item_hashes
from streamrec.lru import MB
from streamrec.model.exclusions import ExclusionCodes, entry_bytes

ITEMS = [f"i{n}" for n in range(50)]
HASHES_BY_CODE = np.concatenate([np.zeros(1, dtype=np.uint64), item_hashes(ITEMS)])


def codes_of(items: list[str]) -> list[int]:
    return [ITEMS.index(i) + 1 if i in ITEMS else 0 for i in items]


def test_a_record_at_its_cap_drops_its_oldest_code_as_it_grows() -> None:
    codes = ExclusionCodes(HASHES_BY_CODE)
    window = ["i1", "i2", "unknown", "i3"]
    assert codes.of("u", item_hashes(window)).tolist() == codes_of(window)
    for item in ["i4", "i5", "i4x"]:  # each append drops the oldest (a cap of 4)
        window = [*window[1:], item]
        assert codes.of("u", item_hashes(window)).tolist() == codes_of(window)


def test_a_record_that_is_not_a_continuation_is_looked_up_anew() -> None:
    codes = ExclusionCodes(HASHES_BY_CODE)
    codes.of("u", item_hashes(["i1", "i2", "i3"]))
    restarted = ["i9", "i2"]  # the session expired and began again
    assert codes.of("u", item_hashes(restarted)).tolist() == codes_of(restarted)
    replaced = ["i7", "i8", "i1", "i3"]  # same length + 1, a different record
    assert codes.of("u", item_hashes(replaced)).tolist() == codes_of(replaced)


def test_the_cache_holds_at_most_its_bound_in_bytes() -> None:
    bound = 20_000
    codes = ExclusionCodes(HASHES_BY_CODE, max_bytes=bound)
    for user in range(200):
        record = ITEMS[user % 40 : user % 40 + 4]
        assert codes.of(f"u{user}", item_hashes(record)).tolist() == codes_of(record)
        assert 0 < codes.held_bytes <= bound


def held_by(fill: Callable[[ExclusionCodes], None], max_bytes: int) -> int:
    """The bytes tracemalloc sees a cache hold once ``fill`` has run."""
    codes = ExclusionCodes(HASHES_BY_CODE, max_bytes)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        fill(codes)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("items", [1, 40, 5000])
def test_a_cached_user_takes_no_more_than_its_estimate(items: int) -> None:
    users = 50 if items == 5000 else 2000
    rng = np.random.default_rng(0)
    records = [rng.choice(HASHES_BY_CODE[1:], items) for _ in range(users)]
    estimate = entry_bytes("u0000", records[0], np.zeros(items, np.int64))

    def fill(codes: ExclusionCodes) -> None:
        for n, record in enumerate(records):
            codes.of(f"u{n:04d}", record)

    held = held_by(fill, 1024 * MB)
    assert held / users <= estimate <= 2 * held / users


def test_many_users_of_one_item_each_stay_within_the_bound() -> None:
    # The bound once counted codes alone: a million users of one item each were 8 MB of
    # codes, and ~470 MB of memory.
    def fill(codes: ExclusionCodes) -> None:
        for n in range(20_000):
            codes.of(f"user-{n}", item_hashes([ITEMS[n % 50]]))

    assert held_by(fill, MB) <= MB
