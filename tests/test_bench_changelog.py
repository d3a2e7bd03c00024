"""`streamrec bench changelog`: what it counts, against the real broker (not its speed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.bench.changelog import local_log_dir, record_commits, run_changelog_bench
from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.changelog import record_kind


def test_each_commit_of_the_store_is_recorded_with_the_events_it_applied(
    movielens: list[Event], tmp_path: Path
) -> None:
    events = movielens[:100]
    commits = record_commits(events, Settings(), tmp_path, batch=8, replay_lag=0)
    assert [c.events for c in commits] == [8] * 12 + [4]
    assert [c.applied for c in commits] == [*range(7, 100, 8), 99]
    # One session record per user of a batch, however many of its events the batch holds.
    first = {e.user_id.encode() for e in events[:8]}
    assert {key for key, value in commits[0].changes if record_kind(key, value) == "session"} == (
        first
    )


@pytest.mark.kafka
def test_it_counts_bytes_by_kind_and_rebuilds_an_equal_shard_for_each_codec(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    result = run_changelog_bench(
        kafka_settings,
        movielens[:300],
        "movielens",
        batch=1,
        replay_lag=100,
        codecs=["none", "zstd"],
        rate=0,
        repeats=1,
        log_dir=local_log_dir(kafka_settings),
    )
    none, zstd = result.codecs
    assert result.commits == 300 and result.sessions > 0 and result.consumed_records > 0
    assert {"session", "consumed", "marks"} <= set(none.produced_bytes_per_event)
    # One marks record per commit, and the claim's.
    assert none.produced_records["marks"] == 301
    assert none.produced_bytes_per_event == zstd.produced_bytes_per_event
    assert none.stored_bytes_per_event is not None and zstd.stored_bytes_per_event is not None
    assert none.stored_bytes_per_event >= none.produced_bytes_per_event["all"]  # framing
    assert zstd.stored_bytes_per_event < none.stored_bytes_per_event / 2
    assert len(zstd.restore_s) == 1
