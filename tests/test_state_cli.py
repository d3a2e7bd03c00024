"""`streamrec state show|dump|stats` and `streamrec bench state`, through their click commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from streamrec.bench.state import bench_state
from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.cli import state_group
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import open_read_write
from streamrec.state.session import Session, encode_session
from streamrec.state.store import SessionStore

T0 = 1_700_000_000_000
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Two shard DBs: ann's session in shard 1, and an old one of bob's in shard 0."""
    settings = Settings(session_ttl_s=24 * 3600.0)
    with SessionStore.open(tmp_path, 0, 2, settings) as store:
        store.apply(Event("e1", "bob", "old-item", "view", T0 - 2 * DAY_MS), 0, 1)
        # The clock needs several users' votes; these two are forgotten again.
        store.apply(Event("e4", "cy", "i1", "view", T0), 0, 2)
        store.apply(Event("e5", "di", "i1", "view", T0), 0, 3)
        store.forget("cy")
        store.forget("di")
    with SessionStore.open(tmp_path, 1, 2, settings) as store:
        store.apply(Event("e2", "ann", "i7", "rating", T0, 4.5), 1, 10)
        store.apply(Event("e3", "ann", "i8", "click", T0 + 1), 1, 11)
    return tmp_path


def run(command: object, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        command,  # type: ignore[arg-type]
        list(args),
        env={"STREAMREC_SESSION_TTL_S": str(24 * 3600.0)},
    )
    return result.exit_code, result.output


