"""Consumed-items records in the changelog, in chunks: a new item re-sends one chunk, and a shard
rebuilt from the chunks (or from whole records of the first format) holds the same records."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rocksdict import Rdict

from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.consumed import FORMAT_1, encode_consumed, item_hashes
from streamrec.state.consumed_chunks import (
    CHUNK_ITEMS,
    CHUNKS,
    MAX_CAP,
    assembled,
    chunk_key,
    consumed_update,
    is_chunk_key,
    parse_chunk_key,
    put_aside,
)
from streamrec.state.keys import CHANGELOG_CONSUMED_TAG, CONSUMED_PREFIX, SESSION_PREFIX
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import db_options, open_read_only
from streamrec.state.session import encode_session
from streamrec.state.store import SessionStore

T0 = 1_700_000_000_000
TTL_MS = 60_000
SETTINGS = Settings(session_length=3, session_ttl_s=TTL_MS / 1000, consumed_cap=5000)

Changes = list[tuple[bytes, bytes | None]]


class Recorder:
    """A changelog that keeps each commit's records."""

    def __init__(self) -> None:
        self.commits: list[Changes] = []

    def send(
        self, partition: int, changes: Iterable[tuple[bytes, bytes | None]], applied: int | None
    ) -> None:
        self.commits.append(list(changes))

    @property
    def records(self) -> Changes:
        return [record for commit in self.commits for record in commit]


def rating(user: str, item: str, ts: int = T0) -> Event:
    return Event(f"{user}-{item}-{ts}", user, item, "rating", ts, 4.0)


def consumed_records(changes: Changes) -> Changes:
    return [(k, v) for k, v in changes if k.startswith(CHANGELOG_CONSUMED_TAG)]


def user_records(state_dir: Path) -> dict[bytes, bytes]:
    """The session and consumed-items records of shard 0, as stored."""
    db = open_read_only(shard_dir(state_dir, 0))
    try:
        return {
            bytes(k): bytes(v)  # type: ignore[arg-type]
            for k, v in db.items()
            if bytes(k).startswith((SESSION_PREFIX, CONSUMED_PREFIX))  # type: ignore[arg-type]
        }
    finally:
        db.close()


def rebuilt(records: Changes, state_dir: Path, settings: Settings = SETTINGS) -> dict[bytes, bytes]:
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        store.restore(records, applied=None)
    return user_records(state_dir)


def test_a_new_item_of_a_heavy_rater_sends_one_chunk_not_the_whole_record(tmp_path: Path) -> None:
    changelog = Recorder()
    with SessionStore.open(tmp_path, 0, 1, SETTINGS) as store:
        store.changes = changelog
        store.apply_many((rating("u1", f"i{n}", T0 + n), 0, n) for n in range(1000))
        store.apply(rating("u1", "one-more", T0 + 1000), 0, 1000)
        assert len(store.consumed("u1")) == 1001  # 8 kB of hashes
    (sent,) = consumed_records(changelog.commits[-1])
    key, value = sent
    assert parse_chunk_key(key) == (b"u1", 1000 // CHUNK_ITEMS)
    assert value is not None and len(value) == 8 + 8 * (1000 % CHUNK_ITEMS + 1)


def test_past_the_cap_the_chunks_the_oldest_items_left_are_removed(tmp_path: Path) -> None:
    changelog = Recorder()
    capped = SETTINGS.replace(consumed_cap=2 * CHUNK_ITEMS)
    with SessionStore.open(tmp_path / "a", 0, 1, capped) as store:
        store.changes = changelog
        for n in range(3 * CHUNK_ITEMS + 1):
            store.apply(rating("u1", f"i{n}", T0 + n), 0, n)
        expected = store.consumed("u1").copy()
    tombstones = {parse_chunk_key(k)[1] for k, v in changelog.records if is_chunk_key(k) and not v}
    assert tombstones == {0}  # chunk 1's last item is still kept
    with SessionStore.open(tmp_path / "b", 0, 1, capped) as copy:
        copy.restore(changelog.records, applied=None)
        assert np.array_equal(copy.consumed("u1"), expected)


def test_erasing_a_user_removes_every_chunk_of_their_consumed_items(tmp_path: Path) -> None:
    changelog = Recorder()
    with SessionStore.open(tmp_path / "a", 0, 1, SETTINGS) as store:
        store.changes = changelog
        store.apply_many((rating("u1", f"i{n}", T0 + n), 0, n) for n in range(3 * CHUNK_ITEMS))
        store.forget("u1", purge=False)
    removed = consumed_records(changelog.commits[-1])
    assert {parse_chunk_key(k)[1] for k, _ in removed if is_chunk_key(k)} == {0, 1, 2}
    assert all(value is None for _, value in removed)
    assert rebuilt(changelog.records, tmp_path / "b") == {}


def test_a_shard_restores_from_a_changelog_written_before_chunks_and_moves_on_to_them(
    tmp_path: Path,
) -> None:
    # What the previous release wrote: session records, and whole consumed-items records of
    # the first format (a version byte and the hashes) keyed by the tag and the user id.
    with SessionStore.open(tmp_path / "old", 0, 1, SETTINGS) as old:
        old.apply_many((rating("u1", f"i{n}", T0 + n), 0, n) for n in range(100))
        session = old.get("u1")
    assert session is not None
    whole = bytes([FORMAT_1]) + item_hashes([f"i{n}" for n in range(100)]).tobytes()
    old_changelog: Changes = [
        (b"u1", encode_session(session)),
        (CHANGELOG_CONSUMED_TAG + b"u1", whole),
    ]

    changelog = Recorder()
    with SessionStore.open(tmp_path / "new", 0, 1, SETTINGS) as store:
        store.restore(old_changelog, applied=99)
        assert np.array_equal(store.consumed("u1"), item_hashes([f"i{n}" for n in range(100)]))
        assert store.get("u1") == session
        store.changes = changelog
        store.apply(rating("u1", "i100", T0 + 100), 0, 100)
    # The first change writes the record in chunks, and removes the whole one.
    sent = consumed_records(changelog.records)
    assert (CHANGELOG_CONSUMED_TAG + b"u1", None) in sent
    assert sorted(parse_chunk_key(k)[1] for k, v in sent if is_chunk_key(k) and v) == [0, 1]
    assert rebuilt(old_changelog + changelog.records, tmp_path / "again") == user_records(
        tmp_path / "new"
    )


def test_a_record_whose_chunk_numbers_would_run_out_is_written_afresh_from_chunk_0() -> None:
    first = CHUNKS * CHUNK_ITEMS - 2
    before = encode_consumed(item_hashes(["a", "b"]), first)
    update = consumed_update(b"u1", before, item_hashes(["a", "b", "c"]))
    assert update.record == encode_consumed(item_hashes(["a", "b", "c"]), 0)
    assert sorted((parse_chunk_key(k)[1], v is None) for k, v in update.changes) == [
        (0, False),
        (CHUNKS - 1, True),
    ]


def test_a_cap_beyond_what_the_chunk_numbers_reach_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="consumed_cap must be from 0 to"):
        SessionStore.open(tmp_path, 0, 1, SETTINGS.replace(consumed_cap=MAX_CAP + 1))


