"""Replay after a crash is harmless: sessions depend on the events, not on how often they came.

Bytewax restarts the source from its last snapshot, so after a crash a prefix of
the stream is read again while RocksDB already holds its effect.  For any stream
and any pattern of crashes and rewinds, the sessions must equal those of reading
each event once.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.session import EVENT_TYPES, Session
from streamrec.state.store import ApplyResult, SessionStore, StoreCounters

T0 = 1_700_000_000_000
TTL_MS = 10_000
SETTINGS = Settings(session_length=3, session_ttl_s=TTL_MS / 1000)
USERS = ("ann", "bob", "cyd")
# Long before any event: nothing has expired yet at this "now".
BEFORE_ALL = 0

Record = tuple[Event, int, int]


@st.composite
def streams(draw: st.DrawFn) -> list[Record]:
    """Events of a few users over a few partitions; offsets grow within each partition."""
    next_offset = {p: draw(st.integers(0, 1000)) for p in range(3)}
    ts = T0
    records = []
    for n in range(draw(st.integers(1, 25))):
        # Times go back (late events) and jump past the TTL (sessions expire).
        ts += draw(st.integers(-TTL_MS, 2 * TTL_MS))
        value = draw(st.none() | st.floats(0, 5))
        event = Event(
            f"e{n}",
            draw(st.sampled_from(USERS)),
            draw(st.sampled_from(["i1", "i2", "i3", "i4"])),
            draw(st.sampled_from(EVENT_TYPES)),
            ts,
            value,
        )
        partition = draw(st.integers(0, 2))
        records.append((event, partition, next_offset[partition]))
        next_offset[partition] += draw(st.integers(1, 3))
    return records


# Each crash: how far the flow got past the resume point, and how far it rewinds.
crashes = st.lists(st.tuples(st.integers(0, 25), st.integers(0, 25)), max_size=3)


def sessions_of(store: SessionStore) -> dict[str, Session | None]:
    return {user: store.get(user, now_ms=BEFORE_ALL) for user in USERS}


def apply_all(store: SessionStore, records: list[Record]) -> None:
    for event, partition, offset in records:
        store.apply(event, partition, offset)


# Megabytes of sessions cached in memory: none, about one of these short sessions (evicted at
# every other user), all of them.
CACHE_SIZES = (0.0, 0.0025, 1.0)


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
@settings(max_examples=30, deadline=None)
@given(streams(), crashes)
def test_replaying_any_prefix_any_number_of_times_gives_the_sessions_of_one_pass(
    cache_size: float, records: list[Record], crash_points: list[tuple[int, int]]
) -> None:
    cached = SETTINGS.replace(session_cache_mb=cache_size)
    with tempfile.TemporaryDirectory() as once_dir, tempfile.TemporaryDirectory() as replay_dir:
        with SessionStore.open(Path(once_dir), 0, 1, SETTINGS) as once:
            apply_all(once, records)
            expected, expected_clock = sessions_of(once), once.clock_ms

        resume = 0
        for advance, rewind in crash_points:
            stop = min(len(records), resume + advance)
            with SessionStore.open(Path(replay_dir), 0, 1, cached) as store:
                apply_all(store, records[resume:stop])
            resume = max(0, stop - rewind)
        with SessionStore.open(Path(replay_dir), 0, 1, cached) as store:
            apply_all(store, records[resume:])
            assert sessions_of(store) == expected
            assert store.clock_ms == expected_clock


@settings(max_examples=20, deadline=None)
@given(streams())
def test_every_replayed_event_is_counted_as_a_duplicate(records: list[Record]) -> None:
    with (
        tempfile.TemporaryDirectory() as state_dir,
        SessionStore.open(Path(state_dir), 0, 1, SETTINGS) as store,
    ):
        apply_all(store, records)
        apply_all(store, records)
        assert (store.counters.applied, store.counters.duplicates) == (len(records), len(records))


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
@settings(max_examples=20, deadline=None)
@given(streams(), st.lists(st.integers(1, 8), min_size=1, max_size=10))
def test_applying_in_batches_gives_the_sessions_of_applying_one_by_one(
    cache_size: float, records: list[Record], batch_sizes: list[int]
) -> None:
    # Every record twice, so that batches also hold duplicates of their own events.
    stream = [r for record in records for r in (record, record)]
    with (
        tempfile.TemporaryDirectory() as one_dir,
        tempfile.TemporaryDirectory() as batch_dir,
        SessionStore.open(Path(one_dir), 0, 1, SETTINGS) as one_by_one,
        SessionStore.open(
            Path(batch_dir), 0, 1, SETTINGS.replace(session_cache_mb=cache_size)
        ) as batched,
    ):
        singles = [one_by_one.apply(*record) for record in stream]
        batches: list[list[ApplyResult]] = []
        start = 0
        while start < len(stream):
            size = batch_sizes[len(batches) % len(batch_sizes)]
            batches.append(batched.apply_many(stream[start : start + size]))
            start += size
        assert [r for batch in batches for r in batch] == singles
        assert sessions_of(batched) == sessions_of(one_by_one)
        assert _without_cache(batched.counters) == _without_cache(one_by_one.counters)


def _without_cache(counters: StoreCounters) -> StoreCounters:
    return dataclasses.replace(counters, cache_hits=0, cache_misses=0)


def test_a_replay_after_an_expiry_restart_is_answered_from_the_session_it_had(
    tmp_path: Path,
) -> None:
    # Found by the fault schedules: a session restarted by expiry has a window of one, and
    # the replay tail could not use the rest of the room, so a crash that replayed an earlier
    # event answered it from a window missing its oldest items.
    t0 = 1_700_000_000_000
    times = [t0, t0 + 100, t0 + 200, t0 + 300, t0 + 400, t0 + 500, t0 + 600, t0 + 700]
    with SessionStore.open(tmp_path, 0, 1, SETTINGS) as store:
        store.replay_floor = 2  # a crash may read again from offset 2 on
        answers = {}
        for offset, ts in enumerate(times):
            event = Event(f"e{offset}", "u", f"i{offset}", "view", ts)
            answers[offset] = store.apply(event, 0, offset).session.item_ids
        store.apply(Event("late", "u", "i-late", "view", times[-1] + 2 * TTL_MS), 0, len(times))
        session = store.get("u", t0)
        assert session is not None
        for offset in range(2, len(times)):
            assert session.item_ids_as_of(offset, 3, TTL_MS) == answers[offset]
