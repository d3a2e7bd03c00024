"""`streamrec bench restore`: the mechanics against the real broker (its speed is not tested)."""

from __future__ import annotations

import pytest

from streamrec.bench.restore import fill_changelog, per_100k, time_restores
from streamrec.settings import Settings
from streamrec.state.changelog import changelog_records

pytestmark = pytest.mark.kafka


def test_it_fills_a_changelog_partition_and_times_each_rebuild_of_it(
    kafka_settings: Settings,
) -> None:
    written = fill_changelog(kafka_settings, 300, progress=False)
    keys = {key for key, _, _ in changelog_records(kafka_settings, 0)}
    assert len(keys) == 301 and written > 300 * 100  # the sessions and the marks
    times = time_restores(kafka_settings, repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_figures_are_per_hundred_thousand_sessions() -> None:
    assert per_100k(3.0, 300_000) == 1.0
