"""The co-visitation input of a hybrid model, in torch: for training, validation and targets.

A hybrid SASRec (``SASRecConfig.covisit_recent`` > 0) adds to each item's score a
learnt gate times ``log1p`` of the item's co-visitation sum after the session's
newest items.  The sums come from the same table the candidate index serves
(``streamrec.model.candidates.neighbour_table``: each item's strongest neighbours), so the
model trains on the input serving gives it; ``CandidateIndex.covisit_sums``
computes the same sums in numpy at serving time.

Why a hybrid: on a small dataset co-visitation gathers pair statistics in one
pass that a transformer takes many epochs to learn, and still beat it; given the
sums as an input, the transformer learns what co-visitation misses instead.

>>> import torch
>>> table = CovisitTable.build([np.array([1, 2, 3]), np.array([1, 2])], n_items=5, recent=2)
>>> table.sums(torch.tensor([[1, 0]]), torch.tensor([[2, 3]])).tolist()  # 2 follows 1 twice
[[2.0, 0.5]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from streamrec.model.candidates import NEIGHBOUR_WIDTH, PAD, RECENCY, neighbour_table
from streamrec.model.losses import ScoreBonus
from streamrec.model.sasrec import SASRec


class CovisitTable:
    """Each item's strongest co-visitation neighbours, sorted by item for lookups in torch."""

    def __init__(self, neighbours: np.ndarray, weights: np.ndarray, recent: int) -> None:
        order = np.argsort(neighbours, axis=1, kind="stable")
        self.neighbours = torch.from_numpy(np.take_along_axis(neighbours, order, axis=1)).long()
        self.weights = torch.from_numpy(np.take_along_axis(weights, order, axis=1)).float()
        self.recent = recent
        self.recency = torch.tensor(RECENCY ** np.arange(recent), dtype=torch.float32)
        self.n_items = len(neighbours)

    @classmethod
    def build(
        cls,
        sequences: Sequence[np.ndarray],
        n_items: int,
        recent: int,
        width: int = NEIGHBOUR_WIDTH,
    ) -> CovisitTable:
        return cls(*neighbour_table(sequences, n_items, width), recent=recent)

    def prefixes(self, inputs: torch.Tensor) -> torch.Tensor:
        """Newest items [B, L, recent] of every prefix of ``inputs`` [B, L], newest first."""
        padded = F.pad(inputs, (self.recent - 1, 0), value=PAD)
        return padded.unfold(1, self.recent, 1).flip(-1)

    def newest(self, seq: torch.Tensor) -> torch.Tensor:
        """Newest items [B, recent] of each (left-padded) session ``seq`` [B, L]."""
        return self.prefixes(seq[:, -self.recent :])[:, -1]

    def sums(self, recent: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Co-visitation sums [P, K] of ``items`` [P, K] after ``recent`` [P, R] items."""
        p, r = recent.shape
        k = items.shape[1]
        rows = self.neighbours[recent].reshape(p * r, -1)  # sorted within each row
        weights = self.weights[recent] * self.recency[:r, None]
        queries = items[:, None, :].expand(p, r, k).reshape(p * r, k).contiguous()
        at = torch.searchsorted(rows, queries).clamp(max=rows.shape[1] - 1)
        hit = rows.gather(1, at) == queries
        found = weights.reshape(p * r, -1).gather(1, at) * hit
        return found.view(p, r, k).sum(1)

    def pairs(self, recent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every nonzero sum after ``recent`` [P, R] as (row, item, sum), each pair once."""
        p, r = recent.shape
        weights = (self.weights[recent] * self.recency[:r, None]).reshape(p, -1)
        row, slot = (weights > 0).nonzero(as_tuple=True)
        keys = row * self.n_items + self.neighbours[recent].reshape(p, -1)[row, slot]
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(unique)).index_add_(0, inverse, weights[row, slot])
        return unique // self.n_items, unique % self.n_items, sums

    def dense(self, recent: torch.Tensor) -> torch.Tensor:
        """Sums [P, n_items] of every item after ``recent`` [P, R]."""
        rows, cols, values = self.pairs(recent)
        return torch.zeros(recent.shape[0], self.n_items).index_put_((rows, cols), values)


def table_of(model: SASRec) -> CovisitTable:
    table = model.covisit_table
    if not isinstance(table, CovisitTable):
        raise ValueError(
            "a hybrid SASRec needs its co-visitation table: set model.covisit_table = "
            "CovisitTable.build(train, n_items, model.cfg.covisit_recent) before training"
        )
    return table


def score_bonus(
    model: SASRec, inputs: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor
) -> ScoreBonus | None:
    """The co-visitation bonus of the ``positions`` [B, L] (a mask) of ``inputs`` [B, L],
    whose hidden states are ``hidden`` [P, d]; None for a plain model."""
    if not model.hybrid:
        return None
    table = table_of(model)
    recent = table.prefixes(inputs)[positions]
    rows, cols, values = table.pairs(recent)
    gate = model.covisit_weight(hidden)
    return ScoreBonus(gate, lambda items: table.sums(recent, items), rows, cols, values)


def dense_sums(model: SASRec, seq: torch.Tensor) -> torch.Tensor | None:
    """The co-visitation sums [B, n_items] a hybrid scores every item of ``seq`` [B, L] with."""
    if not model.hybrid:
        return None
    table = table_of(model)
    return table.dense(table.newest(seq))
