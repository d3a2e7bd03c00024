"""Consumed-item hashes (``streamrec.state.consumed``) → the vocabulary's item codes, per user.

A user's consumed record only ever grows by appending an item (the oldest
leaving at the cap), and the flow asks for the user's codes on each of their
events: so each user's codes are kept and brought up to date by looking up the
appended hashes alone, instead of searching all of them (thousands for a heavy
user) again on every event.  The cache is bounded by the codes it holds.

>>> from streamrec.item_hashes import HASH_DTYPE, item_hashes
>>> hashes_by_code = np.concatenate([np.zeros(1, HASH_DTYPE), item_hashes(["a", "b", "c"])])
>>> codes = ExclusionCodes(hashes_by_code)
>>> codes.of("u1", item_hashes(["b", "zzz"])).tolist()  # zzz: not in the vocabulary
[2, 0]
>>> codes.of("u1", item_hashes(["b", "zzz", "c"])).tolist()  # one appended: one lookup
[2, 0, 3]
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from streamrec.item_hashes import HASH_DTYPE, find_sorted

PAD = 0
MAX_CACHED_CODES = 4_000_000  # 32 MB of int64 codes at most, over all cached users


class ExclusionCodes:
    """Codes aligned with a user's consumed hashes (PAD where not in the vocabulary)."""

    def __init__(self, hashes_by_code: np.ndarray, max_codes: int = MAX_CACHED_CODES) -> None:
        if hashes_by_code.dtype != HASH_DTYPE:  # e.g. floats, which lose a hash's low bits
            raise TypeError(f"item hashes must be {HASH_DTYPE}, got {hashes_by_code.dtype}")
        # Code 0 is padding: its hash (0) is left out of the search.
        self._codes_by_hash = np.argsort(hashes_by_code[1:], kind="stable") + 1
        self._sorted_hashes = hashes_by_code[self._codes_by_hash]
        self._users: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._held = 0
        self._max_codes = max_codes

    def of(self, user: str | None, hashes: np.ndarray) -> np.ndarray:
        """The codes of ``hashes``, the user's consumed record as of their current event."""
        if user is None or not len(hashes):
            return self.lookup(hashes)
        cached = self._users.get(user)
        if cached is not None:
            before, codes = cached
            if before is hashes:  # nothing consumed since: the store hands the same array
                self._users.move_to_end(user)
                return codes
            codes = self._grown(before, codes, hashes)
            self._forget(user)
        else:
            codes = self.lookup(hashes)
        self._users[user] = (hashes, codes)
        self._held += len(codes)
        while self._held > self._max_codes and self._users:
            self._forget(next(iter(self._users)))
        return codes

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

    def _forget(self, user: str) -> None:
        _, codes = self._users.pop(user)
        self._held -= len(codes)
