"""The two baselines every model must beat: most-popular and item-to-item co-visitation.

Both score the whole catalogue for a batch of sessions, like the models, so all
rows of the card go through the same full-ranking evaluation.

>>> train = [np.array([1, 2, 3]), np.array([1, 2])]
>>> Popular(train, n_items=5).score_all([np.array([3])]).tolist()
[[0.0, 2.0, 2.0, 1.0, 0.0]]
>>> int(Covisit(train, n_items=5).score_all([np.array([1])]).argmax())  # 2 follows 1
2
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamrec.model.candidates import PAD, RECENCY, covisit_pairs


class Popular:
    """Scores every item by its number of training interactions."""

    name = "popular"

    def __init__(self, train: Sequence[np.ndarray], n_items: int) -> None:
        counts = np.bincount(np.concatenate([*train, np.zeros(0, np.int64)]), minlength=n_items)
        self.counts = counts.astype(np.float32)
        self.counts[PAD] = 0.0

    def score_all(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        return self.counts[candidates]


class Covisit:
    """Sums the co-visitation weights of the session's newest items, newest weighing most.

    Items never co-visited are ordered by popularity, a tiny tie-break that keeps the
    baseline from being punished by pessimistic ties for what it does not know.
    """

    name = "covisit"

    def __init__(
        self, train: Sequence[np.ndarray], n_items: int, window: int = 3, recent: int = 5
    ) -> None:
        self.indptr, self.neighbour, self.weight = covisit_pairs(train, n_items, window)
        popularity = Popular(train, n_items).counts
        self.prior = 1e-6 * popularity / max(float(popularity.max()), 1.0)
        self.recency = RECENCY ** np.arange(recent)
        self.recent = recent

    def score_all(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = np.broadcast_to(self.prior, (len(histories), len(self.prior))).copy()
        for row, history in enumerate(histories):
            for weight, item in zip(self.recency, history[-self.recent :][::-1], strict=False):
                lo, hi = self.indptr[item], self.indptr[item + 1]
                scores[row, self.neighbour[lo:hi]] += weight * self.weight[lo:hi]
        return scores

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        return np.take_along_axis(self.score_all(histories), candidates, axis=1)
