"""The memory soak's load and figures: many distinct users, hostile ids, a slope after warm-up."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streamrec.bench.memory import (
    HEAVY_USERS,
    HOT_USERS,
    Sample,
    SoakSource,
    summarize,
)
from streamrec.contracts import Event, parse_message
from streamrec.settings import Settings
from streamrec.tools.plots import plot_memory_over_time

BASE = [Event(f"e{n}", "u", str(n), "rating" if n % 2 else "view", 0, 4.0) for n in range(50)]
SEND_MS = 1_700_000_000_000


def test_every_soak_event_passes_the_event_contract_hostile_ones_included() -> None:
    source = SoakSource(BASE, users=100_000, hostile_share=0.5, count=2000)
    limit = Settings().max_event_bytes
    hostile = 0
    for i in range(len(source)):
        record = source.record(i, SEND_MS)
        event = parse_message(record.value, record.key, limit, SEND_MS)
        assert isinstance(event, Event) and event.ts == SEND_MS
        hostile += len(event.user_id) == 256
    assert 800 < hostile < 1200


def test_the_events_spread_over_the_users_with_the_hostile_share() -> None:
    source = SoakSource(BASE, users=1_000_000, hostile_share=0.05, count=100_000)
    numbers = [source.user_number(i) for i in range(len(source))]
    assert max(numbers) < 1_000_000
    heavy = sum(n < HEAVY_USERS for n in numbers) / len(numbers)
    assert heavy == pytest.approx(0.05, abs=0.01)
    assert len(set(numbers)) > 70_000  # three quarters of the events go to users of their own
    users = sorted(set(numbers))
    hostile = sum(source.padding_of(n) is not None for n in users) / len(users)
    assert hostile == pytest.approx(0.05, abs=0.01)
    kinds = {source.padding_of(n) for n in users}
    assert kinds == {None, "x", "\x01"}


def test_a_hostile_users_items_are_new_256_character_ids() -> None:
    source = SoakSource(BASE, users=10_000, hostile_share=1.0, count=100)
    items = [orjson.loads(source.record(i, SEND_MS).value or b"")["item_id"] for i in range(100)]
    assert len(set(items)) == 100 and {len(item) for item in items} == {256}


def test_a_soak_is_the_same_load_every_run() -> None:
    one, two = (SoakSource(BASE, 50_000, 0.1, 500) for _ in range(2))
    assert [one.record(i, SEND_MS) for i in range(500)] == [
        two.record(i, SEND_MS) for i in range(500)
    ]


def test_too_few_users_for_the_hot_and_heavy_ones_are_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        SoakSource(BASE, users=HOT_USERS, hostile_share=0.0, count=1)


def test_a_flat_curve_has_no_slope_and_its_warm_up_is_where_it_levels() -> None:
    climb = [Sample(t, min(400.0 + t, 700.0), 0.0) for t in range(0, 301, 5)]
    flat = [Sample(t, 700.0 + (3.0 if t % 10 else -3.0), 0.0) for t in range(305, 1801, 5)]
    summary = summarize(climb + flat, warmup_s=600)
    assert summary.warmup_rss_mb in (697.0, 703.0) and summary.peak_rss_mb == 703.0
    assert abs(summary.slope_mb_per_10min) < 0.1


def test_a_run_shorter_than_its_warm_up_reports_its_last_sample() -> None:
    summary = summarize([Sample(0, 100.0, 0.0), Sample(5, 120.0, 0.0)], warmup_s=60)
    assert (summary.warmup_rss_mb, summary.final_rss_mb, summary.slope_mb_per_10min) == (
        120.0,
        120.0,
        0.0,
    )


def test_the_curve_is_drawn(tmp_path: Path) -> None:
    samples = [{"t_s": float(t), "rss_mb": 500.0, "cpu_s": 0.0} for t in range(0, 120, 5)]
    summary = {"warmup_s": 40.0, "slope_mb_per_10min": 0.0}
    path = plot_memory_over_time(samples, tmp_path / "memory.png", summary, "a test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
