"""The session store of one shard, on a real RocksDB on disk."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import Rdict

from streamrec.contracts import Event
from streamrec.lru import MB
from streamrec.settings import Settings
from streamrec.state.errors import StateError, StateWriteError, UnknownSessionFormatError
from streamrec.state.keys import QUARANTINE_PREFIX, session_key
from streamrec.state.layout import shard_dir
from streamrec.state.memory import session_bytes
from streamrec.state.rocks import db_options
from streamrec.state.session import SESSION_FORMAT_VERSION, Session
from streamrec.state.store import Erasure, SessionStore
from streamrec.state.view import open_state_view
from tests.conftest import fill

T0 = 1_700_000_000_000
TTL_S = 60.0
SETTINGS = Settings(session_length=3, session_ttl_s=TTL_S)
TTL_MS = int(TTL_S * 1000)


def event(user: str, item: str, ts: int = T0, kind: str = "view") -> Event:
    return Event(f"{user}-{item}-{ts}", user, item, kind, ts)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[SessionStore]:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as opened:
        yield opened


@pytest.fixture
def logged_store(state_dir: Path) -> Iterator[SessionStore]:
    """A store that keeps RocksDB's write-ahead log: what it writes is at once visible to a
    read-only view (without the log, only as of the last memtable flush)."""
    with SessionStore.open(state_dir, 0, 1, SETTINGS.replace(state_wal=True)) as opened:
        yield opened


def test_the_first_event_of_a_user_starts_their_session(store: SessionStore) -> None:
    result = store.apply(event("u1", "a"), partition=0, offset=5)
    assert result.applied
    assert result.session.item_ids == ["a"]
    assert store.get("u1") == result.session


def test_a_user_without_events_has_no_session(store: SessionStore) -> None:
    assert store.get("nobody") is None


def test_a_replayed_event_is_not_applied_twice(store: SessionStore) -> None:
    first = store.apply(event("u1", "a"), 0, 5).session
    replay = store.apply(event("u1", "a"), 0, 5)
    assert not replay.applied
    assert replay.session == first == store.get("u1")
    assert (store.counters.applied, store.counters.duplicates) == (1, 1)


def test_an_event_at_an_older_offset_of_the_same_partition_is_a_duplicate(
    store: SessionStore,
) -> None:
    store.apply(event("u1", "a"), 0, 5)
    assert not store.apply(event("u1", "b"), 0, 4).applied
    assert store.get("u1").item_ids == ["a"]  # type: ignore[union-attr]


def test_offsets_of_different_partitions_are_judged_separately(store: SessionStore) -> None:
    store.apply(event("u1", "a"), 0, 5)
    assert store.apply(event("u1", "b"), 1, 2).applied
    assert store.get("u1").offsets == {0: 5, 1: 2}  # type: ignore[union-attr]


def test_users_do_not_share_sessions(store: SessionStore) -> None:
    store.apply(event("u1", "a"), 0, 1)
    store.apply(event("u2", "b"), 0, 2)
    assert store.get("u1").item_ids == ["a"]  # type: ignore[union-attr]
    assert store.get("u2").item_ids == ["b"]  # type: ignore[union-attr]


def test_sessions_and_offsets_survive_close_and_reopen(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        before = store.apply(event("u1", "a"), 0, 5).session
        store.apply(event("u2", "b"), 0, 6)
        store.apply(event("u3", "c"), 0, 7)
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert store.get("u1") == before
        assert not store.apply(event("u1", "a"), 0, 5).applied
        assert (store.clock_ms, store.applied_offset(0)) == (T0, 7)


def kill_after(state_dir: Path, work: str, changelog: bool = False) -> None:
    """Run ``work`` (Python using ``store`` and ``Event``) in a process that dies by SIGKILL.

    Without the changelog the store keeps RocksDB's write-ahead log; with it, it does not.
    """
    script = f"""
import os, signal
from pathlib import Path
from streamrec.state.store import SessionStore
from streamrec.contracts import Event
from streamrec.settings import Settings
settings = Settings(session_length=3, changelog={changelog})
store = SessionStore.open(Path({str(state_dir)!r}), 0, 1, settings)
{work}
os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr


