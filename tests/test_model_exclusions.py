"""Per-user item codes of consumed hashes: always what a fresh lookup gives, within a bound."""

import numpy as np

from streamrec.item_hashes import item_hashes
from streamrec.model.exclusions import ExclusionCodes

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


def test_the_cache_holds_at_most_its_bound_of_codes() -> None:
    codes = ExclusionCodes(HASHES_BY_CODE, max_codes=10)
    for user in range(20):
        record = ITEMS[user : user + 4]
        assert codes.of(f"u{user}", item_hashes(record)).tolist() == codes_of(record)
        assert codes._held <= 10
    assert len(codes._users) == 2  # the most recent users only
