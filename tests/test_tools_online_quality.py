"""`streamrec.tools.online_quality`: the held-out replay, the in-process baselines, intervals."""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest

import streamrec.tools.online_quality
from streamrec.contracts import Event, Recommendation, ScoredItem
from streamrec.datasets import load_events
from streamrec.model.candidates import CandidateIndex
from streamrec.model.data import Vocab, split_events
from streamrec.model.serving import VOCAB_FILE, read_card
from streamrec.settings import Settings
from streamrec.tools.demo import report_quality
from streamrec.tools.latency import LatencyMatcher
from streamrec.tools.online_quality import (
    COVISIT,
    POPULAR,
    StreamProtocol,
    baseline_hit_rates,
    held_out,
    interval_of,
    stream_cutoff,
    user_bootstrap,
)

ITEMS = list("abcd")  # item indices 1..4


def tiny_index() -> CandidateIndex:
    """Trained on a b c / b c / c: popularity c 3, b 2, a 1, d 0; a's neighbours b (1), c (0.5)."""
    sequences = [np.array([1, 2, 3]), np.array([2, 3]), np.array([3])]
    return CandidateIndex.build(sequences, n_items=5, item_vectors=np.eye(5, 2))


def stream(*pairs: str) -> list[Event]:
    """Events from "user:item" pairs, in order, one second apart."""
    return [
        Event(f"e{t}", pair.split(":")[0], pair.split(":")[1], "rating", 1000 * t)
        for t, pair in enumerate(pairs)
    ]


def protocol(cutoff_ts: int | None, fraction: float = 0.1) -> StreamProtocol:
    return StreamProtocol(fraction, cutoff_ts, "student", 0.1, (0.05, 0.15))


