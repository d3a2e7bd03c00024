"""Candidate generation: the few hundred items worth scoring for a session, in numpy alone.

Three sources, merged in order of trust and deduplicated, minus the items the
session has already seen:

1. co-visitation neighbours of the session's newest items (items that others
   interacted with right before or after them), recency-weighted;
2. nearest neighbours of the session's representation (the normalised,
   recency-weighted mean of its item embeddings) among all item embeddings;
3. the most popular items, to fill up.

Co-visitation keeps, per item, its ``width`` strongest neighbours in a
Space-Saving table: an update either bumps a known neighbour or replaces the
weakest one, so memory stays bounded and ``observe`` is O(width) numpy work.
Popularity is one counter per item.  Both are updated online as events arrive.

>>> seqs = [np.array([1, 2, 3]), np.array([1, 2, 4])]
>>> index = CandidateIndex.build(seqs, n_items=6, item_vectors=np.eye(6, 3), width=4)
>>> index.candidates([np.array([1])], 3)[0].tolist()  # 2 follows 1 twice; 1 itself is seen
[2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD = 0


def covisit_pairs(
    sequences: Sequence[np.ndarray], n_items: int, window: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric co-visitation weights as CSR arrays (indptr, neighbour, weight).

    Items ``j`` steps apart (j ≤ ``window``) in a sequence add ``1/j`` to their pair.
    """
    rows, cols, weights = [], [], []
    for seq in sequences:
        for step in range(1, window + 1):
            if len(seq) <= step:
                break
            a, b = seq[:-step], seq[step:]
            keep = (a != PAD) & (b != PAD) & (a != b)
            a, b = a[keep], b[keep]
            step_weight = np.full(len(a), 1.0 / step)
            rows += [a, b]
            cols += [b, a]
            weights += [step_weight, step_weight]
    if not rows:
        return np.zeros(n_items + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    row, col, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    key = row.astype(np.int64) * n_items + col
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=w).astype(np.float32)
    uniq_row = uniq // n_items
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.add.at(indptr, uniq_row + 1, 1)
    return np.cumsum(indptr), (uniq % n_items).astype(np.int64), summed