def last_items_and_offset(state_dir: Path, user: str) -> tuple[list[str], int]:
    with SessionStore.open(state_dir, 0, 1, SETTINGS.replace(changelog=False)) as store:
        session = store.get(user)
        assert session is not None
        return session.item_ids, session.last_offset


def test_applied_events_survive_a_killed_process(state_dir: Path) -> None:
    kill_after(
        state_dir,
        f"""for n in range(20):
    store.apply(Event(f"e{{n}}", "u1", f"i{{n}}", "view", {T0} + n), 0, n)""",
    )
    assert last_items_and_offset(state_dir, "u1") == (["i17", "i18", "i19"], 19)


def test_without_a_write_ahead_log_a_killed_process_leaves_a_store_marked_as_lossy(
    state_dir: Path,
) -> None:
    # With the changelog on, RocksDB keeps no log: the memtable dies with the process.
    kill_after(
        state_dir,
        f"""for n in range(20):
    store.apply(Event(f"e{{n}}", "u1", f"i{{n}}", "view", {T0} + n), 0, n)""",
        changelog=True,
    )
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert store.lost_writes  # so the flow rebuilds it from the changelog
        assert store.get("u1") is None
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert store.lost_writes  # until it is rebuilt, whoever opened it meanwhile


def test_without_a_write_ahead_log_a_clean_close_keeps_everything(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "a"), 0, 5)
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert not store.lost_writes
        session = store.get("u1")
        assert session is not None and session.item_ids == ["a"]


def test_staged_events_are_read_at_once_and_written_together_by_commit(
    logged_store: SessionStore, state_dir: Path
) -> None:
    store = logged_store
    store.stage(event("u1", "a"), 0, 1)
    assert store.stage(event("u1", "b"), 0, 2).session.item_ids == ["a", "b"]
    store.stage(event("u2", "c"), 0, 3)
    with open_state_view(state_dir, SETTINGS) as view:
        assert view.find("u1") is None  # nothing written yet
    assert store.commit() == 3
    assert store.commit() == 0
    with open_state_view(state_dir, SETTINGS) as view:
        found = [view.find(user) for user in ("u1", "u2")]
        assert [f.session.item_ids for f in found if f] == [["a", "b"], ["c"]]


def test_a_killed_process_keeps_the_committed_batches_and_loses_only_the_staged_one(
    state_dir: Path,
) -> None:
    kill_after(
        state_dir,
        f"""for n in range(6):
    store.stage(Event(f"e{{n}}", "u1", f"i{{n}}", "view", {T0} + n), 0, n)
    if n == 3:
        store.commit()""",
    )
    # The flow emits nothing for a batch before committing it, and reads it again.
    assert last_items_and_offset(state_dir, "u1") == (["i1", "i2", "i3"], 3)


def test_forget_writes_what_was_staged_before_it_and_erases_the_user(
    store: SessionStore,
) -> None:
    store.stage(event("u1", "a"), 0, 1)
    store.stage(event("u2", "b"), 0, 2)
    assert store.forget("u1") is Erasure.ERASED
    assert store.get("u1") is None
    assert store.stage(event("u1", "c"), 0, 3).session.item_ids == ["c"]
    assert store.commit() == 1
    assert store.get("u2") is not None and store.counters.applied == 3


def test_the_cache_holds_the_most_recently_written_sessions_up_to_its_bytes(
    state_dir: Path,
) -> None:
    # Room for two of these sessions (one or two interactions each) and not three.
    one = Session.empty("u1").with_event(event("u1", "i0"), 0, 0, SETTINGS.session_length)
    two = one.with_event(event("u1", "i1"), 0, 1, SETTINGS.session_length)
    room = 2 * session_bytes(b"s:u1", two)
    assert room < 3 * session_bytes(b"s:u1", one)
    with SessionStore.open(state_dir, 0, 1, SETTINGS.replace(session_cache_mb=room / MB)) as store:
        for n, user in enumerate(["u1", "u2", "u3", "u3", "u2"]):
            store.apply(event(user, f"i{n}"), 0, n)
        # u1 was evicted by u3; u2 and u3 were written last.
        assert (store.counters.cache_hits, store.counters.cache_misses) == (2, 3)
        store.get("u1")
        store.get("u2")
        assert (store.counters.cache_hits, store.counters.cache_misses) == (3, 4)


