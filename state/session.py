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

Record layout, format version 1 (little-endian).  The interactions are stored as
columns, so that adding one copies byte ranges instead of decoding the others:

========  ===============================================================
header    B version, q first_seen_ms, q last_seen_ms, 5 Q counts (in
          ``EVENT_TYPES`` order), i last_partition, H partitions, H items
offsets   per partition, ascending: i partition, q offset of the last
          applied event
times     per interaction: q event time (ms)
types     per interaction: B index in ``EVENT_TYPES``
values    per interaction: d value, NaN where the event had none
id sizes  per interaction: H bytes of the item id's JSON string
item ids  the item ids as JSON strings, comma separated (any text is safe)
========  ===============================================================
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final, NamedTuple

import orjson

from state.errors import CorruptSessionError, UnknownSessionFormatError
from streamrec.contracts import Event

SESSION_FORMAT_VERSION: Final = 1
# The order is part of the record format: append new types, never reorder.
EVENT_TYPES: Final = ("view", "click", "add_to_cart", "purchase", "rating")
TYPE_CODES: Final = {name: code for code, name in enumerate(EVENT_TYPES)}
NO_VALUE: Final = math.nan

_HEADER: Final = struct.Struct("<BqqQQQQQiHH")
_OFFSET: Final = struct.Struct("<iq")
_LAST_SEEN: Final = struct.Struct("<q")
_LAST_SEEN_AT: Final = 1 + 8  # after the version byte and first_seen_ms
_TIME: Final = struct.Struct("<q")
_VALUE: Final = struct.Struct("<d")
_ID_SIZE: Final = struct.Struct("<H")
_TYPE_BYTES: Final = [bytes([code]) for code in range(len(EVENT_TYPES))]
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
    (``with_event``), which copies the kept byte ranges of each column and appends
    to them, never decoding the other interactions.  Two sessions are equal when
    their records are: the encoding is canonical (offsets sorted by partition).
    Treat every attribute as read-only.
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
        "_columns_at",
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
        self._columns_at = _HEADER.size + _OFFSET.size * header[9]
        self._item_ids: list[str] | None = None

    @classmethod
    def empty(cls, user_id: str, offsets: dict[int, int] | None = None) -> Session:
        """A session with no interactions; ``offsets`` carries the stamps of an expired one."""
        offsets = {} if offsets is None else dict(sorted(offsets.items()))
        header = (SESSION_FORMAT_VERSION, 0, 0, 0, 0, 0, 0, 0, -1, len(offsets), 0)
        record = _HEADER.pack(*header) + _pack_offsets(offsets)
        return cls(user_id, record, header, offsets)

    def with_event(self, event: Event, partition: int, offset: int, max_items: int) -> Session:
        """The session after ``event`` (read at ``offset`` of ``partition``), ``max_items`` long."""
        try:
            code = TYPE_CODES[event.type]
        except KeyError:
            raise ValueError(
                f"event {event.event_id!r} has type {event.type!r}, not one of {EVENT_TYPES}"
            ) from None
        if max_items < 1:
            raise ValueError(f"a session keeps at least 1 interaction, not {max_items}")
        ts = event.ts
        n = self._n
        if n:
            first_seen = min(self.first_seen_ms, ts)
            last_seen = max(self.last_seen_ms, ts)
        else:
            first_seen = last_seen = ts
        keep = min(n, max_items - 1)
        drop = n - keep
        if partition in self.offsets:
            offsets = self.offsets.copy()
            offsets[partition] = offset
        else:
            offsets = dict(sorted({**self.offsets, partition: offset}.items()))
        counts = list(self.counts)
        counts[code] += 1
        header = (
            SESSION_FORMAT_VERSION,
            first_seen,
            last_seen,
            *counts,
            partition,
            len(offsets),
            keep + 1,
        )
        value = event.value
        item = orjson.dumps(event.item_id)
        record = memoryview(self.record)
        times_at, types_at, values_at, sizes_at, ids_at = _column_starts(self._columns_at, n)
        if keep:
            ids_kept = record[ids_at + self._id_bytes_of_oldest(drop, sizes_at, ids_at) :]
        else:
            ids_kept = record[:0]
        new_record = b"".join(
            (
                _HEADER.pack(*header),
                _pack_offsets(offsets),
                record[times_at + _TIME.size * drop : types_at],
                _TIME.pack(ts),
                record[types_at + drop : values_at],
                _TYPE_BYTES[code],
                record[values_at + _VALUE.size * drop : sizes_at],
                # NaN is the column's "no value"; a NaN value (never valid on the wire) is none.
                _VALUE.pack(NO_VALUE if value is None or value != value else value),
                record[sizes_at + _ID_SIZE.size * drop : ids_at],
                _ID_SIZE.pack(len(item)),
                ids_kept,
                b"," if keep else b"",
                item,
            )
        )
        return Session(self.user_id, new_record, header, offsets)

    def _id_bytes_of_oldest(self, k: int, sizes_at: int, ids_at: int) -> int:
        """Bytes of the ``k`` oldest item ids, each with its trailing comma."""
        if not k:
            return 0
        cut = sum(struct.unpack_from(f"<{k}H", self.record, sizes_at)) + k
        if len(self.record) < ids_at + cut or self.record[ids_at + cut - 1] != _COMMA:
            raise CorruptSessionError(self.user_id, "the item id sizes do not match the item ids")
        return cut

    def __len__(self) -> int:
        return self._n

    @property
    def item_ids(self) -> list[str]:
        """The remembered item ids, oldest first: the scorer's input.  Do not modify."""
        if self._item_ids is None:
            ids_at = _column_starts(self._columns_at, self._n)[4]
            try:
                item_ids = orjson.loads(b"[" + self.record[ids_at:] + b"]")
            except orjson.JSONDecodeError as err:
                raise CorruptSessionError(self.user_id, f"item ids: {err}") from None
            if len(item_ids) != self._n:
                raise CorruptSessionError(
                    self.user_id, f"{len(item_ids)} item ids for {self._n} interactions"
                )
            self._item_ids = item_ids
        return self._item_ids

    @property
    def times_ms(self) -> list[int]:
        """The event times of the remembered interactions, oldest first."""
        return list(struct.unpack_from(f"<{self._n}q", self.record, self._columns_at))

    @property
    def event_types(self) -> list[str]:
        """The event types of the remembered interactions, oldest first."""
        types_at = _column_starts(self._columns_at, self._n)[1]
        return [EVENT_TYPES[code] for code in self.record[types_at : types_at + self._n]]

    @property
    def values(self) -> list[float | None]:
        """The values of the remembered interactions (None where there was none), oldest first."""
        values_at = _column_starts(self._columns_at, self._n)[2]
        floats = struct.unpack_from(f"<{self._n}d", self.record, values_at)
        return [None if math.isnan(v) else v for v in floats]

    def interactions(self) -> list[Interaction]:
        """The remembered interactions, oldest first (arrival order)."""
        columns = (self.item_ids, self.times_ms, self.event_types, self.values)
        return [Interaction(*fields) for fields in zip(*columns, strict=True)]

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
            f"Session(user_id={self.user_id!r}, items={self._n}, counts={self.counts}, "
            f"seen={self.first_seen_ms}..{self.last_seen_ms}, offsets={self.offsets})"
        )


