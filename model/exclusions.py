"""Consumed-item hashes (``streamrec.state.consumed``) → the vocabulary's item codes, per user.

A user's consumed record only ever grows by appending an item (the oldest
leaving at the cap), and the flow asks for the user's codes on each of their
events: so each user's codes are kept and brought up to date by looking up the
appended hashes alone, instead of searching all of them (thousands for a heavy
user) again on every event.  The cache is bounded in bytes (``exclusion_cache_mb``):
each user counts their hashes and codes (16 bytes an item) and a measured
overhead, so a million users of one item each count as what they take, not as
a million codes.

>>> from streamrec.item_hashes import HASH_DTYPE, item_hashes
>>> hashes_by_code = np.concatenate([np.zeros(1, HASH_DTYPE), item_hashes(["a", "b", "c"])])
>>> codes = ExclusionCodes(hashes_by_code)
>>> codes.of("u1", item_hashes(["b", "zzz"])).tolist()  # zzz: not in the vocabulary
[2, 0]
>>> codes.of("u1", item_hashes(["b", "zzz", "c"])).tolist()  # one appended: one lookup
[2, 0, 3]
"""

from __future__ import annotations

from typing import Final

import numpy as np

from streamrec.item_hashes import HASH_DTYPE, find_sorted
from streamrec.lru import MB, SizedLRU

PAD = 0
DEFAULT_MAX_BYTES: Final = 32 * MB
# Per user: the LRU's node and (value, size) pair, the (hashes, codes) tuple, the codes
# ndarray object and the user id str header (510 to 560 B measured with tracemalloc).
ENTRY_OVERHEAD: Final = 600
# A non-ASCII user id may take 4 bytes a character and a cached UTF-8 copy.
WIDE_FACTOR: Final = 5


def entry_bytes(user: str, hashes: np.ndarray, codes: np.ndarray) -> int:
    """What one user's entry holds: the hashes are counted too, whoever else holds them."""
    chars = len(user) if user.isascii() else WIDE_FACTOR * len(user.encode())
    return ENTRY_OVERHEAD + chars + hashes.nbytes + codes.nbytes


class ExclusionCodes:
    """Codes aligned with a user's consumed hashes (PAD where not in the vocabulary)."""

    def __init__(self, hashes_by_code: np.ndarray, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if hashes_by_code.dtype != HASH_DTYPE:  # e.g. floats, which lose a hash's low bits
            raise TypeError(f"item hashes must be {HASH_DTYPE}, got {hashes_by_code.dtype}")
        # Code 0 is padding: its hash (0) is left out of the search.
        self._codes_by_hash = np.argsort(hashes_by_code[1:], kind="stable") + 1
        self._sorted_hashes = hashes_by_code[self._codes_by_hash]
        self._users: SizedLRU[str, tuple[np.ndarray, np.ndarray]] = SizedLRU(max_bytes)

    def of(self, user: str | None, hashes: np.ndarray) -> np.ndarray:
        """The codes of ``hashes``, the user's consumed record as of their current event."""
        if user is None or not len(hashes):
            return self.lookup(hashes)
        users = self._users
        cached = users.get(user)
        if cached is not None:
            before, codes = cached
            if before is hashes:  # nothing consumed since: the store hands the same array
                return codes
            codes = self._grown(before, codes, hashes)
        else:
            codes = self.lookup(hashes)
        users.put(user, (hashes, codes), entry_bytes(user, hashes, codes))
        return codes

    @property
    def held_bytes(self) -> int:
        """What the cached users count, in bytes (at most the bound)."""
        return self._users.bytes

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        at, found = find_sorted(hashes, self._sorted_hashes)
        codes = np.full(len(hashes), PAD, dtype=np.int64)  # where not in the vocabulary
        codes[found] = self._codes_by_hash[at[found]]
        return codes

    def _grown(self, before: np.ndarray, codes: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Codes of ``after`` from those of ``before``, if ``after`` is ``before`` with items
        appended (and as many oldest ones dropped as the cap requires); else looked up anew."""
        for added in range(1, 4):
            dropped = len(before) + added - len(after)
            kept = len(before) - dropped
            if 0 <= dropped <= len(before) and np.array_equal(after[:kept], before[dropped:]):
                return np.concatenate((codes[dropped:], self.lookup(after[kept:])))
        return self.lookup(after)