def test_an_erased_or_swept_session_is_never_served_from_the_cache(store: SessionStore) -> None:
    store.apply(event("u1", "a"), 0, 1)
    store.apply(event("u2", "b"), 0, 2)
    store.forget("u1")
    assert store.get("u1") is None
    later = T0 + TTL_MS + 5000
    store.apply(event("u3", "c", ts=later), 0, 3)
    assert store.sweep_expired(now_ms=later) == 1
    assert store.get("u2", now_ms=T0) is None  # gone from the DB, so not in memory either


def test_the_cache_can_be_turned_off(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS.replace(session_cache_mb=0)) as store:
        store.apply(event("u1", "a"), 0, 1)
        store.apply(event("u1", "b"), 0, 2)
        session = store.get("u1")
        assert session is not None and session.item_ids == ["a", "b"]
        assert store.counters.cache_hits == 0


def test_a_negative_cache_size_is_refused() -> None:
    with pytest.raises(ValueError, match="session_cache_mb must be 0 or more"):
        SETTINGS.replace(session_cache_mb=-1)


def test_a_session_idle_longer_than_the_ttl_reads_as_absent(store: SessionStore) -> None:
    store.apply(event("u1", "a", T0), 0, 1)
    assert store.get("u1", now_ms=T0 + TTL_MS) is not None
    assert store.get("u1", now_ms=T0 + TTL_MS + 1) is None


def test_expiry_is_judged_by_the_median_latest_event_time_of_recent_users_in_whole_seconds(
    store: SessionStore,
) -> None:
    store.apply(event("u1", "a", T0), 0, 1)
    for offset, user in enumerate(("u2", "u3", "u4"), start=2):
        store.apply(event(user, "b", T0 + TTL_MS + 999), 0, offset)
    assert store.clock_ms == T0 + TTL_MS
    assert store.get("u1") is not None
    store.apply(event("u2", "c", T0 + TTL_MS + 1000), 0, 5)
    store.apply(event("u3", "c", T0 + TTL_MS + 1000), 0, 6)
    assert store.get("u1") is None
    assert store.get("u2") is not None


def test_one_user_with_a_wrong_clock_cannot_expire_the_others(store: SessionStore) -> None:
    for offset, user in enumerate(("u1", "u2", "u3", "u4")):
        store.apply(event(user, "a", T0 + offset), 0, offset)
    store.apply(event("liar", "a", T0 + 31 * 24 * 3600 * 1000), 0, 10)
    assert store.clock_ms == T0
    assert store.sweep_expired() == 0
    assert len(list(store.user_ids())) == 5


def test_the_clock_moves_only_once_several_users_agree(store: SessionStore) -> None:
    store.apply(event("u1", "a", T0), 0, 1)
    store.apply(event("u2", "a", T0), 0, 2)
    assert store.clock_ms is None
    store.apply(event("u3", "a", T0), 0, 3)
    assert store.clock_ms == T0


def test_the_clock_never_runs_ahead_of_the_wall_clock_by_more_than_the_skew(
    state_dir: Path,
) -> None:
    settings = SETTINGS.replace(event_time_skew_s=60.0)
    store = SessionStore.open(state_dir, 0, 1, settings)
    store._expiry.wall_ms = lambda: float(T0)  # every user's clock is a day ahead of this machine's
    with store:
        for offset, user in enumerate(("u1", "u2", "u3")):
            store.apply(event(user, "a", T0 + 24 * 3600 * 1000), 0, offset)
        assert store.clock_ms == T0 + 60_000


def test_replays_of_a_swept_or_forgotten_users_events_are_not_applied_again(
    store: SessionStore,
) -> None:
    store.apply(event("gone", "a", T0), 0, 1)
    store.apply(event("erased", "b", T0), 0, 2)
    store.forget("erased")
    assert store.sweep_expired(now_ms=T0 + TTL_MS + 1) == 1
    assert list(store.user_ids()) == []
    assert not store.apply(event("gone", "a", T0), 0, 1).applied
    assert not store.apply(event("erased", "b", T0), 0, 2).applied
    assert list(store.user_ids()) == []
    assert store.apply(event("erased", "c", T0), 0, 3).applied