class CandidateIndex:
    """Co-visitation neighbours, popularity and item vectors; answers ``candidates``."""

    def __init__(
        self,
        neighbours: np.ndarray,
        neighbour_weights: np.ndarray,
        popularity: np.ndarray,
        item_vectors: np.ndarray,
        recent: int = 5,
        covisit_share: float = 0.5,
        nn_share: float = 0.3,
    ) -> None:
        self.neighbours = neighbours  # [n_items, width] int64, PAD where empty
        self.neighbour_weights = neighbour_weights  # [n_items, width] float32
        self.popularity = popularity  # [n_items] float64 interaction counts
        self.item_vectors = item_vectors  # [n_items, d] float32, unit norm (row 0 zero)
        self.recent = recent
        self.covisit_share, self.nn_share = covisit_share, nn_share
        self.n_items = len(popularity)
        self._recency = 0.7 ** np.arange(recent, dtype=np.float32)
        self._vectors_t = np.ascontiguousarray(item_vectors.T)  # BLAS reads it row by row
        self._popular: np.ndarray | None = None
        self._popular_floor = 0.0

    @classmethod
    def build(
        cls,
        sequences: Sequence[np.ndarray],
        n_items: int,
        item_vectors: np.ndarray,
        width: int = 50,
        window: int = 3,
    ) -> CandidateIndex:
        """An index over ``sequences`` of item indices with ``n_items`` rows (padding included)."""
        indptr, col, weight = covisit_pairs(sequences, n_items, window)
        neighbours = np.zeros((n_items, width), dtype=np.int64)
        weights = np.zeros((n_items, width), dtype=np.float32)
        for item in range(n_items):
            lo, hi = indptr[item], indptr[item + 1]
            if hi == lo:
                continue
            top = np.argsort(-weight[lo:hi], kind="stable")[:width]
            neighbours[item, : len(top)] = col[lo:hi][top]
            weights[item, : len(top)] = weight[lo:hi][top]
        popularity = np.bincount(
            np.concatenate([*sequences, np.zeros(0, np.int64)]).astype(np.int64),
            minlength=n_items,
        ).astype(np.float64)
        popularity[PAD] = 0.0
        vectors = np.asarray(item_vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        return cls(neighbours, weights, popularity, vectors)

    def observe(self, prev_item: int, item: int) -> None:
        """Count one interaction with ``item``, right after ``prev_item`` (PAD if none)."""
        if item == PAD:
            return
        self.popularity[item] += 1.0
        if self._popular is not None and self.popularity[item] > self._popular_floor:
            self._popular = None  # the top list may have changed: rebuild on next use
        if prev_item != PAD and prev_item != item:
            self._bump(prev_item, item)
            self._bump(item, prev_item)

    def _bump(self, item: int, neighbour: int) -> None:
        row, weights = self.neighbours[item], self.neighbour_weights[item]
        hit = np.flatnonzero(row == neighbour)
        if len(hit):
            weights[hit[0]] += 1.0
            return
        weakest = int(np.argmin(weights))  # an empty slot has weight 0 and goes first
        # Space-Saving: the newcomer inherits the evicted count, bounding its error.
        row[weakest], weights[weakest] = neighbour, weights[weakest] + 1.0

    def popular(self, n: int) -> np.ndarray:
        """The ``n`` most popular items, most popular first."""
        if self._popular is None or len(self._popular) < n:
            n_top = min(max(n, 1000), self.n_items - 1)
            top = np.argpartition(-self.popularity, n_top)[:n_top]
            self._popular = top[np.argsort(-self.popularity[top], kind="stable")]
            self._popular_floor = float(self.popularity[self._popular[-1]])
        return self._popular[:n]

    def candidates(self, histories: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
        """Up to ``n`` unseen candidate item indices per history (item indices, oldest first)."""
        matrix, counts = self.candidate_matrix(histories, n)
        return [matrix[r, :c] for r, c in enumerate(counts)]

    def candidate_matrix(
        self, histories: Sequence[np.ndarray], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidates [B, n] (PAD-filled after each row's count) and the counts [B].

        The whole batch is handled with array operations on (row, item) keys: the
        per-session Python work is only laying out each session's newest items.
        """
        b, n_items = len(histories), self.n_items
        n = min(n, n_items - 1)
        out = np.zeros((b, n), dtype=np.int64)
        if b == 0 or n <= 0:
            return out, np.zeros(b, dtype=np.int64)
        quotas = (int(n * self.covisit_share), int(n * (self.covisit_share + self.nn_share)), n)
        recent = np.zeros((b, self.recent), dtype=np.int64)
        seen = [np.arange(b, dtype=np.int64) * n_items]  # padding is never a candidate
        for r, history in enumerate(histories):
            tail = history[-self.recent :][::-1]
            recent[r, : len(tail)] = tail
            seen.append(history + r * n_items)
        taken = np.sort(np.concatenate(seen))  # repeats are harmless to the membership test
        counts = np.zeros(b, dtype=np.int64)
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        longest = int(lengths.max())
        nearest_pool = quotas[1] - quotas[0]
        for keys, quota in (
            (self._covisit_keys(recent), quotas[0]),
            (
                _per_row_prefix(
                    self._nearest_keys(recent, nearest_pool + longest),
                    n_items,
                    nearest_pool + lengths,
                ),
                quotas[1],
            ),
            (_per_row_prefix(self._popular_keys(b, n + longest), n_items, n + lengths), quotas[2]),
        ):
            rows = keys // n_items
            fresh = ~_contains(taken, keys)
            # Rank of each fresh key within its row, keys being in priority order per row.
            rank = np.cumsum(fresh) - 1
            first = np.searchsorted(rows, np.arange(b))
            before = np.concatenate([[0], np.cumsum(fresh)])[first]
            rank = rank - before[rows]
            pick = fresh & (counts[rows] + rank < quota)
            rows, keys, rank = rows[pick], keys[pick], rank[pick]
            out[rows, counts[rows] + rank] = keys % n_items
            counts += np.bincount(rows, minlength=b)
            taken = np.sort(np.concatenate([taken, keys]))
        for short in np.flatnonzero(counts < n):  # a tiny catalogue: fill from everything unseen
            mine = taken[taken // n_items == short] % n_items
            extra = np.setdiff1d(np.arange(1, n_items), mine)[: n - counts[short]]
            out[short, counts[short] : counts[short] + len(extra)] = extra
            counts[short] += len(extra)
        return out, counts

    def _covisit_keys(self, recent: np.ndarray) -> np.ndarray:
        """Co-visitation neighbours as row-major keys, strongest first within each row."""
        b, n_items = len(recent), self.n_items
        weights = self.neighbour_weights[recent] * self._recency[None, :, None]
        weights *= (recent != PAD)[:, :, None]
        keys = (self.neighbours[recent] + np.arange(b)[:, None, None] * n_items).ravel()
        uniq, inverse = np.unique(keys, return_inverse=True)
        summed = np.bincount(inverse, weights=weights.ravel())
        keep = (summed > 0) & (uniq % n_items != PAD)
        uniq, summed = uniq[keep], summed[keep]
        return uniq[np.lexsort((-summed, uniq // n_items))]

    def _nearest_keys(self, recent: np.ndarray, n: int) -> np.ndarray:
        """Items nearest the sessions' recency-weighted mean vectors, nearest first per row."""
        b = len(recent)
        n = max(1, min(n, self.n_items - 1))
        weights = self._recency[None, :] * (recent != PAD)
        sessions = (weights[:, :, None] * self.item_vectors[recent]).sum(axis=1)
        sims = sessions @ self._vectors_t
        sims[:, PAD] = -np.inf
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        keys = top + np.arange(b)[:, None] * self.n_items
        return keys[(recent != PAD).any(axis=1)].ravel()  # an empty session has no vector

    def _popular_keys(self, b: int, n: int) -> np.ndarray:
        top = self.popular(n)
        return (top[None, :] + np.arange(b)[:, None] * self.n_items).ravel()

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            neighbours=self.neighbours.astype(np.int32),
            neighbour_weights=self.neighbour_weights,
            popularity=self.popularity,
            item_vectors=self.item_vectors.astype(np.float16),
        )

    @classmethod
    def load(cls, path: Path) -> CandidateIndex:
        with np.load(path) as f:
            return cls(
                f["neighbours"].astype(np.int64),
                f["neighbour_weights"].astype(np.float32),
                f["popularity"].astype(np.float64),
                f["item_vectors"].astype(np.float32),
            )


def _per_row_prefix(keys: np.ndarray, n_items: int, limits: np.ndarray) -> np.ndarray:
    """The first ``limits[row]`` keys of each row (keys grouped by row, in priority order).

    Pools are fetched once for the whole batch, sized for its longest session;
    cutting each row back to what its own session needs keeps a session's
    candidates independent of the sessions it happens to be batched with.
    """
    if len(keys) == 0:
        return keys
    rows = keys // n_items
    starts = np.searchsorted(rows, rows, side="left")
    position = np.arange(len(keys)) - starts
    return keys[position < limits[rows]]


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Membership of ``keys`` in the sorted array ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.asarray(sorted_keys[at] == keys)


def recall_at(candidates: Sequence[np.ndarray], targets: np.ndarray) -> float:
    """Share of ``targets`` found in their candidate set."""
    hits = [t in set(c.tolist()) for c, t in zip(candidates, targets, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")
