"""What one user may add to the online counts: repeats count once, events per half-life capped.

The online popularity and co-visitation counts (``streamrec.model.candidates``)
learn from every live event, so without a limit one key could push an item
into every cold-start list by sending it over and over.  Two rules bound a
user's contribution, both cheap enough for every event:

- an interaction with an item still in the user's window (the session's last L
  items) adds nothing (``is_repeat``): popularity counts users, not clicks;
- each user counts at most ``cap`` events per half-life of the counts
  (``UserQuota``): a count-min sketch of every user's recent events, halved
  once per half-life, which may overestimate a user (another user shares both
  its cells) but never underestimates one, so no key escapes the cap.

>>> quota = UserQuota(cap=2, half_life=1000)
>>> [quota.admit("flooder") for _ in range(4)], quota.admit("someone else")
([True, True, False, False], True)
>>> is_repeat(["a", "b", "a"]), is_repeat(["a", "b", "c"])
(True, False)
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Final

import numpy as np

# Without decay the sketch still forgets, once per this many events: counts that only grew
# would end up above every cap.
DEFAULT_PERIOD: Final = 1_000_000
# Cells per row: about a quarter of the events of a period, so a cell holds ~8 recent events
# of other users on average (two rows: an ordinary user is almost never capped by others).
MIN_WIDTH_BITS: Final = 12
MAX_WIDTH_BITS: Final = 22  # 2 rows x 4 Mi cells x 4 bytes: 32 MB at most


def is_repeat(history: Sequence[str]) -> bool:
    """Whether the newest item of ``history`` (oldest first) is also an earlier one."""
    return len(history) > 1 and history.index(history[-1]) != len(history) - 1


class UserQuota:
    """At most ``cap`` counted events per user per ``half_life`` events seen; 0: no cap."""

    def __init__(self, cap: int, half_life: int = 0) -> None:
        self.cap = cap
        self.period = half_life if half_life > 0 else DEFAULT_PERIOD
        bits = min(max((self.period // 4).bit_length(), MIN_WIDTH_BITS), MAX_WIDTH_BITS)
        self._mask = (1 << bits) - 1
        cells = 0 if cap <= 0 else 1 << bits
        self._rows = (array("i", bytes(4 * cells)), array("i", bytes(4 * cells)))
        # Counts stop growing here: a flooder stays capped for a half-life after it stops.
        self._ceiling = 2 * cap
        self._seen = 0

    def admit(self, user: str) -> bool:
        """Count one event of ``user``; whether it may add to the online counts."""
        if self.cap <= 0:
            return True
        self._seen += 1
        if self._seen >= self.period:
            self._seen = 0
            for row in self._rows:
                cells = np.frombuffer(row, dtype=np.int32)
                np.right_shift(cells, 1, out=cells)
        # str hashes are salted per process: no one can pick ids that share cells on purpose.
        h = hash(user)
        first, second = self._rows
        i, j = h & self._mask, (h >> 32) & self._mask
        a, b = first[i], second[j]
        estimate = a if a < b else b
        if estimate < self._ceiling:
            # Conservative update: only the cells at the estimate grow, so others overcount less.
            if a == estimate:
                first[i] = estimate + 1
            if b == estimate:
                second[j] = estimate + 1
        return estimate < self.cap

    @property
    def nbytes(self) -> int:
        return sum(row.itemsize * len(row) for row in self._rows)