def test_an_event_after_the_ttl_starts_a_fresh_session_that_keeps_the_offsets(
    store: SessionStore,
) -> None:
    store.apply(event("u1", "a", T0, kind="purchase"), 0, 1)
    store.apply(event("u1", "b", T0 + TTL_MS + 1), 1, 7)
    session = store.get("u1")
    assert session is not None
    assert (session.item_ids, session.count("purchase"), session.first_seen_ms) == (
        ["b"],
        0,
        T0 + TTL_MS + 1,
    )
    assert session.offsets == {0: 1, 1: 7}
    assert not store.apply(event("u1", "a", T0, kind="purchase"), 0, 1).applied
    assert store.counters.restarted == 1


def test_a_sweep_removes_expired_sessions_only(store: SessionStore) -> None:
    store.apply(event("old", "a", T0), 0, 1)
    store.apply(event("new", "b", T0 + TTL_MS + 10), 0, 2)
    assert store.sweep_expired(now_ms=T0 + TTL_MS + 10, max_keys=100) == 1
    assert list(store.user_ids()) == ["new"]
    assert store.counters.swept == 1


def test_a_sweep_spares_an_expired_session_a_replay_may_still_read_until_reading_moves_on(
    store: SessionStore,
) -> None:
    store.replay_floor = 2  # a crash now could make the flow read offsets 2 and on again
    store.apply(event("settled", "b", T0), 0, 1)
    store.apply(event("replayable", "a", T0), 0, 2)
    later = T0 + TTL_MS + 10
    assert store.sweep_expired(now_ms=later, max_keys=100) == 1
    assert list(store.user_ids()) == ["replayable"]
    assert store.get("replayable", now_ms=later) is None  # expired all the same
    store.replay_floor = 3
    assert store.sweep_expired(now_ms=later, max_keys=100) == 1
    assert list(store.user_ids()) == []


def test_a_sweep_examines_at_most_max_keys_and_resumes_where_it_stopped(
    store: SessionStore,
) -> None:
    for n in range(10):
        store.apply(event(f"u{n}", "a", T0), 0, n)
    later = T0 + TTL_MS + 1
    removed = [store.sweep_expired(now_ms=later, max_keys=4) for _ in range(3)]
    assert removed == [4, 4, 2]
    assert list(store.user_ids()) == []


def test_a_sweep_starts_over_after_reaching_the_last_session(store: SessionStore) -> None:
    for n in range(3):
        store.apply(event(f"u{n}", "a", T0), 0, n)
    assert store.sweep_expired(now_ms=T0, max_keys=10) == 0
    assert store.sweep_expired(now_ms=T0 + TTL_MS + 1, max_keys=10) == 3


def test_a_sweep_quarantines_a_corrupt_record_and_goes_on_past_it(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        for offset, user in enumerate(("a", "b", "c")):
            store.apply(event(user, "i", T0), 0, offset)
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    raw[session_key("b")] = b""
    raw.close()
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert store.sweep_expired(now_ms=T0 + TTL_MS + 1, max_keys=10) == 3
        assert list(store.user_ids()) == []
        assert store.counters.quarantined == ["b"]


def test_forget_erases_the_user_and_a_later_event_starts_afresh(store: SessionStore) -> None:
    store.apply(event("u1", "a"), 0, 1)
    store.apply(event("u1", "b"), 0, 2)
    assert store.forget("u1") is Erasure.ERASED
    assert store.get("u1") is None
    assert list(store.user_ids()) == []
    session = store.apply(event("u1", "c"), 0, 3).session
    assert (session.item_ids, session.count("view"), session.offsets) == (["c"], 1, {0: 3})


def test_forgetting_an_unknown_user_reports_that_nothing_was_erased(store: SessionStore) -> None:
    assert store.forget("nobody") is Erasure.NOTHING


def files_containing(directory: Path, needle: str) -> list[str]:
    return [
        p.name for p in directory.iterdir() if p.is_file() and needle.encode() in p.read_bytes()
    ]


def test_forget_leaves_the_users_data_in_no_file_of_the_store(state_dir: Path) -> None:
    user, secret = "user-5be1e", "secret-item-7f3a9c"
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        for n in range(3):
            store.apply(event(user, f"{secret}-{n}"), 0, n)
        store.apply(event("u2", "other"), 0, 9)
        store.forget(user)
        assert files_containing(shard_dir(state_dir, 0), secret) == []
    # RocksDB's manifest may name the key as a table boundary until the DB is next opened.
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert files_containing(shard_dir(state_dir, 0), user) == []
        assert store.get("u2") is not None


def test_a_corrupt_record_is_quarantined_and_its_user_starts_afresh(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "a"), 0, 1)
    garbage = bytes([SESSION_FORMAT_VERSION]) + b"garbage"
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    raw[session_key("u1")] = garbage
    raw.close()
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert store.get("u1") is None
        assert store.counters.quarantined == ["u1"]
        assert not store.apply(event("u1", "a"), 0, 1).applied  # still a replay
        assert store.apply(event("u1", "b"), 0, 2).session.item_ids == ["b"]
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    assert raw[QUARANTINE_PREFIX + b"u1"] == garbage  # kept aside for inspection
    raw.close()


