"""The event contract: what is accepted, and the one specific error for each kind of bad input."""

from __future__ import annotations

import orjson
import pytest

from streamrec import contracts as c
from streamrec.contracts import (
    BadTimestamp,
    DeadLetter,
    Event,
    ForgetRequest,
    Recommendation,
    ScoredItem,
    UnsupportedVersion,
    parse_event,
    parse_message,
)

GOOD = {
    "event_id": "e-1",
    "user_id": "u-7",
    "item_id": "i-42",
    "type": "click",
    "ts": 1_700_000_000_000,
}


def encode(doc: object) -> bytes:
    return orjson.dumps(doc)


def with_(**changes: object) -> bytes:
    doc = {**GOOD, **changes}
    return encode({k: v for k, v in doc.items() if v is not _DROP})


_DROP = object()


def test_a_valid_event_parses_into_its_typed_form() -> None:
    event = parse_event(with_(value=4.5), b"u-7")
    assert event == Event("e-1", "u-7", "i-42", "click", 1_700_000_000_000, 4.5)


def test_unknown_fields_are_ignored() -> None:
    assert parse_event(with_(referrer="home", extra={"a": 1}), b"u-7").item_id == "i-42"


def test_an_integer_value_is_read_as_a_float() -> None:
    assert parse_event(with_(value=3), b"u-7").value == 3.0


def test_an_event_round_trips_through_its_json() -> None:
    event = Event("e-1", "u-7", "i-42", "rating", 1_700_000_000_000, 4.0)
    assert parse_event(event.to_json(), event.key) == event


@pytest.mark.parametrize(
    ("raw", "key", "error"),
    [
        (b"{not json", b"u-7", c.MalformedJson),
        (b"", b"u-7", c.MalformedJson),
        (None, b"u-7", c.MalformedJson),
        (b"[1, 2]", b"u-7", c.NotAnObject),
        (b'"text"', b"u-7", c.NotAnObject),
        (with_(user_id=_DROP), b"u-7", c.MissingField),
        (with_(ts=_DROP), b"u-7", c.MissingField),
        (with_(item_id=17), b"u-7", c.WrongType),
        (with_(item_id=""), b"u-7", c.WrongType),
        (with_(item_id="x" * 300), b"u-7", c.WrongType),
        (with_(user_id=None), b"u-7", c.WrongType),
        (with_(ts="1700000000000"), b"u-7", c.WrongType),
        (with_(ts=1.7e12), b"u-7", c.WrongType),
        (with_(ts=True), b"u-7", c.WrongType),
        (with_(value="five"), b"u-7", c.WrongType),
        (with_(type="like"), b"u-7", c.UnknownEventType),
        (with_(type=3), b"u-7", c.WrongType),
        (with_(ts=-5), b"u-7", c.BadTimestamp),
        (with_(ts=1_700_000_000), b"u-7", c.BadTimestamp),
        (with_(ts=1_700_000_000_000_000), b"u-7", c.BadTimestamp),
        (with_(v=2), b"u-7", c.UnsupportedVersion),
        (encode(GOOD), None, c.KeyMismatch),
        (encode(GOOD), b"u-8", c.KeyMismatch),
        (with_(padding="x" * 5000), b"u-7", c.PayloadTooLarge),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_each_kind_of_bad_input_raises_its_own_error(
    raw: bytes | None, key: bytes | None, error: type[c.ContractError]
) -> None:
    with pytest.raises(error) as caught:
        parse_event(raw, key)
    assert caught.value.code == error.code
    assert str(caught.value)


def test_error_codes_are_distinct() -> None:
    kinds = [k for k in vars(c).values() if isinstance(k, type) and issubclass(k, c.ContractError)]
    assert len({k.code for k in kinds}) == len(kinds)


def test_the_size_limit_is_configurable() -> None:
    raw = with_(padding="x" * 100)
    with pytest.raises(c.PayloadTooLarge):
        parse_event(raw, b"u-7", max_bytes=64)
    assert parse_event(raw, b"u-7", max_bytes=1024).user_id == "u-7"


def test_a_recommendation_round_trips_through_its_json() -> None:
    rec = Recommendation(
        event_id="e-1",
        user_id="u-7",
        items=[ScoredItem("i-1", 0.9), ScoredItem("i-2", 0.5)],
        model="student-int8@abc123",
        event_ts=1_700_000_000_000,
        received_ms=1_700_000_000_010.5,
        emitted_ms=1_700_000_000_012.25,
    )
    assert Recommendation.from_json(rec.to_json()) == rec


def test_a_recommendation_without_a_field_is_rejected() -> None:
    with pytest.raises(c.MissingField):
        Recommendation.from_json(b'{"v": 1, "event_id": "e"}')


def test_a_dead_letter_keeps_the_original_bytes_and_says_where_they_came_from() -> None:
    letter = DeadLetter(b"u-7", b"\xff\xfe not utf-8", "malformed_json", "bad", "events", 3, 99)
    back = DeadLetter.from_record(letter.key, letter.raw, letter.headers())
    assert back == letter


def test_a_forget_request_is_an_event_type_on_the_events_topic() -> None:
    raw = b'{"event_id": "f1", "user_id": "u-7", "type": "forget", "ts": 1700000000000}'
    assert parse_message(raw, b"u-7") == ForgetRequest("f1", "u-7", 1_700_000_000_000)
    assert parse_message(ForgetRequest("f1", "u-7", 1_700_000_000_000).to_json(), b"u-7")


def test_a_forget_request_is_validated_like_an_event() -> None:
    with pytest.raises(c.KeyMismatch):
        parse_message(
            b'{"event_id": "f1", "user_id": "u-7", "type": "forget", "ts": 1700000000000}', b"u-8"
        )
    with pytest.raises(c.MissingField):
        parse_message(b'{"event_id": "f1", "type": "forget", "ts": 1700000000000}', b"u-7")


def test_parse_event_does_not_accept_forget_requests() -> None:
    with pytest.raises(c.UnknownEventType):
        parse_event(
            b'{"event_id": "f1", "user_id": "u-7", "item_id": "x", "type": "forget", '
            b'"ts": 1700000000000}',
            b"u-7",
        )


@pytest.mark.parametrize("version", ["true", "1.0", '"1"', "2"])
def test_only_the_integer_1_is_a_supported_contract_version(version: str) -> None:
    raw = (
        b'{"v":' + version.encode() + b',"event_id":"e1","user_id":"u1","item_id":"i1",'
        b'"type":"view","ts":1700000000000}'
    )
    with pytest.raises(UnsupportedVersion):
        parse_event(raw, b"u1")


def test_an_event_later_than_the_latest_accepted_time_is_a_bad_timestamp() -> None:
    raw = b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"view","ts":1700000000001}'
    with pytest.raises(BadTimestamp, match="clock"):
        parse_message(raw, b"u1", latest_ts_ms=1_700_000_000_000)
    assert parse_message(raw, b"u1", latest_ts_ms=1_700_000_000_001)