def timeline(n: int) -> list[Event]:
    """n events of two users, two per timestamp (a tie at every time)."""
    return [Event(f"e{i}", f"u{i % 2}", f"i{i}", "rating", 1000 * (i // 2)) for i in range(n)]


def test_module_examples_run() -> None:
    result = doctest.testmod(streamrec.tools.online_quality, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_only_events_at_or_after_the_cards_cutoff_are_replayed() -> None:
    events = timeline(20)  # times 0, 0, 1000, 1000, ..., 9000, 9000
    window = held_out(events, protocol(cutoff_ts=7000), count=100)
    replayed = events[window.start : window.start + window.count]
    assert window.start == 14
    assert [e.ts for e in replayed] == [7000, 7000, 8000, 8000, 9000, 9000]
    assert all(e.ts < 7000 for e in events[: window.start])


def test_count_takes_the_first_held_out_events() -> None:
    window = held_out(timeline(20), protocol(cutoff_ts=7000), count=4)
    assert (window.start, window.count, window.available, window.short) == (14, 4, 6, False)


def test_fewer_held_out_events_than_asked_replays_all_there_are() -> None:
    window = held_out(timeline(20), protocol(cutoff_ts=7000), count=10)
    assert (window.count, window.available, window.asked, window.short) == (6, 6, 10, True)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_a_card_without_a_cutoff_gets_the_one_training_draws(fraction: float) -> None:
    events = timeline(41)
    window = held_out(events, protocol(cutoff_ts=None, fraction=fraction), count=1000)
    assert window.cutoff_ts == split_events(events, fraction).cutoff_ts
    assert events[window.start].ts == window.cutoff_ts
    assert events[window.start - 1].ts < window.cutoff_ts


def test_the_committed_cards_cutoff_is_the_one_its_data_gives() -> None:
    settings = Settings()
    card = StreamProtocol.from_card(read_card(settings.model_dir))
    events = load_events(settings.data_dir)
    assert card.cutoff_ts == stream_cutoff(events, card.fraction)
    window = held_out(events, card, count=5000)
    assert events[window.start].ts >= card.cutoff_ts > events[window.start - 1].ts
    assert window.available == len(events) - window.start


def test_the_protocol_is_read_from_the_card_as_the_pipeline_writes_it() -> None:
    card: dict[str, Any] = {
        "chosen": "student",
        "dataset": {"cutoff_ts": 123},
        "protocols": {"stream": {"fraction": 0.2}},
        "variants": [
            {"name": "teacher", "stream_hr@10": 0.5},
            {"name": "student", "stream_hr@10": 0.25, "stream_hr@10_ci": [0.2, 0.3]},
        ],
    }
    assert StreamProtocol.from_card(card) == StreamProtocol(0.2, 123, "student", 0.25, (0.2, 0.3))


def test_a_card_without_a_streaming_protocol_is_refused() -> None:
    with pytest.raises(streamrec.tools.online_quality.CardError, match="streaming protocol"):
        StreamProtocol.from_card({"chosen": "student"})


def hits(rates: dict[str, Any], name: str, user: str = "u1") -> tuple[int, int]:
    return rates[name].hits_by_user[user], rates[name].judged_by_user[user]


def test_baselines_on_a_tiny_stream_give_the_known_answer() -> None:
    # After a: popular says c (3), co-visitation b (a's strongest neighbour); after b, both say c.
    rates = baseline_hit_rates(stream("u1:a", "u1:b", "u1:c"), tiny_index(), Vocab(ITEMS), k=1)
    assert (rates[POPULAR].hits, rates[POPULAR].judged) == (1, 2)
    assert (rates[COVISIT].hits, rates[COVISIT].judged) == (2, 2)


def test_popularity_counts_the_replayed_events_before_each_one() -> None:
    # Four ratings of d make it more popular (4) than c (3) by the time u1 is answered.
    events = stream("u2:d", "u3:d", "u4:d", "u5:d", "u1:a", "u1:d")
    online = baseline_hit_rates(events, tiny_index(), Vocab(ITEMS), k=1)
    offline = baseline_hit_rates(events, tiny_index(), Vocab(ITEMS), k=1, online=False)
    assert hits(online, POPULAR) == (1, 1)
    assert hits(offline, POPULAR) == (0, 1)


def test_co_visitation_learns_the_replayed_pairs() -> None:
    # Twice a then c: a's neighbour c grows from 0.5 to 2.5, past b (1), before u1 rates a.
    events = stream("u2:a", "u2:c", "u3:a", "u3:c", "u1:a", "u1:c")
    online = baseline_hit_rates(events, tiny_index(), Vocab(ITEMS), k=1)
    offline = baseline_hit_rates(events, tiny_index(), Vocab(ITEMS), k=1, online=False)
    assert hits(online, COVISIT) == (1, 1)
    assert hits(offline, COVISIT) == (0, 1)


def test_warmup_events_build_sessions_but_are_not_judged() -> None:
    # u1 rated c in the warm-up: seen, so neither baseline proposes c after a.
    rates = baseline_hit_rates(
        stream("u1:a", "u1:c"), tiny_index(), Vocab(ITEMS), k=1, warmup=stream("u1:c")
    )
    assert hits(rates, POPULAR) == (0, 1)
    assert hits(rates, COVISIT) == (0, 1)


def test_co_visitation_never_proposes_an_item_of_the_session() -> None:
    # After b then a, b is a's strongest neighbour but seen: c and then popular d are proposed.
    rates = baseline_hit_rates(stream("u1:b", "u1:a", "u1:b"), tiny_index(), Vocab(ITEMS), k=2)
    assert hits(rates, COVISIT) == (1, 2)  # after b: c, a (a hit); after a: c, d (b missed)


def test_a_session_of_unknown_items_gets_popular_items_from_co_visitation() -> None:
    rates = baseline_hit_rates(stream("u1:zz", "u1:c"), tiny_index(), Vocab(ITEMS), k=1)
    assert hits(rates, COVISIT) == (1, 1)


def test_each_users_first_event_is_not_judged() -> None:
    events = stream("u1:a", "u2:b", "u1:b", "u2:c", "u3:a", "u1:c")
    rates = baseline_hit_rates(events, tiny_index(), Vocab(ITEMS), k=2)
    for stats in rates.values():
        assert stats.judged == len(events) - 3
        assert dict(stats.judged_by_user) == {"u1": 2, "u2": 1}


def per_user_outcomes(
    users: int, events_each: int, p: float, seed: int
) -> tuple[dict[str, int], dict[str, int]]:
    rng = np.random.default_rng(seed)
    rates = rng.beta(2, 2 * (1 - p) / p, size=users)  # users differ in how predictable they are
    hit_counts = rng.binomial(events_each, rates)
    names = [f"u{i}" for i in range(users)]
    return dict(zip(names, hit_counts.tolist(), strict=True)), dict.fromkeys(names, events_each)


def test_the_bootstrap_interval_contains_the_point_estimate() -> None:
    hits_by_user, judged_by_user = per_user_outcomes(50, 40, 0.1, seed=1)
    interval = user_bootstrap(hits_by_user, judged_by_user)
    assert interval.point == pytest.approx(sum(hits_by_user.values()) / (50 * 40))
    assert interval.low < interval.point < interval.high


def test_the_bootstrap_interval_narrows_with_more_users() -> None:
    few = user_bootstrap(*per_user_outcomes(20, 40, 0.1, seed=2))
    many = user_bootstrap(*per_user_outcomes(2000, 40, 0.1, seed=2))
    assert many.high - many.low < (few.high - few.low) / 4


def test_users_with_equal_hit_rates_give_no_spread() -> None:
    interval = user_bootstrap({"u1": 1, "u2": 2}, {"u1": 5, "u2": 10})
    assert (interval.low, interval.point, interval.high) == pytest.approx((0.2, 0.2, 0.2))


def test_the_bootstrap_is_seeded() -> None:
    outcomes = per_user_outcomes(30, 20, 0.2, seed=3)
    assert user_bootstrap(*outcomes) == user_bootstrap(*outcomes)
    assert user_bootstrap(*outcomes, seed=1) != user_bootstrap(*outcomes, seed=2)


def test_the_latency_matchers_hits_resample_by_user() -> None:
    matcher = LatencyMatcher()
    for user, hit in (("u1", True), ("u1", True), ("u2", False)):
        previous = f"{user}-{matcher.stats.events_seen}"
        matcher.on_event(previous, 1000.0, user_id=user, item_id="x")
        rec = Recommendation(previous, user, [ScoredItem("y", 1.0)], "m@1", 0, 1000.0, 1001.0)
        matcher.on_recommendation(rec, receipt_ms=1002.0)
        matcher.on_event(f"{previous}-next", 1000.0, user_id=user, item_id="y" if hit else "z")
    stats = matcher.stats.per_model["m@1"]
    assert (dict(stats.hits_by_user), dict(stats.judged_by_user)) == (
        {"u1": 2, "u2": 0},
        {"u1": 2, "u2": 1},
    )
    interval = interval_of([stats])
    assert (interval.hits, interval.judged, interval.users) == (2, 3, 2)


def test_the_demo_reports_the_model_beside_both_baselines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings()
    items = Vocab.load(settings.model_dir / VOCAB_FILE).items[:4]
    before = [Event("old", "u1", items[0], "rating", 1000)]
    after = [Event(f"e{i}", "u2", item, "rating", 5000 + i) for i, item in enumerate(items[1:])]
    events = before + after
    window = held_out(events, protocol(cutoff_ts=5000), count=10)
    matcher = LatencyMatcher()
    for event in after:
        matcher.on_event(event.event_id, 1000.0, user_id=event.user_id, item_id=event.item_id)
        answer = [ScoredItem(item, 1.0) for item in items]  # every next item: all hits
        matcher.on_recommendation(
            Recommendation(event.event_id, "u2", answer, "m@1", 0, 1000.0, 1001.0), 1002.0
        )
    quality = report_quality(settings, events, window, 0, matcher, protocol(5000))
    out = capsys.readouterr().out
    assert quality["hit_rate"]["served model"] == {
        "hits": 2,
        "judged": 2,
        "rate": 1.0,
        "ci95": [1.0, 1.0],
    }
    assert set(quality["hit_rate"]) == {"served model", POPULAR, COVISIT}
    assert all(quality["hit_rate"][name]["judged"] == 2 for name in (POPULAR, COVISIT))
    assert "3 events after the model's training cut-off" in out
    assert "cold sessions" in out and "(0 of the 1 had ratings there)" in out