def test_a_record_of_a_newer_format_is_refused_not_quarantined(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "a"), 0, 1)
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    raw[session_key("u1")] = bytes([SESSION_FORMAT_VERSION + 1]) + b"from the future"
    raw.close()
    with (
        SessionStore.open(state_dir, 0, 1, SETTINGS) as store,
        pytest.raises(UnknownSessionFormatError, match="format version 4"),
    ):
        store.apply(event("u1", "b"), 0, 2)


def test_a_damaged_table_file_is_refused_at_open_saying_what_to_do(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "a"), 0, 1)
    with SessionStore.open(state_dir, 0, 1, SETTINGS):
        pass  # reopening moves the write-ahead log into a table file
    for table in shard_dir(state_dir, 0).glob("*.sst"):
        damaged = bytearray(table.read_bytes())
        damaged[20] ^= 0xFF  # inside the first data block, which holds the store's metadata
        table.write_bytes(bytes(damaged))
    with pytest.raises(StateError, match="is damaged.*restore it"):
        SessionStore.open(state_dir, 0, 1, SETTINGS)


def test_loaded_sessions_read_back_as_written(store: SessionStore, tmp_path: Path) -> None:
    with SessionStore.open(tmp_path / "other", 0, 1, SETTINGS) as source:
        sessions = [source.apply(event(f"u{n}", "a"), 0, n).session for n in range(5)]
    assert store.load(sessions, batch_size=2) == 5
    assert [store.get(f"u{n}") for n in range(5)] == sessions


def test_stats_count_keys_expired_sessions_and_bytes(store: SessionStore) -> None:
    store.apply(event("u1", "a", T0), 0, 1)
    store.apply(event("u2", "b", T0 + TTL_MS + 1000), 0, 2)
    store.apply(event("u3", "b", T0 + TTL_MS + 1000), 0, 3)
    stats = store.stats()
    assert (stats.shard_index, stats.sessions, stats.expired) == (0, 3, 1)
    assert stats.record_bytes > 0 and stats.disk_bytes > 0
    assert stats.clock_ms == T0 + TTL_MS + 1000


def test_a_read_only_view_sees_the_sessions_while_the_store_is_open(
    logged_store: SessionStore, state_dir: Path
) -> None:
    store = logged_store
    written = store.apply(event("u1", "a"), 0, 1).session
    with open_state_view(state_dir, SETTINGS) as view:
        found = view.find("u1")
        assert found is not None
        assert (found.shard_index, found.session, found.expired) == (0, written, False)
        assert view.find("nobody") is None


def test_a_forget_read_again_after_a_restart_keeps_what_the_user_did_after_it(
    state_dir: Path,
) -> None:
    # Defect found by review: e1, e2, forget, e3 read twice (`streamrec run --no-recovery`)
    # left no session at all after the second reading.
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "a"), 0, 0)
        store.apply(event("u1", "b"), 0, 1)
        assert store.forget("u1", 0, 2) is Erasure.ERASED
        store.apply(event("u1", "c"), 0, 3)
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert not store.apply(event("u1", "a"), 0, 0).applied
        assert not store.apply(event("u1", "b"), 0, 1).applied
        assert store.forget("u1", 0, 2) is Erasure.ALREADY_APPLIED
        assert not store.apply(event("u1", "c"), 0, 3).applied
        session = store.get("u1")
        assert session is not None and session.item_ids == ["c"]


