"""`streamrec state show|stats` and `streamrec bench state`, driven through their click commands."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from state.cli import bench_state, state_group
from state.store import SessionStore
from streamrec.contracts import Event
from streamrec.settings import Settings

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


def test_stats_as_a_table_name_every_shard_and_the_total(state_dir: Path) -> None:
    code, output = run(state_group, "stats", "--state-dir", str(state_dir))
    assert code == 0, output
    assert "2 shards" in output
    assert [line.split()[0] for line in output.splitlines()[3:]] == ["0", "1", "total"]


@pytest.mark.parametrize(
    ("command", "args", "option"),
    [
        (state_group, ["show"], "--include-expired"),
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
