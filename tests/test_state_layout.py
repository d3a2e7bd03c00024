"""The state directory: one RocksDB per shard (events partition), for one partition count."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.errors import IncompatibleStateError, StateLockedError, StateNotFoundError
from streamrec.state.layout import LAYOUT_FILE, STATE_FORMAT_VERSION, Layout, read_layout, shard_dir
from streamrec.state.store import SessionStore
from streamrec.state.view import open_state_view

SETTINGS = Settings()


def test_each_shard_gets_its_own_db_and_the_directory_records_the_count(tmp_path: Path) -> None:
    for index in range(3):
        SessionStore.open(tmp_path, index, 3, SETTINGS).close()
    assert read_layout(tmp_path) == Layout(STATE_FORMAT_VERSION, shard_count=3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "shard-0",
        "shard-1",
        "shard-2",
    ]


def test_the_layout_records_the_shard_count_and_nothing_about_workers(tmp_path: Path) -> None:
    SessionStore.open(tmp_path, 0, 3, SETTINGS).close()
    layout = orjson.loads((tmp_path / LAYOUT_FILE).read_bytes())
    assert layout == {"format_version": STATE_FORMAT_VERSION, "shard_count": 3}


def test_a_directory_made_for_another_partition_count_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    SessionStore.open(tmp_path, 0, 4, SETTINGS).close()
    with pytest.raises(
        IncompatibleStateError,
        match="for 4 shards.*now has 2 partitions.*recreate the topic with 4 partitions",
    ):
        SessionStore.open(tmp_path, 0, 2, SETTINGS)


def test_a_shard_db_opened_as_another_shard_is_refused(tmp_path: Path) -> None:
    SessionStore.open(tmp_path, 0, 2, SETTINGS).close()
    shard_dir(tmp_path, 0).rename(shard_dir(tmp_path, 1))
    with pytest.raises(IncompatibleStateError, match="made as shard 0 of 2.*as shard 1 of 2"):
        SessionStore.open(tmp_path, 1, 2, SETTINGS)


def test_shard_dbs_without_a_layout_record_from_more_partitions_are_refused(
    tmp_path: Path,
) -> None:
    SessionStore.open(tmp_path, 3, 4, SETTINGS).close()
    (tmp_path / LAYOUT_FILE).unlink()
    with pytest.raises(IncompatibleStateError, match="shard-3"):
        SessionStore.open(tmp_path, 0, 2, SETTINGS)


def test_a_directory_of_another_state_format_is_refused_naming_both(tmp_path: Path) -> None:
    doc = {"format_version": STATE_FORMAT_VERSION + 1, "shard_count": 1}
    (tmp_path / LAYOUT_FILE).write_bytes(orjson.dumps(doc))
    with pytest.raises(IncompatibleStateError, match="format 2; this build reads format 1"):
        SessionStore.open(tmp_path, 0, 1, SETTINGS)


def test_a_shard_index_outside_the_partition_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shard index 2 is not in \[0, 2\)"):
        SessionStore.open(tmp_path, 2, 2, SETTINGS)


def test_shards_opened_together_agree_on_one_layout(tmp_path: Path) -> None:
    def open_and_close(index: int) -> None:
        SessionStore.open(tmp_path, index, 8, SETTINGS).close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(open_and_close, range(8)))
    assert read_layout(tmp_path).shard_count == 8
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_shard_db_is_never_opened_twice_in_one_process(tmp_path: Path) -> None:
    with (
        SessionStore.open(tmp_path, 0, 1, SETTINGS),
        pytest.raises(StateLockedError, match="already open"),
    ):
        SessionStore.open(tmp_path, 0, 1, SETTINGS)


def test_a_shard_db_open_in_another_process_is_refused(tmp_path: Path) -> None:
    script = (
        "from pathlib import Path; from streamrec.state.store import SessionStore; "
        "from streamrec.settings import Settings; "
        f"SessionStore.open(Path({str(tmp_path)!r}), 0, 1, Settings())"
    )
    with SessionStore.open(tmp_path, 0, 1, SETTINGS):
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode != 0
    assert "StateLockedError" in other.stderr and "already open" in other.stderr


def test_the_read_only_view_searches_every_shard_db(tmp_path: Path) -> None:
    for index in range(3):
        with SessionStore.open(tmp_path, index, 3, SETTINGS) as store:
            store.apply(Event("e", f"user-{index}", "i", "view", 1_700_000_000_000), 0, index)
    with open_state_view(tmp_path, SETTINGS) as view:
        found = view.find("user-2")
        assert found is not None and found.shard_index == 2
        assert [w.sessions for w in view.stats()] == [1, 1, 1]


def test_a_view_of_a_directory_without_state_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(StateNotFoundError, match="--state-dir"):
        open_state_view(tmp_path / "nowhere", SETTINGS)
