"""The contract of sessions, in one obvious single pass: what every answer and session must be.

A reference for the randomized fault schedules (``tests/test_fault_schedules.py``,
``tests/test_fault_broker.py``).  It reads the events log once, in offset order
per partition, and knows nothing of the flow: no store, no offsets on disk, no
caches, no batching.  Per user:

* a session is the user's interactions in arrival order; an answer sees the
  last ``session_length`` of them, its own included;
* an interaction later than the session's latest event time by more than the
  TTL begins a new session (the old one, and its consumed items, are gone);
* items of a consumption type (``consumed_types``) are consumed: never
  recommended again while the session lives, at most ``consumed_cap`` of them,
  the oldest leaving first, each item once;
* a forget erases the user: the next interaction begins a new session;
* an invalid record changes nothing.

It imports nothing from the project, so a bug in the flow cannot hide in it.

>>> oracle = Oracle(Contract(session_length=2, ttl_ms=1000, consumed_types=frozenset({"rating"})))
>>> oracle.interaction(0, 0, "e1", "u", "a", "rating", 0)
Expected(session=('a',), consumed=('a',))
>>> oracle.interaction(0, 1, "e2", "u", "b", "view", 10)
Expected(session=('a', 'b'), consumed=('a',))
>>> oracle.interaction(0, 2, "e3", "u", "c", "view", 20).session  # the window: the last two
('b', 'c')
>>> oracle.forget(0, 3, "u")
>>> oracle.interaction(0, 4, "e4", "u", "d", "view", 30)
Expected(session=('d',), consumed=())
>>> oracle.interaction(0, 5, "e5", "u", "e", "view", 5000).session  # idle past the TTL
('e',)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Contract:
    """The settings the contract depends on."""

    session_length: int
    ttl_ms: int
    consumed_types: frozenset[str] = frozenset()
    consumed_cap: int = 5000


@dataclass(frozen=True)
class Expected:
    """What an answer must have seen: the session window and the consumed items, as of it."""

    session: tuple[str, ...]
    consumed: tuple[str, ...]


@dataclass
class _User:
    items: list[str] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)
    last_seen: int = 0
    partition: int = 0


@dataclass(frozen=True)
class Read:
    """One record of the log as the oracle read it."""

    partition: int
    offset: int
    event_id: str | None
    user: str | None
    expected: Expected | None  # None: not an interaction (forget, invalid)


class Oracle:
    """The single-pass reference: feed it the log once, in order, and ask what must be."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self._users: dict[str, _User] = {}
        self.reads: dict[tuple[int, int], Read] = {}
        self.by_event: dict[str, Read] = {}
        # Per user, the offsets of their forgets, by partition.
        self.forgets: dict[str, list[tuple[int, int]]] = {}
        self.max_ts: dict[int, int] = {}
        # Every item each user consumed anywhere in the log (bounds what a replay excludes).
        self._consumed_by: dict[str, set[str]] = {}
        self._next: dict[int, int] = {}

    def _check_order(self, partition: int, offset: int) -> None:
        expected = self._next.get(partition, 0)
        if offset < expected:
            raise ValueError(f"the oracle reads each offset once: {partition}@{offset} again")
        self._next[partition] = offset + 1

    def interaction(
        self,
        partition: int,
        offset: int,
        event_id: str,
        user: str,
        item: str,
        type_: str,
        ts: int,
    ) -> Expected:
        """Apply one valid interaction; what its answer must see."""
        self._check_order(partition, offset)
        contract = self.contract
        state = self._users.get(user)
        if state is None or (state.items and ts - state.last_seen > contract.ttl_ms):
            state = self._users[user] = _User(last_seen=ts)
        state.partition = partition
        state.items.append(item)
        state.last_seen = max(state.last_seen, ts)
        if type_ in contract.consumed_types and contract.consumed_cap > 0:
            self._consumed_by.setdefault(user, set()).add(item)
            if item not in state.consumed:
                state.consumed.append(item)
                del state.consumed[: max(len(state.consumed) - contract.consumed_cap, 0)]
        self.max_ts[partition] = max(self.max_ts.get(partition, ts), ts)
        expected = Expected(tuple(state.items[-contract.session_length :]), tuple(state.consumed))
        read = Read(partition, offset, event_id, user, expected)
        self.reads[(partition, offset)] = self.by_event[event_id] = read
        return expected

    def forget(self, partition: int, offset: int, user: str) -> None:
        """Erase ``user``."""
        self._check_order(partition, offset)
        self._users.pop(user, None)
        self.forgets.setdefault(user, []).append((partition, offset))
        self.reads[(partition, offset)] = Read(partition, offset, None, user, None)

    def invalid(self, partition: int, offset: int) -> None:
        """A record that is not a valid event: it changes nothing."""
        self._check_order(partition, offset)
        self.reads[(partition, offset)] = Read(partition, offset, None, None, None)

    def forgotten_after(self, event_id: str) -> bool:
        """Whether the user of ``event_id`` was erased by a later record of the log."""
        read = self.by_event[event_id]
        assert read.user is not None
        return any(
            p == read.partition and o > read.offset for p, o in self.forgets.get(read.user, [])
        )

    def ever_consumed(self, user: str) -> set[str]:
        """Every item ``user`` consumed anywhere in the log: all a replayed answer, which
        excludes what the user consumed up to the moment it is read again, may exclude."""
        return set(self._consumed_by.get(user, set()))

    def sessions(self) -> dict[str, Expected]:
        """Every user's final session (whole, as of the end of the log), erased ones absent."""
        return {
            user: Expected(tuple(s.items[-self.contract.session_length :]), tuple(s.consumed))
            for user, s in self._users.items()
        }

    def may_have_expired(self, user: str) -> bool:
        """Whether a store may have swept ``user``'s session: idle past the TTL by every clock
        its partition could have (none runs ahead of the latest event time read there)."""
        state = self._users.get(user)
        if state is None:
            return True
        return self.max_ts.get(state.partition, 0) - state.last_seen > self.contract.ttl_ms