def test_a_user_whose_chunks_do_not_fit_together_loses_only_that_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hashes = item_hashes([f"i{n}" for n in range(2 * CHUNK_ITEMS + 1)])
    update = consumed_update(b"u1", None, hashes)
    whole = consumed_update(b"u2", None, hashes[:3])
    missing_middle = [(k, v) for k, v in update.changes if parse_chunk_key(k)[1] != 1]
    db = Rdict(str(tmp_path), db_options())
    try:
        for key, value in missing_middle + whole.changes:
            aside, chunk = put_aside(key, value)
            assert chunk is not None
            db.put(aside, chunk)
        with caplog.at_level(logging.WARNING):
            records = {k: v for k, v in assembled(db) if k.startswith(CONSUMED_PREFIX)}
    finally:
        db.close()
    assert records == {CONSUMED_PREFIX + b"u1": None, CONSUMED_PREFIX + b"u2": whole.record}
    assert "incomplete" in caplog.text


def test_a_chunk_another_writer_overwrote_is_sent_again_as_this_store_holds_it(
    tmp_path: Path,
) -> None:
    changelog = Recorder()
    with SessionStore.open(tmp_path, 0, 1, SETTINGS) as store:
        store.changes = changelog
        store.apply_many((rating("u1", f"i{n}", T0 + n), 0, n) for n in range(CHUNK_ITEMS + 2))
        sent = {k: v for k, v in changelog.records if is_chunk_key(k)}
        changelog.commits.clear()
        store.resend({chunk_key(b"u1", 0), chunk_key(b"u1", 1), chunk_key(b"u1", 7)})
    assert dict(changelog.records) == {
        chunk_key(b"u1", 0): sent[chunk_key(b"u1", 0)],
        chunk_key(b"u1", 1): sent[chunk_key(b"u1", 1)],
        chunk_key(b"u1", 7): None,  # beyond the record: removed
    }


Step = tuple[str, str, int, int]  # user, item, event kind (0 rating, 1 view), time step


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, int, list[Step]]:
    """A cap, a commit size and the events of two users: items drawn from a small catalogue
    (consumed twice at times), views between, and now and then an idle gap past the TTL."""
    cap = draw(st.integers(1, 3 * CHUNK_ITEMS))
    batch = draw(st.integers(1, 20))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["ann", "bob"]),
                st.integers(0, 4 * CHUNK_ITEMS).map(str),
                st.sampled_from([0, 0, 0, 1]),
                st.sampled_from([1, 1, 1, 1, 1, 1, 1, 2 * TTL_MS]),
            ),
            min_size=1,
            max_size=400,
        )
    )
    return cap, batch, steps


@settings(max_examples=40, deadline=None)
@given(histories())
def test_a_shard_rebuilt_from_the_changelog_holds_the_same_records(
    history: tuple[int, int, list[Step]],
) -> None:
    cap, batch, steps = history
    contract = SETTINGS.replace(consumed_cap=cap)
    ts, events = T0, []
    for offset, (user, item, kind, step) in enumerate(steps):
        ts += step
        events.append((Event(f"e{offset}", user, item, ("rating", "view")[kind], ts), 0, offset))
    with tempfile.TemporaryDirectory() as scratch:
        changelog = Recorder()
        with SessionStore.open(Path(scratch) / "a", 0, 1, contract) as store:
            store.changes = changelog
            for at in range(0, len(events), batch):
                store.apply_many(events[at : at + batch])
        assert rebuilt(changelog.records, Path(scratch) / "b", contract) == user_records(
            Path(scratch) / "a"
        )