def test_a_forget_older_than_the_users_session_is_a_replay_even_without_the_watermark(
    state_dir: Path,
) -> None:
    # The watermark reaches disk only with removals; the session's own offsets tell too.
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "c"), 0, 7)
        store._applied.clear()  # as after a crash before the watermark reached the disk
        assert store.forget("u1", 0, 5) is Erasure.ALREADY_APPLIED
        assert store.get("u1") is not None


def test_a_forget_erases_a_quarantined_record_too(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        store.apply(event("u1", "a"), 0, 1)
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    raw[session_key("u1")] = bytes([SESSION_FORMAT_VERSION]) + b"garbage"
    raw.close()
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        assert store.get("u1") is None  # moved aside under q:
        assert store.forget("u1", 0, 2) is Erasure.ERASED
        assert store.forget("u1", 0, 3) is Erasure.NOTHING
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    assert raw.get(QUARANTINE_PREFIX + b"u1") is None
    raw.close()


@pytest.mark.xfail(
    strict=True,
    reason="found by the fault schedules, left to the expiry work (#22): a sweep judges by the "
    "shard's clock, the next event by its own gap, so a user lagging the clock keeps or loses "
    "their session depending on when the sweep ran",
)
def test_a_lagging_users_session_is_the_same_whether_or_not_a_sweep_ran_first(
    state_dir: Path,
) -> None:
    def session_after(sweep: bool, directory: Path) -> list[str]:
        with SessionStore.open(directory, 0, 1, SETTINGS) as store:
            store.apply(event("late", "a", T0), 0, 0)
            for n in range(5):  # the others move the shard's clock well past the TTL
                store.apply(event(f"u{n}", "x", T0 + 2 * TTL_MS), 0, 1 + n)
            if sweep:
                store.sweep_expired()
            store.apply(event("late", "b", T0 + TTL_MS // 2), 0, 9)
            session = store.get("late", T0)
            assert session is not None
            return session.item_ids

    assert session_after(True, state_dir / "swept") == session_after(False, state_dir / "not")


@pytest.fixture
def broken_store(small_disk: Path) -> Iterator[SessionStore]:
    """A store whose disk filled up: RocksDB has refused a write and refuses every later one.

    A corrupt record of user "damaged" and an expired session of user "idle" wait in it.
    """
    state_dir = small_disk / "state"
    settings = SETTINGS.replace(state_wal=True)
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        store.apply(event("damaged", "a"), 0, 1)
        store.apply(event("idle", "a"), 0, 2)
    raw = Rdict(str(shard_dir(state_dir, 0)), db_options())
    raw[session_key("damaged")] = bytes([SESSION_FORMAT_VERSION]) + b"garbage"
    raw.close()
    store = SessionStore.open(state_dir, 0, 1, settings)
    fill(small_disk)
    with pytest.raises(StateWriteError):
        for n in range(100_000):  # a write the preallocated log still had room for succeeds
            store.apply(event(f"u{n}", "b" * 200, T0 + TTL_MS * 2), 0, 3 + n)
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):  # its last write fails too
            store.close()


def test_a_forget_that_cannot_be_written_stops_as_a_disk_failure(
    broken_store: SessionStore,
) -> None:
    with pytest.raises(StateWriteError, match="cannot write to shard DB"):
        broken_store.forget("idle", purge=True)


def test_a_sweep_that_cannot_be_written_stops_as_a_disk_failure(
    broken_store: SessionStore,
) -> None:
    with pytest.raises(StateWriteError, match="cannot write to shard DB"):
        broken_store.sweep_expired(now_ms=T0 + TTL_MS * 2, max_keys=100)


def test_a_quarantine_that_cannot_be_written_stops_as_a_disk_failure(
    broken_store: SessionStore,
) -> None:
    with pytest.raises(StateWriteError, match="cannot write to shard DB"):
        broken_store.get("damaged")
