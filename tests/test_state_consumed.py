"""The items a user consumed, beyond their session's window, on a real RocksDB on disk."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from rocksdict import Rdict

from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.consumed import isin_sorted, item_hash, item_hashes
from streamrec.state.keys import CHANGELOG_CONSUMED_TAG, consumed_key
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import db_options
from streamrec.state.store import Erasure, SessionStore

T0 = 1_700_000_000_000
TTL_S = 60.0
TTL_MS = int(TTL_S * 1000)
SETTINGS = Settings(session_length=3, session_ttl_s=TTL_S, consumed_cap=5)
# Every read from RocksDB.
UNCACHED = SETTINGS.replace(session_cache_mb=0, consumed_cache_mb=0)


def event(user: str, item: str, ts: int = T0, kind: str = "rating") -> Event:
    return Event(f"{user}-{item}-{ts}", user, item, kind, ts, 4.0 if kind == "rating" else None)


def consumed(store: SessionStore, user: str) -> set[int]:
    return set(store.consumed(user).tolist())


def hashes(*items: str) -> set[int]:
    return {item_hash(i) for i in items}


class Recorder:
    """A changelog that keeps what it is sent."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None]] = []

    def send(
        self, partition: int, changes: Iterable[tuple[bytes, bytes | None]], applied: int | None
    ) -> None:
        self.records += changes


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[SessionStore]:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as opened:
        yield opened


def apply_all(store: SessionStore, events: list[Event], first_offset: int = 0) -> None:
    for offset, e in enumerate(events, start=first_offset):
        store.apply(e, 0, offset)


def test_rated_and_bought_items_are_kept_beyond_the_window(store: SessionStore) -> None:
    apply_all(store, [event("u1", "a"), event("u1", "b", kind="purchase")])
    apply_all(store, [event("u1", i, T0 + 1, "view") for i in "cdef"], first_offset=2)
    assert store.get("u1").item_ids == ["d", "e", "f"]  # type: ignore[union-attr]
    assert consumed(store, "u1") == hashes("a", "b")


def test_viewed_items_are_not_consumed(store: SessionStore) -> None:
    apply_all(store, [event("u1", "a", kind="view"), event("u1", "b", kind="click")])
    assert consumed(store, "u1") == set()


def test_the_consumed_event_types_are_a_setting(state_dir: Path) -> None:
    settings = SETTINGS.replace(consumed_types="view")
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        apply_all(store, [event("u1", "a", kind="view"), event("u1", "b", kind="rating")])
        assert consumed(store, "u1") == hashes("a")


