"""A session record: what it remembers of a user, and its compact versioned encoding."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.contracts import EVENT_TYPES as CONTRACT_EVENT_TYPES
from streamrec.contracts import Event
from streamrec.state.errors import CorruptSessionError, UnknownSessionFormatError
from streamrec.state.session import (
    EVENT_TYPES,
    NO_REPLAY,
    SESSION_FORMAT_VERSION,
    Interaction,
    Session,
    decode_session,
    encode_session,
    last_seen_of,
)

T0 = 1_700_000_000_000


def event(item: str, ts: int = T0, kind: str = "view", value: float | None = None) -> Event:
    return Event(f"e-{item}-{ts}", "u1", item, kind, ts, value)


def session_of(*events: Event, max_items: int = 50, partition: int = 0) -> Session:
    session = Session.empty("u1")
    for offset, e in enumerate(events):
        session = session.with_event(e, partition, offset, max_items)
    return session


def test_every_event_type_of_the_contract_has_a_code() -> None:
    assert set(EVENT_TYPES) == set(CONTRACT_EVENT_TYPES)


def test_a_session_keeps_the_last_interactions_oldest_first() -> None:
    session = session_of(*(event(f"i{n}", T0 + n) for n in range(5)), max_items=3)
    assert session.item_ids == ["i2", "i3", "i4"]
    assert session.times_ms == [T0 + 2, T0 + 3, T0 + 4]


def test_counters_cover_every_event_not_only_the_remembered_ones() -> None:
    session = session_of(
        event("a", kind="view"), event("b", kind="view"), event("c", kind="purchase"), max_items=1
    )
    assert (session.count("view"), session.count("purchase"), len(session)) == (2, 1, 1)


def test_out_of_order_event_times_keep_arrival_order_and_widen_first_and_last_seen() -> None:
    session = session_of(event("a", T0 + 50), event("b", T0), event("c", T0 + 100))
    assert session.item_ids == ["a", "b", "c"]
    assert (session.first_seen_ms, session.last_seen_ms) == (T0, T0 + 100)


def test_an_interaction_remembers_type_and_value_and_none_for_no_value() -> None:
    session = session_of(event("a", kind="rating", value=4.5), event("b", kind="click"))
    assert session.interactions() == [
        Interaction("a", T0, "rating", 4.5),
        Interaction("b", T0, "click", None),
    ]


def test_the_last_applied_offset_is_kept_per_partition() -> None:
    session = Session.empty("u1").with_event(event("a"), 3, 10, 50).with_event(event("b"), 0, 7, 50)
    assert list(session.offsets.items()) == [(0, 7), (3, 10)]  # canonical: by partition
    assert (session.last_partition, session.last_offset) == (0, 7)


def test_an_event_of_unknown_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'like'"):
        session_of(event("a", kind="like"))


def test_a_session_round_trips_through_its_record() -> None:
    session = session_of(event("a", kind="rating", value=3.0), event('ü/"x",', T0 + 1))
    assert decode_session("u1", encode_session(session)) == session


def test_the_record_starts_with_its_format_version() -> None:
    assert encode_session(session_of(event("a")))[0] == SESSION_FORMAT_VERSION


def test_last_seen_is_readable_from_the_header_alone() -> None:
    raw = encode_session(session_of(event("a", T0 + 5), event("b", T0 + 9)))
    assert last_seen_of("u1", raw) == T0 + 9


def test_a_record_of_an_unknown_format_version_is_refused_with_both_versions() -> None:
    raw = bytes([SESSION_FORMAT_VERSION + 1]) + encode_session(session_of(event("a")))[1:]
    newer, this = SESSION_FORMAT_VERSION + 1, SESSION_FORMAT_VERSION
    expected = f"format version {newer}; this build reads version {this}"
    with pytest.raises(UnknownSessionFormatError, match=expected):
        decode_session("u1", raw)


def test_a_record_of_the_previous_columnar_format_is_refused_not_misread() -> None:
    raw = bytes([1]) + encode_session(session_of(event("a")))[1:]
    with pytest.raises(UnknownSessionFormatError, match="format version 1"):
        decode_session("u1", raw)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: raw[:20], id="truncated header"),
        pytest.param(lambda raw: raw[:-15], id="truncated columns"),
        pytest.param(lambda raw: raw[:-1], id="truncated item ids"),
        pytest.param(lambda raw: raw + b"]]", id="trailing bytes"),
    ],
)
def test_a_damaged_record_raises_a_corrupt_session_error_naming_the_user(damage: object) -> None:
    raw = encode_session(session_of(event("item-a"), event("item-b"), event("item-c")))
    with pytest.raises(CorruptSessionError, match="'u1'") as caught:
        session = decode_session("u1", damage(raw))  # type: ignore[operator]
        _ = session.item_ids
    assert caught.value.user_key == "u1"


def test_item_id_sizes_that_do_not_match_the_ids_are_caught_when_cutting() -> None:
    session = session_of(event("aaaa"), event("b"), max_items=2)
    raw = bytearray(encode_session(session))
    # The oldest row's id size: after the header (67 bytes), one partition's offset (12)
    # and the row's time, offset, type and value (25).
    struct.pack_into("<H", raw, 67 + 12 + 25, 3)
    damaged = decode_session("u1", bytes(raw))
    with pytest.raises(CorruptSessionError, match="sizes"):
        damaged.with_event(event("c"), 0, 99, 2)


item_ids = st.text(min_size=1, max_size=20)
events = st.builds(
    Event,
    event_id=st.just("e"),
    user_id=st.just("u1"),
    item_id=item_ids,
    type=st.sampled_from(EVENT_TYPES),
    ts=st.integers(min_value=0, max_value=2**62),
    value=st.none() | st.floats(allow_nan=False),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(events, st.integers(0, 3), st.integers(0, 2**62)), max_size=30),
    st.integers(1, 8),
)
def test_any_session_decodes_to_an_equal_session(
    steps: list[tuple[Event, int, int]], max_items: int
) -> None:
    session = Session.empty("u1")
    for e, partition, offset in steps:
        session = session.with_event(e, partition, offset, max_items)
    decoded = decode_session("u1", encode_session(session))
    assert decoded == session
    assert decoded.to_dict() == session.to_dict()
    assert decoded.item_ids == [e.item_id for e, _, _ in steps][-max_items:]


def replayable_session(floor: int, count: int, max_items: int = 3, max_tail: int = 6) -> Session:
    session = Session.empty("u1")
    for offset in range(count):
        session = session.with_event(
            event(f"i{offset}", T0 + offset), 0, offset, max_items, floor, max_tail
        )
    return session


def test_a_replayed_event_sees_its_window_as_it_was_not_the_newest() -> None:
    # Offsets 4..9 may be read again after a crash: their windows reach back to offset 2.
    session = replayable_session(floor=4, count=10)
    assert session.item_ids == ["i7", "i8", "i9"]
    assert session.item_ids_as_of(4, 3) == ["i2", "i3", "i4"]
    assert session.item_ids_as_of(8, 3) == ["i6", "i7", "i8"]
    assert session.item_ids_as_of(9, 3) == session.item_ids
    assert session.tail_length == 5  # i2..i6, beyond the window of three


def test_the_replay_tail_drops_what_no_replay_can_need_and_is_bounded() -> None:
    # Offset 9's window (i7, i8, i9) is the window itself: nothing else is kept.
    assert replayable_session(floor=9, count=10).tail_length == 0
    assert replayable_session(floor=8, count=10).tail_length == 1  # i6, for offset 8
    assert replayable_session(floor=0, count=30, max_tail=6).tail_length == 6
    assert replayable_session(floor=0, count=30, max_tail=0).tail_length == 0


def test_the_tail_is_not_part_of_the_window_the_counters_or_the_interactions() -> None:
    session = replayable_session(floor=0, count=5, max_items=2)
    assert len(session) == 2 and session.tail_length == 3
    assert [i.item_id for i in session.interactions()] == ["i3", "i4"]
    assert session.source_offsets == [3, 4]
    assert decode_session("u1", encode_session(session)) == session


def test_a_replayed_event_from_before_its_session_restarted_sees_the_session_it_had() -> None:
    ttl_ms = 1_000
    # Offsets 0..3, one session; offset 4 comes after an idle gap and restarts it.
    session = replayable_session(floor=2, count=4)
    later = event("new", T0 + 3 + ttl_ms + 1)
    restarted = session.restarted().with_event(later, 0, 4, 3, 2, 6)
    assert restarted.item_ids == ["new"] and len(restarted) == 1
    assert restarted.first_seen_ms == restarted.last_seen_ms == later.ts
    assert restarted.item_ids_as_of(4, 3, ttl_ms) == ["new"]
    assert restarted.item_ids_as_of(3, 3, ttl_ms) == ["i1", "i2", "i3"]
    assert restarted.item_ids_as_of(2, 3, ttl_ms) == ["i0", "i1", "i2"]
    # Without the TTL the restart cannot be told apart from one long session.
    assert restarted.item_ids_as_of(4, 3) == ["i2", "i3", "new"]


def test_a_restart_with_no_replay_to_serve_keeps_nothing_of_the_old_session() -> None:
    session = replayable_session(floor=NO_REPLAY, count=4)
    later = event("new", T0 + 10_000)
    restarted = session.restarted().with_event(later, 0, 4, 3, NO_REPLAY, 6)
    fresh = Session.empty("u1", session.offsets).with_event(later, 0, 4, 3, NO_REPLAY, 6)
    assert restarted == fresh and restarted.tail_length == 0


def format_2_record(items: list[str], offset: int) -> bytes:
    header = struct.Struct("<BqqQQQQQiHH")
    ids = b",".join(b'"' + i.encode() + b'"' for i in items)
    rows = b"".join(
        struct.pack("<qBdH", T0 + n, 0, float("nan"), len(i) + 2) for n, i in enumerate(items)
    )
    counts = (len(items), 0, 0, 0, 0)
    head = header.pack(2, T0, T0 + len(items) - 1, *counts, 0, 1, len(items))
    return head + struct.pack("<iq", 0, offset) + rows + ids


def test_a_format_2_record_is_read_and_becomes_format_3_on_its_next_event() -> None:
    old = decode_session("u1", format_2_record(["a", "b"], offset=41))
    assert (old.item_ids, old.offsets, old.times_ms) == (["a", "b"], {0: 41}, [T0, T0 + 1])
    assert old.source_offsets == [-1, -1]  # applied before rows carried their offset
    assert old.item_ids_as_of(5, 50) == ["a", "b"]
    newer = old.with_event(event("c", T0 + 2), 0, 42, 50)
    assert encode_session(newer)[0] == SESSION_FORMAT_VERSION
    assert decode_session("u1", encode_session(newer)).item_ids == ["a", "b", "c"]
    assert last_seen_of("u1", format_2_record(["a"], 1)) == T0
