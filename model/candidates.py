"""Candidate generation: the few hundred items worth scoring for a session, in numpy alone.

Three sources, merged in order of trust and deduplicated, minus the items the
session has already seen:

1. co-visitation neighbours of the session's newest items (items that others
   interacted with right before or after them), recency-weighted;
2. nearest neighbours of the session's representation (the recency-weighted
   sum of its newest item embeddings), searched among the precomputed nearest
   items of those newest items and ranked exactly;
3. the most popular items, to fill up.

Co-visitation keeps, per item, its ``width`` strongest neighbours in a
Space-Saving table: an update either bumps a known neighbour or replaces the
weakest one, so memory stays bounded and ``observe`` is O(width) numpy work.
Popularity is one counter per item.  Both are updated online as events arrive
and, with a ``half_life``, decay: every count halves over that many observed
events, so that a burst fades and a new item can overtake old favourites.
Decay is lazy: the arrays hold counts times a unit that grows with every
event, and a new event adds the current unit, so ``observe`` stays O(width);
reads divide by the unit, and the arrays are brought back to a unit of 1 once
it grows large.  The nearest-item table is fixed: item embeddings do not
change between trainings.

>>> seqs = [np.array([1, 2, 3]), np.array([1, 2, 4])]
>>> index = CandidateIndex.build(seqs, n_items=6, item_vectors=np.eye(6, 3), width=4)
>>> index.candidates([np.array([1])], 3)[0].tolist()  # 2 follows 1 twice; 1 itself is seen
[2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

PAD = 0
SIMILAR_WIDTH = 100  # nearest items kept per item: enough to match a full scan's recall@200
NEIGHBOUR_WIDTH = 50  # co-visitation neighbours kept per item
MAX_MOVES = 64  # popularity changes the top list follows one by one before it is re-sorted
RECENCY = 0.7  # the k-th newest item of a session weighs RECENCY**k in co-visitation sums
# The decay's unit is folded back into the counts past this (every 32 half-lives): float32
# weights keep their precision, and the scan of every count is rare.
RENORMALISE_AT = 2.0**32


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


def neighbour_table(
    sequences: Sequence[np.ndarray],
    n_items: int,
    width: int = NEIGHBOUR_WIDTH,
    window: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``width`` strongest co-visitation neighbours [n_items, width] (int64, PAD
    where empty) and their weights [n_items, width] (float32, 0 where empty), strongest first."""
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
    return neighbours, weights


def nearest_items(item_vectors: np.ndarray, width: int = SIMILAR_WIDTH) -> np.ndarray:
    """Per item, its ``width`` highest-dot-product other items (in no order) as [n_items, width].

    Padding (row and item 0) is nobody's neighbour and has none.  A full product,
    in blocks of rows to bound memory: run once per index, never per event.

    >>> nearest_items(np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1]], np.float32), 1).tolist()
    [[0], [2], [1], [2]]
    """
    n_items = len(item_vectors)
    width = max(0, min(width, n_items - 2))
    similar = np.zeros((n_items, width), dtype=np.int32)
    if width == 0:
        return similar
    vectors = np.asarray(item_vectors, dtype=np.float32)
    vectors_t = np.ascontiguousarray(vectors.T)
    block = 512
    for lo in range(1, n_items, block):
        sims = vectors[lo : lo + block] @ vectors_t
        sims[:, PAD] = -np.inf
        rows = np.arange(len(sims))
        sims[rows, rows + lo] = -np.inf  # an item is not its own neighbour
        similar[lo : lo + len(sims)] = np.argpartition(-sims, width - 1, axis=1)[:, :width]
    return similar


@dataclass(frozen=True, slots=True)
class Excluded:
    """Items never to propose to some rows of a batch: ``items[i]`` not to row ``rows[i]``."""

    rows: np.ndarray  # int64
    items: np.ndarray  # int64 item indices (never PAD)


@dataclass(frozen=True, slots=True)
class Reads:
    """What one session's candidates read of the counts that ``observe`` changes, at one moment.

    Taken right after a session's own event is observed and before any later one,
    the candidates of a micro-batch are those each event would get alone: batching
    is a speed device, never a change of answer.
    """

    neighbours: np.ndarray  # [r, width] int64: co-visitation rows of the r newest items
    weights: np.ndarray  # [r, width] float32
    popular: np.ndarray  # the most popular items, most popular first, as many as it may need


@dataclass(frozen=True, slots=True)
class CandidateBatch:
    """Candidates [B, n] (PAD after each row's count), the counts [B] and, when asked for,
    the candidates' co-visitation sums [B, n] (float32): a hybrid model's input."""

    items: np.ndarray
    counts: np.ndarray
    covisit: np.ndarray | None