def test_an_unknown_consumed_event_type_is_refused_with_the_known_ones(state_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown event types.*known: add_to_cart"):
        SessionStore.open(state_dir, 0, 1, SETTINGS.replace(consumed_types="rating,like"))


def test_past_the_cap_the_oldest_consumed_item_leaves(store: SessionStore) -> None:
    apply_all(store, [event("u1", str(i), T0 + i) for i in range(7)])
    assert store.consumed("u1").tolist() == item_hashes("23456").tolist()


def test_an_item_consumed_twice_is_kept_once(store: SessionStore) -> None:
    apply_all(store, [event("u1", "a"), event("u1", "a", kind="purchase")])
    assert store.consumed("u1").tolist() == [item_hash("a")]


def test_the_consumed_items_expire_with_the_session(store: SessionStore) -> None:
    apply_all(store, [event("u1", "a"), event("u1", "b", T0 + TTL_MS + 1, "view")])
    assert consumed(store, "u1") == set()
    store.close()
    with SessionStore.open(store.path.parent.parent, 0, 1, SETTINGS) as reopened:
        assert consumed(reopened, "u1") == set()


def test_a_new_session_keeps_only_what_was_consumed_in_it(store: SessionStore) -> None:
    apply_all(store, [event("u1", "a"), event("u1", "b", T0 + TTL_MS + 1)])
    assert consumed(store, "u1") == hashes("b")


def test_the_consumed_items_survive_a_reopen(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        apply_all(store, [event("u1", "a"), event("u2", "b", kind="purchase")])
    with SessionStore.open(state_dir, 0, 1, UNCACHED) as store:
        assert consumed(store, "u1") == hashes("a")
        assert consumed(store, "u2") == hashes("b")


def test_a_micro_batch_writes_sessions_and_consumed_items_together(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        for offset, e in enumerate([event("u1", "a"), event("u2", "b"), event("u1", "c")]):
            store.stage(e, 0, offset)
        assert consumed(store, "u1") == hashes("a", "c")  # staged: seen at once
        assert store.commit() == 3
    with SessionStore.open(state_dir, 0, 1, UNCACHED) as store:
        assert consumed(store, "u1") == hashes("a", "c")


def test_forgetting_a_user_erases_their_consumed_items(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        apply_all(store, [event("u1", "a"), event("u2", "b")])
        assert store.forget("u1") is Erasure.ERASED
        assert consumed(store, "u1") == set()
        assert consumed(store, "u2") == hashes("b")
    with SessionStore.open(state_dir, 0, 1, UNCACHED) as store:
        assert consumed(store, "u1") == set()


def test_a_sweep_removes_the_consumed_items_of_expired_users(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        apply_all(store, [event("old", "a"), event("new", "b", T0 + TTL_MS)])
        assert store.sweep_expired(now_ms=T0 + TTL_MS + 1) == 1
        assert consumed(store, "old") == set()
        assert consumed(store, "new") == hashes("b")
    with SessionStore.open(state_dir, 0, 1, UNCACHED) as store:
        assert consumed(store, "old") == set()
        assert consumed(store, "new") == hashes("b")


def test_a_cap_of_zero_keeps_no_consumed_items(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS.replace(consumed_cap=0)) as store:
        apply_all(store, [event("u1", "a")])
        assert consumed(store, "u1") == set()


def test_the_changelog_carries_consumed_items_and_a_rebuild_restores_them(
    tmp_path: Path,
) -> None:
    changelog = Recorder()
    with SessionStore.open(tmp_path / "a", 0, 1, SETTINGS) as store:
        store.changes = changelog
        apply_all(store, [event("u1", "a"), event("u2", "b"), event("u3", "c")])
        store.forget("u2", purge=False)
    assert (CHANGELOG_CONSUMED_TAG + b"u1", None) not in changelog.records
    assert (CHANGELOG_CONSUMED_TAG + b"u2", None) in changelog.records
    with SessionStore.open(tmp_path / "b", 0, 1, SETTINGS) as rebuilt:
        assert rebuilt.restore(changelog.records, applied=2) == 3  # session records, no others
        assert sorted(rebuilt.user_ids()) == ["u1", "u3"]
        assert consumed(rebuilt, "u1") == hashes("a")
        assert consumed(rebuilt, "u2") == set()


def test_users_who_never_consume_have_no_consumed_record(state_dir: Path) -> None:
    with SessionStore.open(state_dir, 0, 1, SETTINGS) as store:
        apply_all(store, [event("u1", "a", kind="view")])
    db = Rdict(str(shard_dir(state_dir, 0)), db_options())
    try:
        assert db.get(consumed_key("u1")) is None
    finally:
        db.close()


def test_the_record_is_eight_bytes_an_item(store: SessionStore) -> None:
    apply_all(store, [event("u1", str(i), T0 + i) for i in range(4)])
    assert store.consumed("u1").dtype == np.dtype("<u8")
    assert store.consumed("u1").nbytes == 4 * 8


def test_membership_in_a_sorted_record_agrees_with_isin() -> None:
    record = np.sort(item_hashes(str(i) for i in range(0, 100, 3)))
    probe = item_hashes(str(i) for i in range(120))
    assert isin_sorted(probe, record).tolist() == np.isin(probe, record).tolist()
    assert not isin_sorted(probe, record[:0]).any()
