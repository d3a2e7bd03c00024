"""Full-ranking accuracy (NDCG@k, HR@k) and bootstrap confidence intervals.

Every item of the catalogue is ranked (no sampled negatives).  Items the user
has already interacted with are excluded, as serving excludes them.  Ties are
broken pessimistically: an item scored exactly like the target ranks ahead of
it, so a model that scores everything alike gets no credit.

>>> scores = np.array([[0.0, 0.9, 0.5, 0.5, 0.1]])  # item 0 is padding
>>> ranks = target_ranks(scores, [np.array([1])], np.array([2]))
>>> ranks.tolist()  # item 1 is seen and excluded; item 3 ties with the target and goes first
[1]
>>> round(float(ndcg_at(ranks, 10)[0]), 4), float(hit_at(ranks, 10)[0])
(0.6309, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD = 0
MISS = np.iinfo(np.int64).max // 2  # rank of a target that cannot be recommended


def target_ranks(
    scores: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray
) -> np.ndarray:
    """0-based pessimistic rank of each target among the unseen items; ``MISS`` if unreachable.

    ``scores`` [B, n_items] covers every item index (column 0 is padding).  A cold
    target (``PAD``) or one the user has already seen can never be recommended.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    scores[:, PAD] = -np.inf
    for row, history in enumerate(histories):
        scores[row, history] = -np.inf
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets]
    ahead = (scores >= target_scores[:, None]).sum(axis=1) - 1
    unreachable = (targets == PAD) | ~np.isfinite(target_scores)
    return np.where(unreachable, MISS, ahead).astype(np.int64)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-point NDCG@k of one relevant item at 0-based ``ranks``."""
    gains = np.zeros(len(ranks), dtype=np.float64)
    hit = ranks < k
    gains[hit] = 1.0 / np.log2(ranks[hit] + 2.0)
    return gains


def hit_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks < k).astype(np.float64)


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}

    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0


def bootstrap(
    values: np.ndarray, clusters: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> Interval:
    """Mean of ``values`` with a 95% percentile interval, resampling whole clusters (users).

    Points of one user are correlated (streaming has hundreds per user), so users,
    not points, are drawn with replacement.  The same ``seed`` draws the same users
    for every variant: the interval of a per-point difference ``a - b`` is then the
    paired bootstrap of the two variants.
    """
    values = np.asarray(values, dtype=np.float64)
    _, cluster_of = np.unique(clusters, return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1 if len(values) else 0
    if n_clusters == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    sums = np.bincount(cluster_of, weights=values, minlength=n_clusters)
    counts = np.bincount(cluster_of, minlength=n_clusters).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, n_clusters, size=(n_boot, n_clusters))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(float(values.mean()), float(lo), float(hi))
