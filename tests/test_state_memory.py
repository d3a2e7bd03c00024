"""The store's in-memory caches are bounded in bytes, hostile ids included, by tracemalloc.

Each estimate (``streamrec.state.memory``) must be at least what an entry really
holds, so that a cache at its bound holds at most its megabytes; and, for
ordinary sessions, not wildly more, or the bound would waste the memory it
gives.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rocksdict import Rdict

from streamrec.contracts import Event
from streamrec.item_hashes import HASH_DTYPE
from streamrec.lru import MB
from streamrec.settings import Settings
from streamrec.state.consumed import ConsumedItems, encode_consumed
from streamrec.state.keys import session_key
from streamrec.state.memory import consumed_bytes, session_bytes
from streamrec.state.rocks import db_options
from streamrec.state.store import SessionStore

T0 = 1_700_000_000_000
L = 50
# Sessions only: the consumed-items cache is measured on its own below.
SETTINGS = Settings(session_length=L, consumed_types="purchase", consumed_cache_mb=0)
CATALOGUE = [str(n) for n in range(1, 2001)]

# Per kind of user: the user id and the item ids of the n-th user's events.
Ids = Callable[[int], tuple[str, list[str]]]


def ordinary(n: int) -> tuple[str, list[str]]:
    """MovieLens-like: short ids, items from a shared catalogue."""
    return f"user{n}", [CATALOGUE[(n * 7919 + k * 104_729) % len(CATALOGUE)] for k in range(L)]


def unique_short(n: int) -> tuple[str, list[str]]:
    """Every item id short and of this user alone: a string each, no sharing."""
    return f"u{n}", [f"{n}.{k}" for k in range(L)]


def long_ids(n: int) -> tuple[str, list[str]]:
    """256-character ids, the most the contract allows, unique."""
    return f"{n:08d}".ljust(256, "u"), [f"{n:08d}-{k:04d}".ljust(256, "x") for k in range(L)]


def control_ids(n: int) -> tuple[str, list[str]]:
    """256 characters, mostly control characters: six bytes each in the record's JSON."""
    return f"{n:08d}".ljust(256, "\x01"), [f"{n:08d}-{k:04d}".ljust(256, "\x01") for k in range(L)]


def wide_ids(n: int) -> tuple[str, list[str]]:
    """One emoji widens a 256-character string to 4 bytes a character."""
    return f"{n:08d}\U0001f600".ljust(256, "u"), [
        f"{n:08d}-{k:04d}\U0001f600".ljust(256, "x") for k in range(L)
    ]


def with_tail(n: int) -> tuple[str, list[str]]:
    """Control-character ids and the replay tail: three windows of them in the record."""
    user, _ = control_ids(n)
    return user, [f"{n:08d}-{k:04d}".ljust(256, "\x01") for k in range(3 * L)]


KINDS: dict[str, Ids] = {
    "ordinary": ordinary,
    "unique short ids": unique_short,
    "256-char ids": long_ids,
    "control characters": control_ids,
    "wide characters": wide_ids,
    "replay tail": with_tail,
}


def fill(store: SessionStore, ids: Ids, users: range, tail: bool) -> None:
    """Each user's events, applied as the flow applies them (item ids read after each)."""
    # A replay floor below every offset keeps the tail, as while a crash may replay them.
    store.replay_floor = 0 if tail else store.replay_floor
    offset = 0
    for n in users:
        user, items = ids(n)
        for k, item in enumerate(items):
            result = store.stage(Event(f"e{offset}", user, item, "view", T0 + k), 0, offset)
            result.session.item_ids  # noqa: B018 - the flow reads them for every event
            offset += 1
        store.commit()
        store.replay_floor = 0 if tail else store.replay_floor


def measure(kind: str, users: int, cache_mb: float) -> dict[str, float]:
    """Fill a fresh store's session cache with ``users`` of ``kind``: the bytes tracemalloc
    sees it hold, and the mean estimate of the sessions it holds."""
    ids = KINDS[kind]
    tail = kind == "replay tail"
    with tempfile.TemporaryDirectory() as scratch:
        store = SessionStore.open(Path(scratch), 0, 1, SETTINGS.replace(session_cache_mb=cache_mb))
        tracemalloc.start()
        before = traced_bytes()
        fill(store, ids, range(users), tail)
        held = traced_bytes() - before
        tracemalloc.stop()
        estimates = []
        for n in range(users):
            user = ids(n)[0]
            hits = store.counters.cache_hits
            session = store.get(user, now_ms=T0)
            if session is not None and store.counters.cache_hits > hits:  # held in memory
                estimates.append(session_bytes(session_key(user), session))
        store.close()
    return {"held": held, "cached": len(estimates), "estimate": sum(estimates) / len(estimates)}