def dump(state_dir: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run `state dump`: its exit code, every stdout line parsed as JSON, and its stderr."""
    result = CliRunner().invoke(
        state_group,
        ["dump", "--state-dir", str(state_dir), *args],
        env={"STREAMREC_SESSION_TTL_S": str(24 * 3600.0)},
    )
    return (
        result.exit_code,
        [orjson.loads(line) for line in result.stdout.splitlines()],
        (result.stderr),
    )


def put_raw(state_dir: Path, shard: int, records: dict[bytes, bytes]) -> None:
    """Write records as they are into a shard DB (the flow stopped): how damage looks on disk."""
    db = open_read_write(shard_dir(state_dir, shard))
    try:
        for key, record in records.items():
            db.put(key, record)
    finally:
        db.close()


def add_sessions(state_dir: Path, shard: int, events: list[tuple[str, str, int]]) -> None:
    """Apply (user, item, offset) events at T0 to a shard of the fixture's state."""
    with SessionStore.open(state_dir, shard, 2, Settings(session_ttl_s=24 * 3600.0)) as store:
        for user, item, offset in events:
            store.apply(Event(f"e{offset}", user, item, "view", T0), shard, offset)


def test_show_prints_the_users_session_as_json_from_whichever_shard_holds_it(
    state_dir: Path,
) -> None:
    code, output = run(state_group, "show", "ann", "--state-dir", str(state_dir))
    assert code == 0, output
    shown = orjson.loads(output)
    assert (shown["shard"], shown["expired"], shown["user_id"]) == (1, False, "ann")
    assert [i["item_id"] for i in shown["interactions"]] == ["i7", "i8"]
    assert shown["source"] == {"partition": 1, "offset": 11}
    assert shown["counts"]["rating"] == 1


def test_show_of_an_unknown_user_fails_and_says_where_it_looked(state_dir: Path) -> None:
    code, output = run(state_group, "show", "zed", "--state-dir", str(state_dir))
    assert code == 1
    assert "no session for user 'zed'" in output and "2 shard DBs" in output


def test_show_of_an_expired_session_fails_unless_asked_to_include_it(state_dir: Path) -> None:
    code, output = run(state_group, "show", "bob", "--state-dir", str(state_dir))
    assert code == 1 and "expired" in output
    code, output = run(
        state_group, "show", "bob", "--state-dir", str(state_dir), "--include-expired"
    )
    assert code == 0 and orjson.loads(output)["expired"] is True


def test_show_of_a_directory_without_state_explains_what_to_check(tmp_path: Path) -> None:
    code, output = run(state_group, "show", "ann", "--state-dir", str(tmp_path / "nowhere"))
    assert code == 1 and "LAYOUT.json is missing" in output


def test_dump_prints_one_json_line_per_session_in_shard_then_key_order(state_dir: Path) -> None:
    add_sessions(state_dir, 1, [("zoe", "i1", 12), ("al", "i2", 13)])
    code, lines, stderr = dump(state_dir, "--include-expired")
    assert code == 0, stderr
    assert [(s["partition"], s["user_id"]) for s in lines] == [
        (0, "bob"),
        (1, "al"),
        (1, "ann"),
        (1, "zoe"),
    ]
    assert lines[2] == {
        "user_id": "ann",
        "partition": 1,
        "offset": 11,
        "items": ["i7", "i8"],
        "first_seen_ms": T0,
        "last_seen_ms": T0 + 1,
        "counts": {"view": 0, "click": 1, "add_to_cart": 0, "purchase": 0, "rating": 1},
        "expired": False,
    }
    assert "dumped 4 sessions from 2 shard DBs" in stderr


def test_dump_leaves_sessions_expired_by_their_shards_clock_out_unless_asked(
    state_dir: Path,
) -> None:
    code, lines, stderr = dump(state_dir)
    assert code == 0, stderr
    assert [s["user_id"] for s in lines] == ["ann"]
    assert "1 expired left out" in stderr
    code, lines, _ = dump(state_dir, "--include-expired")
    assert [(s["user_id"], s["expired"]) for s in lines] == [("bob", True), ("ann", False)]


def test_dump_judges_expiry_by_each_shards_own_clock_unless_given_a_now(
    state_dir: Path,
) -> None:
    # Shard 1 has two users: too few voters for a clock, so it expires nothing, as the flow.
    with SessionStore.open(state_dir, 1, 2, Settings(session_ttl_s=24 * 3600.0)) as store:
        store.apply(Event("e9", "old", "i1", "view", T0 - 2 * DAY_MS), 1, 12)
    code, lines, _ = dump(state_dir, "--include-expired")
    assert [(s["user_id"], s["expired"]) for s in lines] == [
        ("bob", True),
        ("ann", False),
        ("old", False),
    ]
    code, lines, _ = dump(state_dir, "--now-ms", str(T0))
    assert [s["user_id"] for s in lines] == ["ann"]


def test_dump_of_chosen_partitions_prints_only_their_shards(state_dir: Path) -> None:
    code, lines, _ = dump(state_dir, "--partition", "0", "--include-expired")
    assert code == 0 and [s["user_id"] for s in lines] == ["bob"]
    code, lines, _ = dump(state_dir, "--partition", "1", "--partition", "0", "--include-expired")
    assert code == 0 and [s["user_id"] for s in lines] == ["bob", "ann"]


def test_dump_of_a_partition_the_state_does_not_have_says_how_many_it_has(
    state_dir: Path,
) -> None:
    code, lines, stderr = dump(state_dir, "--partition", "2")
    assert code == 2 and lines == []
    assert "2 shards" in stderr and "0 to 1" in stderr


def _ann_record(state_dir: Path) -> bytes:
    db = open_read_write(shard_dir(state_dir, 1))
    try:
        record = db.get(b"s:ann")
    finally:
        db.close()
    assert isinstance(record, bytes)
    return record


@pytest.mark.parametrize(
    ("key", "damage"),
    [
        (b"s:carl", lambda record: b""),
        (b"s:carl", lambda record: b"\x09" + record[1:]),  # a format from the future
        (b"s:carl", lambda record: record[:40]),
        (b"s:carl", lambda record: record[:-2] + b"\x00\x00"),  # the item ids
        (b"s:\xff\xfe", lambda record: record),  # a key that is not UTF-8
    ],
    ids=["empty", "unknown-format", "truncated", "bad-item-ids", "key-not-utf8"],
)
def test_dump_skips_an_unreadable_record_names_it_and_counts_it(
    state_dir: Path, key: bytes, damage: Callable[[bytes], bytes]
) -> None:
    put_raw(state_dir, 1, {key: damage(_ann_record(state_dir))})
    code, lines, stderr = dump(state_dir, "--include-expired")
    assert code == 0, stderr
    assert [s["user_id"] for s in lines] == ["bob", "ann"]
    assert "skipped the record of user" in stderr and "in shard 1" in stderr
    assert "skipped 1 unreadable record" in stderr


def test_dump_while_a_store_is_open_for_writing_sees_what_it_has_written(
    state_dir: Path,
) -> None:
    # With RocksDB's log: without it, a reader sees the store as of its last memtable flush.
    logged = Settings(session_ttl_s=24 * 3600.0, state_wal=True)
    with SessionStore.open(state_dir, 1, 2, logged) as store:
        store.apply(Event("e9", "eve", "i3", "purchase", T0 + 5), 1, 12)
        code, lines, stderr = dump(state_dir, "--partition", "1")
        store.apply(Event("e10", "fay", "i3", "view", T0 + 6), 1, 13)
    assert code == 0, stderr
    assert [(s["user_id"], s["offset"]) for s in lines] == [("ann", 11), ("eve", 12)]


def test_the_replay_tail_is_not_part_of_a_dumped_sessions_items(tmp_path: Path) -> None:
    with SessionStore.open(tmp_path, 0, 1, Settings(session_length=2)) as store:
        store.replay_floor = 0  # every event may be replayed: the store keeps a tail
        for offset, item in enumerate(["i1", "i2", "i3"]):
            store.apply(Event(f"e{offset}", "ann", item, "view", T0 + offset), 0, offset)
        session = store.get("ann")
        assert session is not None and session.tail_length == 1
    code, lines, stderr = dump(tmp_path)
    assert code == 0, stderr
    assert [(s["items"], s["offset"]) for s in lines] == [(["i2", "i3"], 2)]


def test_dump_of_a_damaged_shard_db_prints_what_it_can_and_exits_1(state_dir: Path) -> None:
    # Enough sessions for many data blocks in one table file; then one block is overwritten.
    sessions = {
        f"s:u{i:05d}".encode(): encode_session(
            Session.empty(f"u{i:05d}").with_event(
                Event(f"e{i}", f"u{i:05d}", f"item-{i}", "view", T0), 0, 100 + i, max_items=50
            )
        )
        for i in range(3000)
    }
    db = open_read_write(shard_dir(state_dir, 0))
    for key, record in sessions.items():
        db.put(key, record)
    db.flush()
    db.close()
    table = max(shard_dir(state_dir, 0).glob("*.sst"), key=lambda t: t.stat().st_size)
    data = bytearray(table.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    table.write_bytes(bytes(data))

    code, lines, stderr = dump(state_dir, "--include-expired")
    assert code == 1
    assert "shard-0 is damaged" in stderr and "after the session of user 'u0" in stderr
    users = [s["user_id"] for s in lines]
    assert 0 < users.index("ann") < 3000 and users[-1] == "ann"  # shard 1 dumped after it


def test_stats_print_keys_expired_and_bytes_per_shard_and_in_total(state_dir: Path) -> None:
    code, output = run(state_group, "stats", "--state-dir", str(state_dir), "--json")
    assert code == 0, output
    stats = orjson.loads(output)
    assert stats["shard_count"] == 2
    assert [(s["shard"], s["keys"], s["expired"]) for s in stats["shards"]] == [
        (0, 1, 1),
        (1, 1, 0),
    ]
    assert stats["total"]["keys"] == 2 and stats["total"]["disk_bytes"] > 0
    assert stats["total"]["quarantined"] == 0


def test_stats_count_the_records_the_flow_set_aside_as_unreadable(state_dir: Path) -> None:
    put_raw(state_dir, 1, {b"s:carl": b""})
    with SessionStore.open(state_dir, 1, 2, Settings(session_ttl_s=24 * 3600.0)) as store:
        assert store.get("carl") is None  # the store reads it, fails, and quarantines it
    code, output = run(state_group, "stats", "--state-dir", str(state_dir), "--json")
    assert code == 0, output
    stats = orjson.loads(output)
    assert [s["quarantined"] for s in stats["shards"]] == [0, 1]
    assert stats["total"]["quarantined"] == 1
    code, output = run(state_group, "stats", "--state-dir", str(state_dir))
    assert "quarantined" in output.splitlines()[2]
    assert output.splitlines()[-1].split()[:4] == ["total", "2", "1", "1"]


def test_stats_as_a_table_name_every_shard_and_the_total(state_dir: Path) -> None:
    code, output = run(state_group, "stats", "--state-dir", str(state_dir))
    assert code == 0, output
    assert "2 shards" in output
    assert [line.split()[0] for line in output.splitlines()[3:]] == ["0", "1", "total"]


@pytest.mark.parametrize(
    ("command", "args", "option"),
    [
        (state_group, ["show"], "--include-expired"),
        (state_group, ["dump"], "--partition"),
        (state_group, ["stats"], "--state-dir"),
        (bench_state, [], "--users"),
    ],
)
def test_every_command_explains_itself_in_its_help(
    command: object, args: list[str], option: str
) -> None:
    code, output = run(command, *args, "--help")
    assert code == 0 and option in output


def test_the_benchmark_reports_median_and_tail_latency_and_session_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code, output = run(bench_state, "--users", "300", "--applies", "500", "--json", str(out))
    assert code == 0, output
    figures = orjson.loads(out.read_bytes())
    assert figures["users"] == 300
    assert 0 < figures["apply_us_p50"] <= figures["apply_us_p99"]
    assert figures["bytes_per_session"] > 0
    assert "median" in output