class CandidateIndex:
    """Co-visitation neighbours, popularity, item vectors, nearest items; answers ``candidates``."""

    def __init__(
        self,
        neighbours: np.ndarray,
        neighbour_weights: np.ndarray,
        popularity: np.ndarray,
        item_vectors: np.ndarray,
        recent: int = 5,
        covisit_share: float = 0.5,
        nn_share: float = 0.3,
        similar: np.ndarray | None = None,
        half_life: int = 0,
    ) -> None:
        self.neighbours = neighbours  # [n_items, width] int64, PAD where empty (all of row PAD)
        # [n_items, width] float32, 0 where empty, and [n_items] float64 interaction counts:
        # both in units of ``unit`` (1 without decay).
        self.neighbour_weights = neighbour_weights
        self.popularity = popularity
        self.unit = 1.0
        self._growth = 2.0 ** (1.0 / half_life) if half_life > 0 else 1.0
        vectors = np.array(item_vectors, dtype=np.float32)
        vectors[PAD] = 0.0  # padding in a short session adds nothing to its representation
        self.item_vectors = vectors  # [n_items, d] float32, unit norm (row 0 zero)
        # [n_items, SIMILAR_WIDTH] int32: computed here when the saved index predates it.
        self.similar = nearest_items(vectors) if similar is None else similar
        self.recent = recent
        self.covisit_share, self.nn_share = covisit_share, nn_share
        self.n_items = len(popularity)
        self._recency = RECENCY ** np.arange(recent, dtype=np.float32)
        # The top list, its negated counts (ascending) and each item's place in it (-1: not).
        self._popular: np.ndarray | None = None
        self._popular_neg = np.zeros(0)
        self._popular_at = np.zeros(0, dtype=np.int64)
        self._moved: list[int] = []  # items counted since the top list was last brought up to date

    @classmethod
    def build(
        cls,
        sequences: Sequence[np.ndarray],
        n_items: int,
        item_vectors: np.ndarray,
        width: int = NEIGHBOUR_WIDTH,
        window: int = 3,
    ) -> CandidateIndex:
        """An index over ``sequences`` of item indices with ``n_items`` rows (padding included)."""
        neighbours, weights = neighbour_table(sequences, n_items, width, window)
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
        """Count one interaction with ``item``, right after ``prev_item`` (PAD if none).

        Every call ages the counts by one event (with a half-life), a PAD item's too.
        """
        if self._growth != 1.0:
            self.unit *= self._growth
            if self.unit > RENORMALISE_AT:
                self._renormalise()
        if item == PAD:
            return
        unit = self.unit
        self.popularity[item] += unit
        if self._popular is not None:
            # The top list catches up when next used: moves (a memmove of the list each) are
            # much cheaper than a re-sort, up to a micro-batch of many events.
            if len(self._moved) < MAX_MOVES:
                self._moved.append(item)
            else:
                self._popular, self._moved = None, []
        if prev_item != PAD and prev_item != item:
            self._bump(prev_item, item, unit)
            self._bump(item, prev_item, unit)

    def _bump(self, item: int, neighbour: int, unit: float) -> None:
        row, weights = self.neighbours[item], self.neighbour_weights[item]
        hit = np.flatnonzero(row == neighbour)
        if len(hit):
            weights[hit[0]] += unit
            return
        weakest = int(np.argmin(weights))  # an empty slot has weight 0 and goes first
        # Space-Saving: the newcomer inherits the evicted count, bounding its error.
        row[weakest], weights[weakest] = neighbour, weights[weakest] + unit

    def _renormalise(self) -> None:
        """Fold the unit into the counts (their order is unchanged): the unit is 1 again."""
        scale = 1.0 / self.unit
        self.popularity *= scale
        self.neighbour_weights *= np.float32(scale)
        self.unit = 1.0
        self._popular, self._moved = None, []  # its cached counts are in the old unit

    def counts(self, items: np.ndarray) -> np.ndarray:
        """The (decayed) interaction counts of ``items``."""
        return self.popularity[items] / self.unit

    def popular(self, n: int) -> np.ndarray:
        """The ``n`` most popular items, most popular first."""
        return self._top(n).copy()  # a copy: the list changes in place as items move

    def _top(self, n: int) -> np.ndarray:
        """A view of the ``n`` most popular items, valid until the next ``observe``."""
        for item in self._moved:
            self._move_up(item)
        self._moved.clear()
        if self._popular is None or len(self._popular) < n:
            # Room to grow: a longer list is asked for as sessions consume more.
            n_top = min(max(2 * n, 1000), self.n_items - 1)
            top = np.argpartition(-self.popularity, n_top)[:n_top]
            self._popular = top[np.argsort(-self.popularity[top], kind="stable")]
            self._popular_neg = -self.popularity[self._popular]
            self._popular_at = np.full(self.n_items, -1, dtype=np.int64)
            self._popular_at[self._popular] = np.arange(n_top)
        return self._popular[:n]

    def _move_up(self, item: int) -> None:
        """Put ``item``, whose count went up, back in order in the top list.

        It moves ahead of the items now less popular than it, which shift back by one;
        if it was not in the list, it enters when it beats the last item, which leaves.
        """
        top, neg, at = self._popular, self._popular_neg, self._popular_at
        assert top is not None
        count = self.popularity[item]
        was = int(at[item])
        if was < 0:
            if -count >= neg[-1]:
                return
            was = len(top) - 1
            at[top[was]] = -1
        # The first item less popular, unless the item is already in place (counted twice).
        to = min(int(np.searchsorted(neg, -count, side="right")), was)
        top[to + 1 : was + 1] = top[to:was]
        neg[to + 1 : was + 1] = neg[to:was]
        at[top[to + 1 : was + 1]] += 1
        top[to], neg[to], at[item] = item, -count, to

    def reads(
        self, history: np.ndarray, n: int, excluded: int = 0, covisit_recent: int = 0
    ) -> Reads:
        """A copy of what ``candidate_batch`` reads of the online counts for ``history``.

        ``history``: the session's known items, oldest first; ``excluded``: how many
        items it must not be proposed.  Cheap (a few small copies): taken per event.
        """
        r = max(self.recent, covisit_recent)
        newest = np.zeros(r, dtype=np.int64)
        tail = history[::-1][:r]
        newest[: len(tail)] = tail
        n = min(n, self.n_items - 1)
        longest = max(self.recent, len(history))
        pool = n + longest + min(excluded, n + longest)
        weights = self.neighbour_weights.take(newest, axis=0)
        if self.unit != 1.0:
            weights *= np.float32(1.0 / self.unit)  # a copy: read as counts, whatever comes
        return Reads(
            self.neighbours.take(newest, axis=0),
            weights,
            self.popular(min(4 * pool, self.n_items - 1)),
        )

    def candidates(self, histories: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
        """Up to ``n`` unseen candidate item indices per history (item indices, oldest first)."""
        matrix, counts = self.candidate_matrix(histories, n)
        return [matrix[r, :c] for r, c in enumerate(counts)]

    def candidate_matrix(
        self, histories: Sequence[np.ndarray], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidates [B, n] (PAD-filled after each row's count) and the counts [B]."""
        batch = self.candidate_batch(histories, n)
        return batch.items, batch.counts

    def candidate_batch(
        self,
        histories: Sequence[np.ndarray],
        n: int,
        excluded: Excluded | None = None,
        covisit_recent: int = 0,
        reads: Sequence[Reads] | None = None,
    ) -> CandidateBatch:
        """Up to ``n`` candidates per history, none seen or ``excluded`` (for that row).

        Items are handled as (row, item) keys, ``row * n_items + item``.  Each source
        is a [B, pool] matrix of keys in priority order per row, its pool fixed by the
        row's own newest items, so a session's candidates never depend on the sessions
        batched with it.  Keys taken so far (seen, excluded or picked) are one flat
        bitmap, so merging a source is a few whole-batch array operations and no Python
        per session.  With ``covisit_recent`` equal to the index's own ``recent``, the
        co-visitation sums of the candidates (a hybrid model's input) come with them,
        read from the sums the first source computes anyway.  ``reads``: per history,
        the online counts as they were when it was taken (``reads``), instead of now.
        """
        b, n_items = len(histories), self.n_items
        n = min(n, n_items - 1)
        if b == 0 or n <= 0:
            empty = np.zeros((b, max(n, 0)), dtype=np.int64)
            return CandidateBatch(empty, np.zeros(b, dtype=np.int64), None)
        longest = max(self.recent, *(len(h) for h in histories))
        padded = np.zeros((b, longest), dtype=np.int64)  # histories right-aligned after PAD
        for r, history in enumerate(histories):
            padded[r, longest - len(history) :] = history
        recent = newest_first(padded, self.recent)
        offsets = np.arange(0, b * n_items, n_items, dtype=np.int64)[:, None]
        dump = b * n_items
        free = np.ones(dump + 1, dtype=bool)  # the last key is a dump for unpicked ones
        free[dump] = False  # never picked: it also fills short rows of a source
        free[padded + offsets] = False
        free[offsets] = False  # padding is never a candidate
        most_excluded = 0
        if excluded is not None and len(excluded.rows):
            free[excluded.rows * n_items + excluded.items] = False
            most_excluded = int(np.bincount(excluded.rows).max())
        out = np.zeros(b * n + 1, dtype=np.int64)  # picked keys, row after row; the last: a dump
        before = np.arange(-1, b * n - 1, n, dtype=np.int64)[:, None]  # each row's slot - 1
        last = before  # each row's latest filled slot
        quotas = (int(n * self.covisit_share), int(n * (self.covisit_share + self.nn_share)), n)
        if reads is None:
            rows = self.neighbours.take(recent, axis=0)
            row_weights = self.neighbour_weights.take(recent, axis=0)
            scale = 1.0 / self.unit
        else:
            r = self.recent
            rows = np.stack([taken.neighbours[:r] for taken in reads])
            row_weights = np.stack([taken.weights[:r] for taken in reads])
            scale = 1.0  # read as counts already
        keys, sums = self._sums_of(rows, row_weights, offsets, scale)
        covisit_keys = _first_copies(_by_score(keys, sums[keys]))
        # n + len(history) popular items always fill a row (at most len(history) of them
        # are seen, the others are picked), so a pool sized for the longest history is
        # harmless; room for as many exclusions again, and a row they still leave short is
        # filled below.
        pool = n + longest + min(most_excluded, n + longest)
        if reads is None:
            popular = self._top(pool) + offsets  # the sum is a new array: no copy needed
        else:
            popular = np.full((b, pool), dump, dtype=np.int64)  # short rows: never fresh
            for row, taken in enumerate(reads):
                top = taken.popular[:pool]
                popular[row, : len(top)] = top + row * n_items
        sources = (covisit_keys, self._nearest(recent, offsets), popular)
        for keys, quota in zip(sources, quotas, strict=True):
            if keys.shape[1] == 0:
                continue
            fresh = free[keys]
            slot = np.cumsum(fresh, axis=1) + last  # where each fresh key would go
            end = before + quota
            pick = fresh & (slot <= end)
            out[np.where(pick, slot, b * n)] = keys
            free[np.where(pick, keys, b * n_items)] = False
            last = np.minimum(slot[:, -1:], end)
        keys = out[:-1].reshape(b, n)
        matrix = keys % n_items  # keys back to items; empty slots stay PAD
        counts = (last - before)[:, 0]
        if counts.min() < n:
            # Many exclusions: more popular items; a tiny catalogue: everything unseen.
            more = self._top(min(4 * pool, n_items - 1)) if reads is None else None
            for short in np.flatnonzero(counts < n):
                if reads is not None:
                    more = reads[int(short)].popular
                assert more is not None
                row_free = free[short * n_items : (short + 1) * n_items]
                extra = more[row_free[more]]
                if len(extra) < n - counts[short]:
                    extra = np.flatnonzero(row_free)
                extra = extra[: n - counts[short]]
                matrix[short, counts[short] : counts[short] + len(extra)] = extra
                keys[short, counts[short] : counts[short] + len(extra)] = extra + short * n_items
                counts[short] += len(extra)
        covisit = None
        if covisit_recent:
            if covisit_recent == self.recent:
                covisit = sums[keys].astype(np.float32)  # an empty slot reads row 0's PAD: 0
            elif reads is None:
                covisit = self.covisit_sums(padded, matrix, covisit_recent)
            else:
                rows = np.stack([taken.neighbours[:covisit_recent] for taken in reads])
                row_weights = np.stack([taken.weights[:covisit_recent] for taken in reads])
                _, other = self._sums_of(rows, row_weights, offsets)
                covisit = other[matrix + offsets].astype(np.float32)
        return CandidateBatch(matrix, counts, covisit)

    def _neighbour_sums(
        self, newest: np.ndarray, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The co-visitation neighbours of ``newest`` [B, r] (newest first, PAD-filled) as keys
        [B, r * width], and every key's sum [B * n_items + 1], the k-th newest item's weights
        counting ``RECENCY**k`` (the last key, the dump's, sums to 0)."""
        rows = self.neighbours.take(newest, axis=0)
        weights = self.neighbour_weights.take(newest, axis=0)
        return self._sums_of(rows, weights, offsets, 1.0 / self.unit)

    def _sums_of(
        self, rows: np.ndarray, weights: np.ndarray, offsets: np.ndarray, scale: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``_neighbour_sums`` of the table rows [B, r, width] of the newest items, and their
        weights, as read (now or earlier), times ``scale`` (to counts from the arrays' unit)."""
        b, r = rows.shape[:2]
        # Row PAD of the table is empty (weight 0): the padding of a short session adds nothing.
        keys = rows.reshape(b, -1) + offsets
        recency = (
            self._recency[:r] if r <= self.recent else RECENCY ** np.arange(r, dtype=np.float32)
        )
        if scale != 1.0:
            recency = recency * np.float32(scale)
        weighted = weights * recency[:, None]
        # Every copy of a key reads back the same sum.
        sums = np.bincount(keys.ravel(), weighted.ravel(), minlength=b * self.n_items + 1)
        return keys, sums

    def _nearest(self, recent: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Keys of the items nearest each session [B, recent * SIMILAR_WIDTH]; repeats → 0.

        The pool is the union of the newest items' precomputed nearest items, scored
        exactly against the session's vector.  einsum, not matmul: a BLAS call wakes
        OpenBLAS's thread pool, which stalls for milliseconds on shared cores.
        """
        b = len(recent)
        newest = self.item_vectors.take(recent, axis=0)  # row PAD is zero: padding adds nothing
        sessions = (newest * self._recency[:, None]).sum(axis=1)
        items = self.similar.take(recent, axis=0).reshape(b, -1)
        keys = items + offsets
        # Copies of an item scored apart might round apart: all read back one score.
        scores = np.empty(b * self.n_items, dtype=np.float32)
        vectors = self.item_vectors.take(items, axis=0)  # take(): faster than [] for rows
        scores[keys] = np.einsum("bpd,bd->bp", vectors, sessions)
        return _first_copies(_by_score(keys, scores[keys]))

    def covisit_sums(self, items: np.ndarray, candidates: np.ndarray, recent: int) -> np.ndarray:
        """Co-visitation sums [B, C] of ``candidates`` [B, C] after ``items`` [B, L] (left-padded).

        A candidate's sum adds its neighbour weight from each of the ``recent`` newest
        items, the k-th newest weighted ``RECENCY**k``: the input a hybrid model needs.
        """
        offsets = np.arange(0, len(items) * self.n_items, self.n_items, dtype=np.int64)[:, None]
        _, sums = self._neighbour_sums(newest_first(items, recent), offsets)
        return sums[candidates + offsets].astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            neighbours=self.neighbours.astype(np.int32),
            neighbour_weights=self.neighbour_weights / np.float32(self.unit),
            popularity=self.popularity / self.unit,
            item_vectors=self.item_vectors.astype(np.float16),
            similar=self.similar.astype(np.int32),
        )

    @classmethod
    def load(cls, source: Path | BinaryIO, half_life: int = 0) -> CandidateIndex:
        """The index ``save`` wrote, from its file or its bytes (``io.BytesIO``); its online
        counts decay with ``half_life`` (events)."""
        with np.load(source) as f:
            return cls(
                f["neighbours"].astype(np.int64),
                f["neighbour_weights"].astype(np.float32),
                f["popularity"].astype(np.float64),
                f["item_vectors"].astype(np.float32),
                similar=f.get("similar"),  # absent before the table was saved
                half_life=half_life,
            )


def newest_first(items: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` newest of left-padded ``items`` [B, L] as [B, count], newest first,
    PAD-filled where a row has fewer.

    >>> newest_first(np.array([[0, 7, 8, 9]]), 5).tolist()
    [[9, 8, 7, 0, 0]]
    """
    newest = np.zeros((len(items), count), dtype=np.int64)
    tail = items[:, ::-1][:, :count]
    newest[:, : tail.shape[1]] = tail
    return newest


def _by_score(keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row of ``keys`` [B, m] (below 2**32) by descending score (as float32), then by key.

    One sort of int64 values (the score's order in the high half, the key in the low
    half) instead of a two-key ``lexsort``, which is many times slower per row.

    >>> _by_score(np.array([[3, 1, 2, 4]]), np.array([[0.5, -1.0, 0.5, 2.0]])).tolist()
    [[4, 2, 3, 1]]
    """
    bits = scores.astype(np.float32).view(np.int32)
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)  # rises with the score
    packed = (-order << 32) | keys
    packed.sort(axis=1)
    return packed & 0xFFFFFFFF


def _first_copies(keys: np.ndarray) -> np.ndarray:
    """``keys`` [B, m] with every copy after the first replaced by key 0 (row 0's padding,
    never free); copies must sit side by side in each row."""
    keys[:, 1:][keys[:, 1:] == keys[:, :-1]] = PAD
    return keys


def recall_at(candidates: Sequence[np.ndarray], targets: np.ndarray) -> float:
    """Share of ``targets`` found in their candidate set."""
    hits = [t in set(c.tolist()) for c, t in zip(candidates, targets, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")