def encode_session(session: Session) -> bytes:
    """The record bytes of ``session`` (format ``SESSION_FORMAT_VERSION``)."""
    return session.record


def decode_session(user_id: str, raw: bytes) -> Session:
    """The session stored as ``raw``; a record that does not decode raises a named error."""
    if not raw:
        raise CorruptSessionError(user_id, "the record is empty")
    if raw[0] != SESSION_FORMAT_VERSION:
        raise UnknownSessionFormatError(user_id, raw[0], SESSION_FORMAT_VERSION)
    try:
        header = _HEADER.unpack_from(raw)
        partitions, n = header[9], header[10]
        at = _HEADER.size
        offsets = {}
        for _ in range(partitions):
            partition, offset = _OFFSET.unpack_from(raw, at)
            offsets[partition] = offset
            at += _OFFSET.size
    except struct.error as err:
        raise CorruptSessionError(user_id, f"truncated record ({err})") from None
    # The fixed-width columns must fit, and each item id takes at least its two quotes and
    # a comma between two; the item ids themselves are checked when read or cut.
    _, types_at, _, _, ids_at = _column_starts(at, n)
    if len(raw) < ids_at + max(3 * n - 1, 0):
        raise CorruptSessionError(user_id, f"the record is too short for {n} interactions")
    if raw[types_at : types_at + n].translate(None, _KNOWN_TYPE_CODES):
        raise CorruptSessionError(user_id, "unknown event type code")
    if n and header[8] not in offsets:
        raise CorruptSessionError(user_id, f"no offset for the last partition, {header[8]}")
    return Session(user_id, raw, header, offsets)


def last_seen_of(user_key: str | bytes, raw: bytes) -> int:
    """The last event time of a stored record, read from its header alone (for sweeps)."""
    if not raw:
        raise CorruptSessionError(user_key, "the record is empty")
    if raw[0] != SESSION_FORMAT_VERSION:
        raise UnknownSessionFormatError(user_key, raw[0], SESSION_FORMAT_VERSION)
    try:
        return int(_LAST_SEEN.unpack_from(raw, _LAST_SEEN_AT)[0])
    except struct.error as err:
        raise CorruptSessionError(user_key, f"truncated header ({err})") from None


def _column_starts(columns_at: int, n: int) -> tuple[int, int, int, int, int]:
    """Where the times, types, values, id sizes and item ids of ``n`` interactions start."""
    types_at = columns_at + _TIME.size * n
    values_at = types_at + n
    sizes_at = values_at + _VALUE.size * n
    return columns_at, types_at, values_at, sizes_at, sizes_at + _ID_SIZE.size * n


def _pack_offsets(offsets: dict[int, int]) -> bytes:
    return b"".join([_OFFSET.pack(p, o) for p, o in offsets.items()])