def measured(kind: str, users: int, cache_mb: float) -> dict[str, float]:
    """``measure`` in a fresh interpreter: Python's table of interned strings is shared by the
    whole process and keeps the size the fullest moment gave it, so earlier tests would
    move the figures of later ones."""
    code = (
        "import json, sys; from tests.test_state_memory import measure; "
        "print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, kind, str(users), str(cache_mb)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_session_takes_no_more_than_its_estimate(kind: str) -> None:
    users = 40 if kind == "replay tail" else 200
    figures = measured(kind, users, cache_mb=1024.0)  # room for all of them
    assert figures["cached"] == users
    taken = figures["held"] / users
    assert taken <= figures["estimate"]
    if kind == "ordinary":
        # Shared item strings are counted as each session's own: about 3x, by design.
        assert figures["estimate"] <= 4.5 * taken
    else:
        assert figures["estimate"] <= 2.5 * taken


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "ordinary"])
def test_a_session_cache_filled_past_its_bound_with_hostile_sessions_stays_within_it(
    kind: str,
) -> None:
    bound_mb = 1.0
    # Several times what the bound holds, whatever the kind (~20 kB to ~0.6 MB a session).
    figures = measured(kind, 30 if kind == "replay tail" else 150, bound_mb)
    assert figures["cached"] >= 1
    # The store's own few structures (the clock's voters, the offsets) come on top: 5%.
    assert figures["held"] <= 1.05 * bound_mb * MB


def test_a_session_larger_than_the_whole_cache_is_not_cached() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        settings = SETTINGS.replace(session_cache_mb=0.01)  # less than one such session
        with SessionStore.open(Path(scratch), 0, 1, settings) as store:
            fill(store, long_ids, range(3), tail=False)
            hits = store.counters.cache_hits
            assert store.get(long_ids(0)[0], now_ms=T0) is not None
            assert store.counters.cache_hits == hits  # read from RocksDB


def consumed_records(db: Rdict, users: int, items: int) -> list[tuple[bytes, str]]:
    """``users`` records of ``items`` hashes each, written to ``db``: (key, user id)."""
    rng = np.random.default_rng(0)
    keys = []
    for n in range(users):
        user = f"user{n}"
        key = b"c:" + user.encode()
        db.put(
            key, encode_consumed(rng.integers(1, 2**63, items, dtype=np.int64).astype(HASH_DTYPE))
        )
        keys.append((key, user))
    return keys


@pytest.mark.parametrize("items", [1, 40, 5000])  # 5,000: the default cap, a 40 kB record
def test_a_cached_consumed_record_takes_no_more_than_its_estimate(items: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        db = Rdict(scratch, db_options())
        records = consumed_records(db, 20 if items == 5000 else 500, items)
        cache = ConsumedItems(db, frozenset({"rating"}), 5000, 1024 * MB)
        tracemalloc.start()
        try:
            before = traced_bytes()
            for key, user in records:
                cache.of(key, user)
            taken = (traced_bytes() - before) / len(records)
        finally:
            tracemalloc.stop()
        estimate = consumed_bytes(records[0][0], cache.of(*records[0]))
        cache.clear_cache()
        db.close()
    assert taken <= estimate <= 2 * taken


@pytest.mark.parametrize("items", [1, 5000])  # many users of one item; 40 kB records
def test_a_consumed_cache_filled_past_its_bound_stays_within_it(items: int) -> None:
    bound_mb = 1.0
    with tempfile.TemporaryDirectory() as scratch:
        db = Rdict(scratch, db_options())
        records = consumed_records(db, 100 if items == 5000 else 10_000, items)  # ~4 MB
        cache = ConsumedItems(db, frozenset({"rating"}), 5000, round(bound_mb * MB))
        tracemalloc.start()
        try:
            before = traced_bytes()
            for key, user in records:
                cache.of(key, user)
            held = traced_bytes() - before
        finally:
            tracemalloc.stop()
        cache.clear_cache()
        db.close()
    assert held <= bound_mb * MB
