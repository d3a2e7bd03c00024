"""Full-ranking metrics and bootstrap intervals, on cases small enough to check by hand."""

import numpy as np
import pytest

from streamrec.model.metrics import MISS, bootstrap, hit_at, ndcg_at, target_ranks


def test_target_ranked_first_scores_full_ndcg() -> None:
    scores = np.array([[0.0, 0.1, 0.9, 0.2]])
    ranks = target_ranks(scores, [np.array([], dtype=np.int64)], np.array([2]))
    assert ranks.tolist() == [0]
    assert ndcg_at(ranks, 10).tolist() == [1.0]
    assert hit_at(ranks, 10).tolist() == [1.0]


def test_ties_are_broken_pessimistically() -> None:
    scores = np.array([[0.0, 0.5, 0.5, 0.5, 0.1]])  # items 1, 2, 3 tie
    ranks = target_ranks(scores, [np.array([], dtype=np.int64)], np.array([2]))
    assert ranks.tolist() == [2]  # both other tied items go ahead of the target
    assert ndcg_at(ranks, 10)[0] == pytest.approx(1 / np.log2(4))


def test_constant_scores_earn_nothing_at_k() -> None:
    scores = np.ones((1, 20))
    ranks = target_ranks(scores, [np.array([], dtype=np.int64)], np.array([1]))
    assert ranks.tolist() == [18]  # 19 real items, all tied: the target is last
    assert ndcg_at(ranks, 10).tolist() == [0.0]


def test_seen_items_are_excluded_from_the_ranking() -> None:
    scores = np.array([[0.0, 0.9, 0.8, 0.7]])
    ranks = target_ranks(scores, [np.array([1, 2])], np.array([3]))
    assert ranks.tolist() == [0]


def test_padding_column_never_competes() -> None:
    scores = np.array([[5.0, 0.1, 0.2]])  # column 0 is padding
    assert target_ranks(scores, [np.array([], dtype=np.int64)], np.array([2])).tolist() == [0]


def test_cold_or_already_seen_target_is_a_miss() -> None:
    scores = np.array([[0.0, 0.9, 0.8], [0.0, 0.9, 0.8]])
    ranks = target_ranks(scores, [np.array([], dtype=np.int64), np.array([1])], np.array([0, 1]))
    assert ranks.tolist() == [MISS, MISS]
    assert hit_at(ranks, 10).tolist() == [0.0, 0.0]


def test_ndcg_of_rank_k_is_zero_and_of_rank_k_minus_1_is_not() -> None:
    ranks = np.array([9, 10])
    assert ndcg_at(ranks, 10)[0] == pytest.approx(1 / np.log2(11))
    assert ndcg_at(ranks, 10)[1] == 0.0


def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(0).random(500)
    iv = bootstrap(values, np.arange(500), n_boot=500)
    assert iv.lo < iv.mean < iv.hi
    assert iv.mean == pytest.approx(values.mean())


def test_bootstrap_resamples_users_not_points() -> None:
    # Two users, each with many identical points: only two independent draws exist,
    # so the interval must span both users' values, not shrink with the point count.
    values = np.array([0.0] * 1000 + [1.0] * 1000)
    users = np.array([0] * 1000 + [1] * 1000)
    iv = bootstrap(values, users, n_boot=500)
    assert iv.lo == 0.0 and iv.hi == 1.0


def test_paired_difference_of_identical_variants_is_exactly_zero() -> None:
    a = np.random.default_rng(1).random(100)
    iv = bootstrap(a - a, np.arange(100), n_boot=200)
    assert (iv.lo, iv.mean, iv.hi) == (0.0, 0.0, 0.0)
    assert not iv.excludes_zero()
