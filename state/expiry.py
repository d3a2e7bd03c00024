"""Expiry in event time: the shard's clock, and the bounded sweeps that find idle sessions.

A session idle for longer than the TTL, in event time, counts as absent; sweeps
find such sessions, a bounded number of keys at a time, for the store to remove.
Event time has no single "now": the shard's clock (persisted, whole seconds) is
the median of the latest event times of the last ``CLOCK_VOTERS`` distinct
users, moves only once ``MIN_CLOCK_VOTERS`` have voted, and never runs ahead of
the wall clock by more than the allowed skew, so no single user's clock can
expire the others.  While a crash may still make the flow read events again
(from the store's ``replay_floor`` on), a sweep leaves the sessions of those
events alone: the replay needs their interactions (see ``Session.with_event``).

>>> T = 1_700_000_000_000
>>> expiry = Expiry(ttl_ms=60_000, shard_index=0, skew_ms=3_600_000, wall_ms=lambda: float(T))
>>> expiry.vote(b"s:u1", T + 400)
>>> expiry.vote(b"s:u2", T + 1_700)
>>> expiry.tick() == NO_CLOCK  # two votes are no quorum
True
>>> expiry.vote(b"s:u3", T + 86_400_000)  # a user whose clock is a day ahead
>>> expiry.advance(expiry.tick())  # to the median vote, in whole seconds
>>> expiry.clock_ms - T
1000
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Final
from zlib import crc32

from rocksdict import Rdict, WriteBatch

from streamrec.contracts import Event
from streamrec.state.errors import CorruptSessionError
from streamrec.state.keys import CLOCK_KEY, SESSION_PREFIX, VOTERS_KEY
from streamrec.state.rocks import CLOCK, session_bounds
from streamrec.state.session import NO_REPLAY, Session, applied_offset_of, last_seen_of

# Before any event: earlier than every event time, so nothing counts as expired.
NO_CLOCK: Final = -(2**63)
# The clock counts whole seconds: expiry is judged at most this late.
CLOCK_RESOLUTION_MS: Final = 1000
# The clock is the median of the latest event times of this many recent distinct users, and
# moves only once this many have voted: one user's wrong clock cannot move it.
CLOCK_VOTERS: Final = 63
MIN_CLOCK_VOTERS: Final = 3
SWEEP_BATCH_DEFAULT: Final = 1000
_PREFIX_LEN: Final = len(SESSION_PREFIX)
# A voter: a hash of the user's session key (no user id: erasure) and their latest event time.
_VOTER: Final = struct.Struct("<Iq")


def wall_clock_ms() -> float:
    return time.time() * 1000.0


class Expiry:
    """When the sessions of one shard expire: its clock, its voters, and where sweeps stand.

    Changes nothing on disk by itself: the store puts the clock and the voters in
    its write batches (``put_clock``, ``put_voters``) and removes what a sweep
    finds (``expired_sessions``).
    """

    def __init__(
        self,
        ttl_ms: int,
        shard_index: int,
        skew_ms: int,
        wall_ms: Callable[[], float] = wall_clock_ms,
        clock_ms: int | None = None,
        voters: OrderedDict[int, int] | None = None,
    ) -> None:
        self.ttl_ms = ttl_ms
        self.shard_index = shard_index
        self.skew_ms = skew_ms
        self.wall_ms = wall_ms
        # The clock, in whole seconds (NO_CLOCK before any), and where it moves next.
        self._now_ms = NO_CLOCK if clock_ms is None else clock_ms
        self._next_tick_ms = NO_CLOCK if clock_ms is None else clock_ms + CLOCK_RESOLUTION_MS
        self._voters: OrderedDict[int, int] = OrderedDict() if voters is None else voters
        # Whether a vote since the last count could move the clock (only one at or past
        # its next tick can: the median of votes below it stays below it).
        self._due = True
        self._sweep_from = SESSION_PREFIX

    @property
    def clock_ms(self) -> int | None:
        """The clock, if any event has moved it: the default "now" of expiry."""
        return None if self._now_ms == NO_CLOCK else self._now_ms

    def has_expired(self, stored: Session, event: Event) -> bool:
        """Whether ``event`` comes longer than the TTL after ``stored``'s last: a new session."""
        return event.ts - stored.last_seen_ms > self.ttl_ms

    def is_expired(self, session: Session, now_ms: int | None = None) -> bool:
        """Whether ``session`` was idle for longer than the TTL at ``now_ms`` (the clock)."""
        return session.is_expired(self._now_ms if now_ms is None else now_ms, self.ttl_ms)

    def vote(self, session_key: bytes, ts: int) -> None:
        """Count ``ts`` as the latest event time of the user of ``session_key``."""
        # By a hash of the key: the voters' keys must hold no user id (erasure).
        voter = crc32(session_key)
        voters = self._voters
        voters[voter] = ts
        voters.move_to_end(voter)
        if ts >= self._next_tick_ms:
            self._due = True
        if len(voters) > CLOCK_VOTERS:
            voters.popitem(last=False)

    def unvote(self, session_key: bytes) -> None:
        """Drop the vote of the user of ``session_key`` (erased)."""
        self._voters.pop(crc32(session_key), None)

    def tick(self) -> int:
        """The clock to move to with the next write, or NO_CLOCK to keep it where it is."""
        if not self._due:
            return NO_CLOCK
        self._due = False
        voters = self._voters
        if len(voters) < MIN_CLOCK_VOTERS:
            return NO_CLOCK
        times = sorted(voters.values())
        # Capped by the wall clock: a majority of wrong clocks still cannot run it far ahead.
        median = min(times[len(times) // 2], int(self.wall_ms()) + self.skew_ms)
        tick = median - median % CLOCK_RESOLUTION_MS
        return tick if tick >= self._next_tick_ms else NO_CLOCK

    def put_clock(self, batch: WriteBatch, tick: int) -> None:
        """Add the clock at ``tick`` to ``batch`` (``advance`` once it is written)."""
        batch.put(CLOCK_KEY, CLOCK.pack(tick))

    def advance(self, tick: int) -> None:
        """Move the clock to ``tick``, once the batch ``put_clock`` added it to is written."""
        self._now_ms, self._next_tick_ms = tick, tick + CLOCK_RESOLUTION_MS

    def put_voters(self, batch: WriteBatch) -> None:
        """Add the voters to ``batch``: the clock they voted for is read back with them."""
        batch.put(VOTERS_KEY, b"".join([_VOTER.pack(v, ts) for v, ts in self._voters.items()]))

    def expired_sessions(
        self,
        db: Rdict,
        now_ms: int | None = None,
        max_keys: int = SWEEP_BATCH_DEFAULT,
        replay_floor: int = NO_REPLAY,
    ) -> Iterator[tuple[bytes, bytes | None]]:
        """Of up to ``max_keys`` sessions after the last sweep's, those expired by ``now_ms``.

        Each as (key, None), or (key, record) where the record cannot be read (the
        store moves it aside).  Expiry is judged by the clock unless ``now_ms`` is
        given; a session with an event read at or after ``replay_floor`` is kept.
        """
        now = self._now_ms if now_ms is None else now_ms
        cursor = db.iter(session_bounds())
        cursor.seek(self._sweep_from)
        examined = 0
        while examined < max_keys and cursor.valid():
            key = cursor.key()
            # Resume after this key next time, even if its record turns out corrupt.
            self._sweep_from = key + b"\x00"
            try:
                value = cursor.value()
                idle = now - last_seen_of(key[_PREFIX_LEN:], value) > self.ttl_ms
                if idle and self._replay_needs(key, value, replay_floor):
                    idle = False  # a later sweep takes it, once reading has moved on
                unreadable = None
            except CorruptSessionError:
                unreadable = cursor.value()
                idle = True
            if idle:
                yield key, unreadable
            examined += 1
            cursor.next()
        if not cursor.valid():
            self._sweep_from = SESSION_PREFIX  # the end: start over next time

    def _replay_needs(self, key: bytes, raw: bytes, floor: int) -> bool:
        """Whether a crash could make this shard read an event of this session again."""
        if floor == NO_REPLAY:
            return False
        applied = applied_offset_of(key[_PREFIX_LEN:], raw, self.shard_index)
        return applied is not None and applied >= floor


def read_voters(db: Rdict) -> OrderedDict[int, int]:
    """The voters as last written (``put_voters``), oldest vote first."""
    return OrderedDict(_VOTER.iter_unpack(db.get(VOTERS_KEY) or b""))
