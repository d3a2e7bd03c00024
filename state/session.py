"""One user's session, what the flow knows about them, as a compact versioned record.

A session holds the user's last L interactions in arrival order (item id, event
time, event type, value), counters by event type, the earliest and latest event
time seen, and the last applied source offset of every Kafka partition the
user's events came from.  The scorer builds its inputs from ``item_ids`` alone.

>>> from streamrec.contracts import Event
>>> s = Session.empty("u1").with_event(
...     Event("e1", "u1", "i9", "rating", 1_700_000_000_000, 4.5), 0, 41, max_items=50
... )
>>> s.item_ids, s.count("rating"), s.offsets
(['i9'], 1, {0: 41})
>>> decode_session("u1", encode_session(s)) == s
True

Record layout, format version 3 (little-endian).  The fixed-width fields of an
interaction form one row and the item ids follow in one block, so that adding an
interaction copies two byte ranges and appends, without decoding the others:

========  ===============================================================
header    B version, q first_seen_ms, q last_seen_ms, 5 Q counts (in
          ``EVENT_TYPES`` order), i last_partition, H partitions, H items
          in the window, H items in the replay tail
offsets   per partition, ascending: i partition, q offset of the last
          applied event
rows      per interaction, tail first: q event time (ms), q source offset
          (-1: applied before format 3), B index in ``EVENT_TYPES``, d value
          (NaN where the event had none), H bytes of its item id
item ids  the item ids as JSON strings, comma separated (any text is safe)
========  ===============================================================

The window is the last L interactions: the scorer's input.  The replay tail
keeps the interactions that left the window while an event they preceded may
still be read again after a crash (its offset at or above the replay floor),
so that a replayed event is answered from the session *as of that event*
(``item_ids_as_of``).  Version 2 records (no row offsets, no tail) are read and
rewritten as version 3 on their next event.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any, Final, NamedTuple

import orjson

from streamrec.contracts import Event
from streamrec.state.errors import CorruptSessionError, UnknownSessionFormatError

SESSION_FORMAT_VERSION: Final = 3
# The previous format, still read: its records become version 3 on their next write.
_FORMAT_2: Final = 2
# An interaction applied before rows carried offsets: older than any replay.
UNKNOWN_OFFSET: Final = -1
# The replay floor of a session applied outside a flow (no crash can replay it): no tail.
NO_REPLAY: Final = 2**63 - 1
# The order is part of the record format: append new types, never reorder.
EVENT_TYPES: Final = ("view", "click", "add_to_cart", "purchase", "rating")
TYPE_CODES: Final = {name: code for code, name in enumerate(EVENT_TYPES)}
NO_VALUE: Final = math.nan

_HEADER: Final = struct.Struct("<BqqQQQQQiHHH")
_OFFSET: Final = struct.Struct("<iq")
_ROW: Final = struct.Struct("<qqBdH")
_ROW_OFFSET: Final = struct.Struct("<q")
_ID_SIZE: Final = struct.Struct("<H")
_OFFSET_IN_ROW: Final = 8
_ID_SIZE_IN_ROW: Final = 8 + 8 + 1 + 8
_TYPE_IN_ROW: Final = 16
_HEADER_2: Final = struct.Struct("<BqqQQQQQiHH")
_ROW_2: Final = struct.Struct("<qBdH")
_LAST_SEEN: Final = struct.Struct("<q")
_LAST_SEEN_AT: Final = 1 + 8  # after the version byte and first_seen_ms
_KNOWN_TYPE_CODES: Final = bytes(range(len(EVENT_TYPES)))
_COMMA: Final = ord(",")


class Interaction(NamedTuple):
    """One remembered interaction of a session."""

    item_id: str
    ts: int
    type: str
    value: float | None


class Session:
    """The state of one user: an immutable view of its record, a function of the events applied.

    Responsibilities: read a record (the header at once, the interactions when
    asked) and make the record of the session with one more event
    (``with_event``), which copies the kept rows and item ids and appends to them,
    never decoding the other interactions.  Two sessions are equal when their
    records are: the encoding is canonical (offsets sorted by partition).  Treat
    every attribute as read-only.
    """

    __slots__ = (
        "user_id",
        "record",
        "first_seen_ms",
        "last_seen_ms",
        "counts",
        "last_partition",
        "offsets",
        "_n",
        "_tail",
        "_rows_at",
        "_item_ids",
    )

    def __init__(
        self,
        user_id: str,
        record: bytes,
        header: tuple[int, ...],
        offsets: dict[int, int],
    ) -> None:
        """Use ``Session.empty``, ``with_event`` or ``decode_session``: they check the record."""
        self.user_id = user_id
        self.record = record
        self.first_seen_ms: int = header[1]
        self.last_seen_ms: int = header[2]
        self.counts: tuple[int, ...] = header[3:8]
        self.last_partition: int = header[8]
        self.offsets = offsets
        self._n: int = header[10]
        self._tail: int = header[11]
        self._rows_at = _HEADER.size + _OFFSET.size * header[9]
        # The window's item ids (not the tail's), derived or parsed once.
        self._item_ids: list[str] | None = None

    @classmethod
    def empty(cls, user_id: str, offsets: dict[int, int] | None = None) -> Session:
        """A session with no interactions; ``offsets`` carries the stamps of an expired one."""
        offsets = {} if offsets is None else dict(sorted(offsets.items()))
        header = (SESSION_FORMAT_VERSION, 0, 0, 0, 0, 0, 0, 0, -1, len(offsets), 0, 0)
        record = _HEADER.pack(*header) + _pack_offsets(offsets)
        session = cls(user_id, record, header, offsets)
        session._item_ids = []
        return session

    def restarted(self) -> Session:
        """This session, expired, begun afresh: an empty window, every interaction in the tail.

        ``with_event`` then drops those that no replayable event needs, so a
        replay of an event from before the restart is still answered as it was.
        """
        rows = self._n + self._tail
        header = (SESSION_FORMAT_VERSION, 0, 0, 0, 0, 0, 0, 0, -1, len(self.offsets), 0, rows)
        session = Session(
            self.user_id, _HEADER.pack(*header) + self.record[_HEADER.size :], header, self.offsets
        )
        session._item_ids = []
        return session

    def with_event(
        self,
        event: Event,
        partition: int,
        offset: int,
        max_items: int,
        replay_floor: int = NO_REPLAY,
        max_tail: int = 0,
    ) -> Session:
        """The session after ``event`` (read at ``offset`` of ``partition``), ``max_items`` long.

        Interactions that leave the window stay in the replay tail (at most
        ``max_tail``) while a replayable event (offset at or above
        ``replay_floor``) needs them in its own window.
        """
        # Every event of a stream goes through here: few calls, no decoding of the kept rows.
        code = TYPE_CODES.get(event.type)
        if code is None:
            raise ValueError(
                f"event {event.event_id!r} has type {event.type!r}, not one of {EVENT_TYPES}"
            )
        if max_items < 1:
            raise ValueError(f"a session keeps at least 1 interaction, not {max_items}")
        ts = event.ts
        n = self._n
        rows = n + self._tail
        if n:
            first_seen = min(self.first_seen_ms, ts)
            last_seen = max(self.last_seen_ms, ts)
        else:
            first_seen = last_seen = ts
        window = n + 1 if n < max_items else max_items
        # The tail may also take the room a short window leaves (a session just restarted by
        # expiry): a session keeps at most ``max_items + max_tail`` interactions either way.
        room = max_tail + max_items - window if max_tail > 0 else 0
        drop = self._rows_to_drop(rows + 1 - window, max_items, replay_floor, room)
        keep = rows - drop
        offsets = self.offsets.copy()
        if partition not in offsets:
            offsets[partition] = offset
            offsets = dict(sorted(offsets.items()))
        else:
            offsets[partition] = offset
        counts = list(self.counts)
        counts[code] += 1
        header = (
            SESSION_FORMAT_VERSION,
            first_seen,
            last_seen,
            *counts,
            partition,
            len(offsets),
            window,
            keep + 1 - window,
        )
        value = event.value
        item = orjson.dumps(event.item_id)
        record = self.record
        rows_at = self._rows_at
        ids_at = rows_at + _ROW.size * rows
        if not keep:
            ids_kept = b""
        elif drop:
            ids_kept = record[ids_at + self._id_bytes_of_oldest(drop, ids_at) :]
        else:
            ids_kept = record[ids_at:]
        new_record = b"".join(
            (
                _HEADER.pack(*header),
                _pack_offsets(offsets),
                record[rows_at + _ROW.size * drop : ids_at],
                # NaN is the column's "no value"; a NaN value (never valid on the wire) is none.
                _ROW.pack(ts, offset, code, NO_VALUE if value is None else value, len(item)),
                ids_kept,
                b"," if keep else b"",
                item,
            )
        )
        session = Session(self.user_id, new_record, header, offsets)
        if self._item_ids is not None:
            # The scorer reads the ids of every new session: derive them instead of parsing.
            leaving = n + 1 - window
            session._item_ids = [*self._item_ids[leaving:], sys.intern(event.item_id)]
        return session

    def _rows_to_drop(self, beyond: int, max_items: int, floor: int, max_tail: int) -> int:
        """How many of the ``beyond`` oldest rows (those outside the new window) to drop."""
        if beyond <= 0:
            return 0
        if max_tail <= 0 or floor == NO_REPLAY:
            return beyond
        # Keep what the window of the oldest replayable event (offset >= floor) reaches back
        # to.  Rows are in offset order, so a binary search finds that event's row; usually
        # the newest row is already below the floor and one read settles it.
        record, at, size = self.record, self._rows_at + _OFFSET_IN_ROW, _ROW.size
        low, high = 0, self._n + self._tail
        if high and _ROW_OFFSET.unpack_from(record, at + (high - 1) * size)[0] >= floor:
            while low < high:
                middle = (low + high) // 2
                if _ROW_OFFSET.unpack_from(record, at + middle * size)[0] >= floor:
                    high = middle
                else:
                    low = middle + 1
        else:
            low = high
        needed_from = max(low - (max_items - 1), 0)
        return max(min(needed_from, beyond), beyond - max_tail)

    def _id_bytes_of_oldest(self, k: int, ids_at: int) -> int:
        """Bytes of the ``k`` oldest item ids (tail first), each with its trailing comma."""
        record = self.record
        at = self._rows_at + _ID_SIZE_IN_ROW
        cut = k
        for _ in range(k):
            cut += _ID_SIZE.unpack_from(record, at)[0]
            at += _ROW.size
        if len(record) < ids_at + cut or record[ids_at + cut - 1] != _COMMA:
            raise CorruptSessionError(self.user_id, "the item id sizes do not match the item ids")
        return cut

    def __len__(self) -> int:
        return self._n

    @property
    def item_ids(self) -> list[str]:
        """The item ids of the window, oldest first: the scorer's input.  Do not modify."""
        if self._item_ids is None:
            self._item_ids = self._all_item_ids()[self._tail :]
        return self._item_ids

    def _all_item_ids(self) -> list[str]:
        """The item ids of the tail and the window, oldest first."""
        rows = self._n + self._tail
        ids_at = self._rows_at + _ROW.size * rows
        try:
            # Interned: the sessions a store keeps in memory share each item's string.
            item_ids = list(map(sys.intern, orjson.loads(b"[" + self.record[ids_at:] + b"]")))
        except orjson.JSONDecodeError as err:
            raise CorruptSessionError(self.user_id, f"item ids: {err}") from None
        if len(item_ids) != rows:
            raise CorruptSessionError(self.user_id, f"{len(item_ids)} item ids for {rows} rows")
        return item_ids

    def item_ids_as_of(self, offset: int, max_items: int, ttl_ms: int | None = None) -> list[str]:
        """The window as it was after the event at ``offset``: a replayed event's scorer input.

        Complete while the replay tail reaches back far enough (see ``with_event``);
        interactions applied before format 3 count as older than any offset.  With
        ``ttl_ms``, a session that expired and restarted since (``restarted``) is told
        apart by the gap in event time that restarted it.
        """
        rows = self._rows(with_tail=True)
        upto = len(rows)
        while upto and rows[upto - 1][1] > offset:
            upto -= 1
        start = max(upto - max_items, 0)
        if ttl_ms is not None and upto > 1:
            # As the store decides expiry: an event later than the session's latest time by
            # more than the TTL begins a new one.
            latest = rows[0][0]
            for index in range(1, upto):
                ts = rows[index][0]
                if ts - latest > ttl_ms:
                    start = max(start, index)
                latest = max(latest, ts)
        return self._all_item_ids()[start:upto]

    @property
    def id_bytes(self) -> int:
        """Bytes of the record's item ids (window and tail, as JSON): what their strings hold."""
        return len(self.record) - self._rows_at - _ROW.size * (self._n + self._tail)

    @property
    def tail_length(self) -> int:
        """Interactions kept beyond the window for replays."""
        return self._tail

    def _rows(self, with_tail: bool = False) -> list[tuple[int, int, int, float, int]]:
        start = self._rows_at + (0 if with_tail else _ROW.size * self._tail)
        return list(
            _ROW.iter_unpack(
                self.record[start : self._rows_at + _ROW.size * (self._n + self._tail)]
            )
        )

    @property
    def times_ms(self) -> list[int]:
        """The event times of the window's interactions, oldest first."""
        return [row[0] for row in self._rows()]

    @property
    def source_offsets(self) -> list[int]:
        """The source offsets of the window's interactions, oldest first (-1: not recorded)."""
        return [row[1] for row in self._rows()]

    @property
    def values(self) -> list[float | None]:
        """The values of the window's interactions (None where there was none), oldest first."""
        return [None if math.isnan(row[3]) else row[3] for row in self._rows()]

    def interactions(self) -> list[Interaction]:
        """The window's interactions, oldest first (arrival order)."""
        return [
            Interaction(item_id, ts, EVENT_TYPES[code], None if math.isnan(value) else value)
            for item_id, (ts, _, code, value, _) in zip(self.item_ids, self._rows(), strict=True)
        ]

    def applied_offset(self, partition: int) -> int | None:
        """The offset of the last event applied from ``partition``, if any."""
        return self.offsets.get(partition)

    @property
    def last_offset(self) -> int:
        """The source offset of the last event applied (in ``last_partition``)."""
        return self.offsets[self.last_partition]

    def count(self, event_type: str) -> int:
        """How many events of ``event_type`` this session has seen (not only the last L)."""
        return self.counts[TYPE_CODES[event_type]]

    def is_expired(self, now_ms: int, ttl_ms: int) -> bool:
        """Whether the session was idle (in event time) for longer than ``ttl_ms`` at ``now_ms``."""
        return now_ms - self.last_seen_ms > ttl_ms

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, for display and comparison."""
        return {
            "user_id": self.user_id,
            "first_seen_ms": self.first_seen_ms,
            "last_seen_ms": self.last_seen_ms,
            "counts": dict(zip(EVENT_TYPES, self.counts, strict=True)),
            "source": {
                "partition": self.last_partition,
                "offset": self.offsets.get(self.last_partition),
            },
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "interactions": [i._asdict() for i in self.interactions()],
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Session):
            return NotImplemented
        return self.user_id == other.user_id and self.record == other.record

    def __hash__(self) -> int:
        return hash((self.user_id, self.record))

    def __repr__(self) -> str:
        return (
            f"Session(user_id={self.user_id!r}, items={self._n}, tail={self._tail}, "
            f"counts={self.counts}, "
            f"seen={self.first_seen_ms}..{self.last_seen_ms}, offsets={self.offsets})"
        )


def encode_session(session: Session) -> bytes:
    """The record bytes of ``session`` (format ``SESSION_FORMAT_VERSION``)."""
    return session.record


def decode_session(user_id: str, raw: bytes) -> Session:
    """The session stored as ``raw``; a record that does not decode raises a named error."""
    if not raw:
        raise CorruptSessionError(user_id, "the record is empty")
    if raw[0] == _FORMAT_2:
        raw = _upgrade_from_2(user_id, raw)
    elif raw[0] != SESSION_FORMAT_VERSION:
        raise UnknownSessionFormatError(user_id, raw[0], SESSION_FORMAT_VERSION)
    try:
        header = _HEADER.unpack_from(raw)
        offsets, at = _unpack_offsets(raw, _HEADER.size, header[9])
    except struct.error as err:
        raise CorruptSessionError(user_id, f"truncated record ({err})") from None
    n, rows = header[10], header[10] + header[11]
    # The rows must fit, and each item id takes at least its two quotes and a comma
    # between two; the item ids themselves are checked when read or cut.
    ids_at = at + _ROW.size * rows
    if len(raw) < ids_at + max(3 * rows - 1, 0):
        raise CorruptSessionError(user_id, f"the record is too short for {rows} interactions")
    if raw[at + _TYPE_IN_ROW : ids_at : _ROW.size].translate(None, _KNOWN_TYPE_CODES):
        raise CorruptSessionError(user_id, "unknown event type code")
    if n and header[8] not in offsets:
        raise CorruptSessionError(user_id, f"no offset for the last partition, {header[8]}")
    return Session(user_id, raw, header, offsets)


def _unpack_offsets(raw: bytes, at: int, partitions: int) -> tuple[dict[int, int], int]:
    offsets = {}
    for _ in range(partitions):
        partition, offset = _OFFSET.unpack_from(raw, at)
        offsets[partition] = offset
        at += _OFFSET.size
    return offsets, at


def _upgrade_from_2(user_id: str, raw: bytes) -> bytes:
    """A format 2 record as format 3: no replay tail, rows with ``UNKNOWN_OFFSET``."""
    try:
        header = _HEADER_2.unpack_from(raw)
        _, at = _unpack_offsets(raw, _HEADER_2.size, header[9])
        n = header[10]
        rows = [
            _ROW.pack(ts, UNKNOWN_OFFSET, code, value, size)
            for ts, code, value, size in _ROW_2.iter_unpack(raw[at : at + _ROW_2.size * n])
        ]
    except struct.error as err:
        raise CorruptSessionError(user_id, f"truncated format 2 record ({err})") from None
    return b"".join(
        (
            _HEADER.pack(SESSION_FORMAT_VERSION, *header[1:], 0),
            raw[_HEADER_2.size : at],
            *rows,
            raw[at + _ROW_2.size * n :],
        )
    )


def last_seen_of(user_key: str | bytes, raw: bytes) -> int:
    """The last event time of a stored record, read from its header alone (for sweeps)."""
    if not raw:
        raise CorruptSessionError(user_key, "the record is empty")
    if raw[0] not in (SESSION_FORMAT_VERSION, _FORMAT_2):  # last_seen is where it was
        raise UnknownSessionFormatError(user_key, raw[0], SESSION_FORMAT_VERSION)
    try:
        return int(_LAST_SEEN.unpack_from(raw, _LAST_SEEN_AT)[0])
    except struct.error as err:
        raise CorruptSessionError(user_key, f"truncated header ({err})") from None


def applied_offset_of(user_key: str | bytes, raw: bytes, partition: int) -> int | None:
    """The offset of the last event a stored record applied from ``partition`` (for sweeps)."""
    if not raw or raw[0] != SESSION_FORMAT_VERSION:
        return None  # older formats hold no tail for replays
    try:
        header = _HEADER.unpack_from(raw, 0)
        offsets, _ = _unpack_offsets(raw, _HEADER.size, header[9])
    except struct.error as err:
        raise CorruptSessionError(user_key, f"truncated offsets ({err})") from None
    return offsets.get(partition)


def _pack_offsets(offsets: dict[int, int]) -> bytes:
    if len(offsets) == 1:  # nearly always: a user's events come from one partition
        ((partition, offset),) = offsets.items()
        return _OFFSET.pack(partition, offset)
    return b"".join([_OFFSET.pack(p, o) for p, o in offsets.items()])
