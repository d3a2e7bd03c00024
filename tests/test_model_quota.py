"""What one user may add to the online counts: repeats count once, events per half-life capped."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from streamrec.model.quota import UserQuota, is_repeat
from streamrec.model.serving import Recommender
from streamrec.settings import Settings

ARTIFACTS = Settings().model_dir
WINDOW = Settings().session_length


def test_a_user_counts_at_most_the_cap_per_half_life() -> None:
    quota = UserQuota(cap=10, half_life=1000)
    admitted = sum(quota.admit("flooder") for _ in range(900))
    assert admitted == 10


def test_a_capped_user_counts_again_once_its_events_have_halved_away() -> None:
    quota = UserQuota(cap=10, half_life=1000)
    for _ in range(100):
        quota.admit("flooder")  # counted up to twice the cap, then no more
    for n in range(2 * 1000):  # two half-lives of other users' events
        quota.admit(f"user{n}")
    assert quota.admit("flooder")


def test_ordinary_users_among_many_are_not_capped_by_the_others() -> None:
    # 200,000 users of three events each and one of 40 within a half-life: every event
    # counts. A cell holds a few recent events of others (~2 here, ~8 at a half-life's worth),
    # far below a cap: the sketch overestimates a user by that little.
    quota = UserQuota(cap=50, half_life=1_000_000)
    assert all(quota.admit(f"user-{n}") for _ in range(3) for n in range(200_000))
    assert all(quota.admit("a keen user") for _ in range(40))


def test_without_a_cap_every_event_counts() -> None:
    quota = UserQuota(cap=0, half_life=1000)
    assert all(quota.admit("flooder") for _ in range(10_000)) and quota.nbytes == 0


def test_an_item_still_in_the_window_is_a_repeat() -> None:
    assert is_repeat(["a", "b", "a"]) and is_repeat(["a", "a"])
    assert not is_repeat(["a"]) and not is_repeat(["a", "b", "c"]) and not is_repeat([])


def windows(items: list[str]) -> Iterator[list[str]]:
    """The window (the last ``WINDOW`` items) after each of one user's ``items``."""
    for n in range(len(items)):
        yield items[max(0, n + 1 - WINDOW) : n + 1]


def unpopular_item(rec: Recommender) -> str:
    popular = set(rec.index.popular(1000).tolist())
    code = next(c for c in range(rec.vocab.size - 1, 0, -1) if c not in popular)
    return rec.vocab.decode(code)


def cold_start(rec: Recommender) -> list[str]:
    [top] = rec.recommend([[]], k=10)
    return [item for item, _ in top]


def test_one_key_sending_one_item_100_000_times_stays_out_of_the_cold_start_list() -> None:
    learning = Recommender.load(ARTIFACTS, half_life=1_000_000, user_cap=500)
    counting = Recommender.load(ARTIFACTS)  # every event counted, as before the rules
    item = unpopular_item(learning)
    code = np.array([learning.vocab.encode(item)])
    before = learning.index.counts(code)[0]
    for window in windows([item] * 100_000):
        counting.observe(item, item)
        learning.learn(window, "attacker")
    assert item in cold_start(counting)  # the attack, unchecked
    assert item not in cold_start(learning)
    assert learning.index.counts(code)[0] <= before + 1  # its first event alone counted


def test_one_key_cycling_through_items_adds_at_most_its_cap() -> None:
    rec = Recommender.load(ARTIFACTS, user_cap=500)  # no decay: the counts' sum is exact
    item = unpopular_item(rec)
    fillers = [rec.vocab.decode(code) for code in range(1, WINDOW + 1)]
    # The item, then enough others that it has left the window when it comes back.
    stream = [item, *[f for f in fillers if f != item][:WINDOW]] * 2000
    everything = np.arange(rec.vocab.size)
    before = rec.index.counts(everything).sum()
    for window in windows(stream):
        rec.learn(window, "attacker")
    assert rec.index.counts(everything).sum() - before == 500
    assert item not in cold_start(rec)
