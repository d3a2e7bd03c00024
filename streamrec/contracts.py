"""The data contracts on the wire: events in, recommendations out, dead letters aside.

Everything that crosses a topic is validated here, at the edge, and nowhere
else.  A payload that does not match raises one specific ``ContractError``
subclass whose ``code`` is stable (it is what dead letters and metrics carry)
and whose message says what was wrong and what was expected.

>>> raw = b'{"event_id":"e1","user_id":"u1","item_id":"i9","type":"view","ts":1700000000000}'
>>> e = parse_event(raw, key=b"u1")
>>> (e.user_id, e.item_id, e.type, e.value)
('u1', 'i9', 'view', None)
>>> parse_event(b'{"event_id":"e1","ts":1700000000000}', b"u1")
Traceback (most recent call last):
...
streamrec.contracts.MissingField: missing field 'user_id' (required: event_id, ...)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

CONTRACT_VERSION: Final = 1
EVENT_TYPES: Final = frozenset({"view", "click", "add_to_cart", "purchase", "rating"})
REQUIRED_FIELDS: Final = ("event_id", "user_id", "item_id", "type", "ts")
# An erasure request travels on the events topic, keyed by the user like the
# user's events, so it is applied in order with them (nothing after it survives).
FORGET_TYPE: Final = "forget"
MAX_ID_CHARS: Final = 256
# Event times outside [1990-01-01, 2100-01-01) are taken for a unit mistake
# (seconds or microseconds instead of milliseconds) rather than guessed at.
MIN_TS_MS: Final = 631_152_000_000
MAX_TS_MS: Final = 4_102_444_800_000
DEFAULT_MAX_EVENT_BYTES: Final = 4096


class ContractError(ValueError):
    """A payload that does not match its contract; ``code`` names the rule it broke."""

    code = "contract"


class PayloadTooLarge(ContractError):
    code = "too_large"


class MalformedJson(ContractError):
    code = "malformed_json"


class NotAnObject(ContractError):
    code = "not_an_object"


class MissingField(ContractError):
    code = "missing_field"


class WrongType(ContractError):
    code = "wrong_type"


class UnknownEventType(ContractError):
    code = "unknown_event_type"


class BadTimestamp(ContractError):
    code = "bad_timestamp"


class KeyMismatch(ContractError):
    code = "key_mismatch"


class UnsupportedVersion(ContractError):
    code = "unsupported_version"


@dataclass(frozen=True, slots=True)
class Event:
    """One user interaction, as produced to the events topic (key = ``user_id``)."""

    event_id: str
    user_id: str
    item_id: str
    type: str
    ts: int
    value: float | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "type": self.type,
            "ts": self.ts,
        }
        if self.value is not None:
            doc["value"] = self.value
        return orjson.dumps(doc)

    @property
    def key(self) -> bytes:
        return self.user_id.encode()


@dataclass(frozen=True, slots=True)
class ForgetRequest:
    """Erase every trace of a user (privacy); a later event starts a fresh session."""

    event_id: str
    user_id: str
    ts: int

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"event_id": self.event_id, "user_id": self.user_id, "type": FORGET_TYPE, "ts": self.ts}
        )

    @property
    def key(self) -> bytes:
        return self.user_id.encode()


def parse_message(
    raw: bytes | None,
    key: bytes | None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    latest_ts_ms: int = MAX_TS_MS,
) -> Event | ForgetRequest:
    """Validate one record of the events topic: an interaction, or a request to forget a user.

    ``latest_ts_ms`` is the latest event time accepted: the flow passes its wall
    clock plus the allowed skew, so an event from a client whose clock runs far
    ahead is a dead letter rather than a session from the future.

    >>> parse_message(b'{"event_id":"f1","user_id":"u1","type":"forget","ts":1700000000000}', b"u1")
    ForgetRequest(event_id='f1', user_id='u1', ts=1700000000000)
    """
    return _parse(raw, key, max_bytes, allow_forget=True, latest_ts_ms=latest_ts_ms)


def parse_event(
    raw: bytes | None, key: bytes | None, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> Event:
    """Validate one Kafka record of the events topic; unknown fields are ignored."""
    parsed = _parse(raw, key, max_bytes, allow_forget=False)
    assert isinstance(parsed, Event)
    return parsed


def _parse(
    raw: bytes | None,
    key: bytes | None,
    max_bytes: int,
    allow_forget: bool,
    latest_ts_ms: int = MAX_TS_MS,
) -> Event | ForgetRequest:
    if raw is None:
        raise MalformedJson("empty record: the value is null (a tombstone is not an event)")
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"payload of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise MalformedJson(f"not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise NotAnObject(f"expected a JSON object, got {type(doc).__name__}")
    version = doc.get("v", CONTRACT_VERSION)
    # The integer 1 only: JSON's true and 1.0 compare equal to it in Python.
    if type(version) is not int or version != CONTRACT_VERSION:
        raise UnsupportedVersion(
            f"event contract version {version!r} is not supported (this build reads "
            f"{CONTRACT_VERSION})"
        )
    if allow_forget and doc.get("type") == FORGET_TYPE:
        return _forget_request(doc, key, latest_ts_ms)
    for name in REQUIRED_FIELDS:
        if name not in doc:
            raise MissingField(f"missing field {name!r} (required: {', '.join(REQUIRED_FIELDS)})")
    event_id = _identifier(doc, "event_id")
    user_id = _identifier(doc, "user_id")
    item_id = _identifier(doc, "item_id")
    event_type = doc["type"]
    if not isinstance(event_type, str):
        raise WrongType(f"field 'type' must be a string, got {type(event_type).__name__}")
    if event_type not in EVENT_TYPES:
        raise UnknownEventType(
            f"unknown event type {event_type!r} (known: {', '.join(sorted(EVENT_TYPES))})"
        )
    ts = _timestamp(doc["ts"], latest_ts_ms)
    value = doc.get("value")
    if value is not None:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise WrongType(f"field 'value' must be a finite number, got {value!r}")
        value = float(value)
    _check_key(key, user_id)
    return Event(event_id, user_id, item_id, event_type, ts, value)


def _forget_request(doc: dict[str, Any], key: bytes | None, latest_ts_ms: int) -> ForgetRequest:
    for name in ("event_id", "user_id", "ts"):
        if name not in doc:
            raise MissingField(
                f"missing field {name!r} (a forget request needs event_id, user_id, ts)"
            )
    user_id = _identifier(doc, "user_id")
    request = ForgetRequest(
        _identifier(doc, "event_id"), user_id, _timestamp(doc["ts"], latest_ts_ms)
    )
    _check_key(key, user_id)
    return request


def _timestamp(ts: Any, latest_ts_ms: int) -> int:
    if type(ts) is not int:
        raise WrongType(f"field 'ts' must be an integer of epoch milliseconds, got {ts!r}")
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise BadTimestamp(
            f"ts {ts} is outside [{MIN_TS_MS}, {MAX_TS_MS}): epoch milliseconds between "
            "1990 and 2100 expected (seconds or microseconds by mistake?)"
        )
    if ts > latest_ts_ms:
        raise BadTimestamp(
            f"ts {ts} is later than {latest_ts_ms}, the latest accepted (this machine's clock "
            "plus the allowed skew): the client's clock is wrong"
        )
    return ts


def _check_key(key: bytes | None, user_id: str) -> None:
    # Partition affinity depends on it: the flow keeps a user's session with the
    # partition the user's events arrive on, so a record keyed otherwise is refused.
    if key is None:
        raise KeyMismatch("record has no key: events must be keyed by user_id")
    if key != user_id.encode():
        raise KeyMismatch(
            f"record key {key[:64]!r} does not match user_id {user_id!r}: "
            "events must be keyed by user_id"
        )


def _identifier(doc: dict[str, Any], name: str) -> str:
    value = doc[name]
    if not isinstance(value, str):
        raise WrongType(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_CHARS:
        raise WrongType(f"field {name!r} must have 1 to {MAX_ID_CHARS} characters")
    return value


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The flow's answer to one valid event (topic ``recommendations``, key = ``user_id``).

    Output is at-least-once: after a crash a consumer may see an ``event_id``
    twice and should deduplicate by it.  ``received_ms`` and ``emitted_ms`` are
    the flow's wall-clock stamps, splitting latency into queueing and processing.
    """

    event_id: str
    user_id: str
    items: list[ScoredItem]
    model: str
    event_ts: int
    received_ms: float
    emitted_ms: float

    def to_json(self) -> bytes:
        return encode_recommendation(
            self.event_id,
            self.user_id,
            [(i.item_id, i.score) for i in self.items],
            self.model,
            self.event_ts,
            self.received_ms,
            self.emitted_ms,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Recommendation:
        try:
            doc = orjson.loads(raw)
            if doc.get("v") != CONTRACT_VERSION:
                raise UnsupportedVersion(f"recommendation version {doc.get('v')!r} not supported")
            return cls(
                event_id=doc["event_id"],
                user_id=doc["user_id"],
                items=[ScoredItem(i["item_id"], float(i["score"])) for i in doc["items"]],
                model=doc["model"],
                event_ts=int(doc["event_ts"]),
                received_ms=float(doc["received_ms"]),
                emitted_ms=float(doc["emitted_ms"]),
            )
        except orjson.JSONDecodeError as err:
            raise MalformedJson(f"recommendation is not valid JSON: {err}") from None
        except (KeyError, TypeError, AttributeError) as err:
            raise MissingField(f"recommendation lacks or mistypes a field: {err!r}") from None


def encode_recommendation(
    event_id: str,
    user_id: str,
    items: list[tuple[str, float]],
    model: str,
    event_ts: int,
    received_ms: float,
    emitted_ms: float,
) -> bytes:
    """The wire form of a ``Recommendation``, straight from ranked (item, score) pairs.

    The flow calls this on every event, so it skips building the typed object.
    """
    return orjson.dumps(
        {
            "v": CONTRACT_VERSION,
            "event_id": event_id,
            "user_id": user_id,
            "items": [{"item_id": item, "score": score} for item, score in items],
            "model": model,
            "event_ts": event_ts,
            "received_ms": received_ms,
            "emitted_ms": emitted_ms,
        }
    )


# Dead letters keep the original key and value byte for byte; what went wrong
# travels in headers, as Kafka Connect's DLQ does, so any payload (even one too
# large or not UTF-8) can be inspected and replayed unchanged.
DLQ_HEADER_CODE: Final = "streamrec.error.code"
DLQ_HEADER_MESSAGE: Final = "streamrec.error.message"
DLQ_HEADER_TOPIC: Final = "streamrec.source.topic"
DLQ_HEADER_PARTITION: Final = "streamrec.source.partition"
DLQ_HEADER_OFFSET: Final = "streamrec.source.offset"
# A dead letter too large for the dead-letter topic is written as a stub: no value, its
# own headers and these (the key too goes when longer than STUB_MAX_KEY_BYTES).
STUB_HEADER_REASON: Final = "streamrec.stub.reason"
STUB_HEADER_VALUE_SIZE: Final = "streamrec.stub.value_size"
STUB_HEADER_VALUE_SHA256: Final = "streamrec.stub.value_sha256"
STUB_HEADER_KEY_SIZE: Final = "streamrec.stub.key_size"
STUB_HEADER_KEY_SHA256: Final = "streamrec.stub.key_sha256"
STUB_MAX_KEY_BYTES: Final = 1024
# The code of a dead letter holding an output record that Kafka refused (a recommendation
# too large for its topic); its source partition and offset are -1.
OUTPUT_REFUSED: Final = "output_refused"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that failed validation, with why and where it came from."""

    key: bytes | None
    raw: bytes | None
    code: str
    message: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [
            (DLQ_HEADER_CODE, self.code.encode()),
            (DLQ_HEADER_MESSAGE, self.message.encode()),
            (DLQ_HEADER_TOPIC, self.topic.encode()),
            (DLQ_HEADER_PARTITION, str(self.partition).encode()),
            (DLQ_HEADER_OFFSET, str(self.offset).encode()),
        ]

    @classmethod
    def from_record(
        cls,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, str | bytes | None]] | None,
    ) -> DeadLetter:
        found = {name: data for name, data in headers or [] if isinstance(data, bytes)}
        try:
            return cls(
                key=key,
                raw=value,
                code=found[DLQ_HEADER_CODE].decode(),
                message=found[DLQ_HEADER_MESSAGE].decode(),
                topic=found[DLQ_HEADER_TOPIC].decode(),
                partition=int(found[DLQ_HEADER_PARTITION]),
                offset=int(found[DLQ_HEADER_OFFSET]),
            )
        except KeyError as err:
            raise MissingField(f"dead letter lacks header {err.args[0]!r}") from None
