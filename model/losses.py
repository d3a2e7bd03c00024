"""Next-item losses over a catalogue: full softmax (in item chunks), or on sampled negatives.

Both take the hidden states of the positions that have a target, ``hidden`` [P, d],
the item table ``items`` [N, d] (row 0 is padding, never a prediction), the targets
[P], and the (row, item) pairs a position has already seen (kept out of the softmax:
serving never recommends them).  Each returns the data loss and, for distillation,
the log-probabilities of given items under the same normalisation.

* ``softmax``: exact cross-entropy over all N items.  The [P, N] logits are made
  one chunk of items at a time, each chunk recomputed in the backward pass, so
  memory stays at ``chunk_elements`` floats whatever the catalogue; time grows
  with P·N.
* ``sampled``: a softmax over the target and ``negatives`` items drawn uniformly,
  shared by the batch: time grows with P·negatives, not with the catalogue.
* ``gbce``: gSASRec's generalised binary cross-entropy (Petrov & Macdonald,
  RecSys 2023) against ``negatives`` items drawn uniformly, shared by the batch:
  time grows with P·negatives.  ``t`` calibrates the positive term so the scores
  stay close to a full softmax's ranking despite the sampling.

A hybrid model's logits are the dot products plus a ``ScoreBonus`` per (position,
item), its co-visitation input; every loss takes one as ``bonus``.

>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> h, w, y = torch.randn(5, 8), torch.randn(30, 8), torch.tensor([1, 2, 3, 4, 5])
>>> none = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
>>> exact = full_softmax(h, w, y, none, chunk_elements=1000).loss
>>> chunked = full_softmax(h, w, y, none, chunk_elements=20).loss
>>> bool(torch.allclose(exact, chunked))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from streamrec.model.data import PAD

Pairs = tuple[torch.Tensor, torch.Tensor]  # (row, item) index pairs


@dataclass(frozen=True, slots=True)
class LossOut:
    loss: torch.Tensor  # scalar
    log_probs: torch.Tensor | None  # [P, K] of the ``kd_items`` asked for, else None


@dataclass(frozen=True, slots=True)
class ScoreBonus:
    """What a hybrid model adds to the dot-product logits: ``gate[p] · log1p(sum(p, item))``.

    ``sums`` looks up the co-visitation sums of given items; the (row, col, value)
    triplets are every nonzero sum, each pair once, for a full softmax to add to its
    logits where they are (a few hundred per row: no dense [P, N] sums).
    """

    gate: torch.Tensor  # [P], learnt: how far each position trusts co-visitation
    sums: Callable[[torch.Tensor], torch.Tensor]  # items [P, K] → sums [P, K]
    rows: torch.Tensor  # [M] positions
    cols: torch.Tensor  # [M] items, each once per position
    values: torch.Tensor  # [M] sums, > 0

    def at(self, items: torch.Tensor) -> torch.Tensor:
        """The bonus [P, K] of ``items`` [P, K] (or [K], the same items for every position)."""
        if items.dim() == 1:
            items = items[None, :].expand(self.gate.shape[0], -1)
        return self.gate[:, None] * torch.log1p(self.sums(items))


def full_softmax(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    seen: Pairs,
    chunk_elements: int = 1 << 26,
    kd_items: torch.Tensor | None = None,
    kd_temperature: float = 1.0,
    bonus: ScoreBonus | None = None,
) -> LossOut:
    """Cross-entropy over every item; logits made ``chunk_elements`` at a time at most."""
    n = items.shape[0]
    chunk = max(1, chunk_elements // max(hidden.shape[0], 1))
    target_logit = (hidden * items[targets]).sum(-1)
    if bonus is not None:
        target_logit = target_logit + bonus.at(targets[:, None])[:, 0]
    lse = _logsumexp(hidden, items, seen, chunk, 1.0, bonus)
    loss = (lse - target_logit).mean()
    if kd_items is None:
        return LossOut(loss, None)
    lse_t = (
        lse
        if kd_temperature == 1.0
        else _logsumexp(hidden, items, seen, chunk, kd_temperature, bonus)
    )
    kd_logits = _logits_of(hidden, items, kd_items, bonus) / kd_temperature
    log_probs = kd_logits - lse_t[:, None]
    # A teacher item the student masks (seen, or padding) has probability 0, as a full
    # masked log-softmax would give.
    masked = _is_seen(kd_items, seen) | (kd_items == PAD) | (kd_items >= n)
    return LossOut(loss, log_probs.masked_fill(masked, -math.inf))


def gbce(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    negatives: int,
    t: float,
    generator: torch.Generator | None = None,
    kd_items: torch.Tensor | None = None,
    kd_temperature: float = 1.0,
    bonus: ScoreBonus | None = None,
) -> LossOut:
    """gBCE against ``negatives`` uniform negatives shared by the batch (a target drawn as a
    negative of its own position is left out of that position's sum)."""
    n = items.shape[0]
    k = min(negatives, n - 1)
    neg = torch.randint(1, n, (k,), generator=generator)
    pos_logit = _logits_of(hidden, items, targets[:, None], bonus)[:, 0]
    neg_logits = _shared_logits(hidden, items, neg, bonus)  # [P, k]
    alpha = k / (n - 1)
    beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
    is_target = neg[None, :] == targets[:, None]
    neg_term = F.softplus(neg_logits).masked_fill(is_target, 0.0).sum(-1)  # -log(1-σ(s))
    loss = ((-beta * F.logsigmoid(pos_logit) + neg_term) / (1 + k)).mean()
    if kd_items is None:
        return LossOut(loss, None)
    # Distillation as a sampled softmax over the teacher's items and the same negatives.
    kd_logits = _logits_of(hidden, items, kd_items, bonus)
    both = torch.cat([kd_logits, neg_logits.masked_fill(is_target, -math.inf)], dim=1)
    log_probs = F.log_softmax(both / kd_temperature, dim=-1)[:, : kd_items.shape[1]]
    return LossOut(loss, log_probs.masked_fill(kd_items == PAD, -math.inf))


def sampled_softmax(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    negatives: int,
    generator: torch.Generator | None = None,
    kd_items: torch.Tensor | None = None,
    kd_temperature: float = 1.0,
    bonus: ScoreBonus | None = None,
) -> LossOut:
    """Cross-entropy of the target against ``negatives`` uniform negatives shared by the batch
    (uniform draws need no log-Q correction; a negative equal to the target is left out)."""
    n = items.shape[0]
    neg = torch.randint(1, n, (min(negatives, n - 1),), generator=generator)
    pos_logit = _logits_of(hidden, items, targets[:, None], bonus)
    neg_logits = _shared_logits(hidden, items, neg, bonus).masked_fill(
        neg[None, :] == targets[:, None], -math.inf
    )
    loss = -F.log_softmax(torch.cat([pos_logit, neg_logits], dim=1), dim=-1)[:, 0].mean()
    if kd_items is None:
        return LossOut(loss, None)
    kd_logits = _logits_of(hidden, items, kd_items, bonus)
    both = torch.cat([kd_logits, neg_logits], dim=1)
    log_probs = F.log_softmax(both / kd_temperature, dim=-1)[:, : kd_items.shape[1]]
    return LossOut(loss, log_probs.masked_fill(kd_items == PAD, -math.inf))


def _logits_of(
    hidden: torch.Tensor, items: torch.Tensor, which: torch.Tensor, bonus: ScoreBonus | None
) -> torch.Tensor:
    """Logits [P, K] of each position's own items ``which`` [P, K]."""
    logits = (items[which] @ hidden.unsqueeze(-1)).squeeze(-1)
    return logits if bonus is None else logits + bonus.at(which)


def _shared_logits(
    hidden: torch.Tensor, items: torch.Tensor, which: torch.Tensor, bonus: ScoreBonus | None
) -> torch.Tensor:
    """Logits [P, K] of the items ``which`` [K] shared by every position."""
    logits = hidden @ items[which].T
    return logits if bonus is None else logits + bonus.at(which)


def _logsumexp(
    hidden: torch.Tensor,
    items: torch.Tensor,
    seen: Pairs,
    chunk: int,
    temperature: float,
    bonus: ScoreBonus | None = None,
) -> torch.Tensor:
    n = items.shape[0]
    empty = torch.zeros(0, dtype=torch.long)
    b_rows, b_cols, b_values, gate = (
        (empty, empty, torch.zeros(0), torch.zeros(0))
        if bonus is None
        else (bonus.rows, bonus.cols, bonus.values, bonus.gate)
    )
    if chunk >= n:
        return _chunk_lse(
            hidden,
            items,
            seen[0],
            seen[1],
            torch.tensor(0),
            temperature,
            (b_rows, b_cols, b_values, gate),
        )
    parts = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        inside = (seen[1] >= lo) & (seen[1] < hi)
        b_inside = (b_cols >= lo) & (b_cols < hi)
        # Recomputed in backward: only one chunk's logits are alive at a time.
        parts.append(
            checkpoint(
                _chunk_lse,
                hidden,
                items[lo:hi],
                seen[0][inside],
                seen[1][inside] - lo,
                torch.tensor(lo),
                temperature,
                (b_rows[b_inside], b_cols[b_inside] - lo, b_values[b_inside], gate),
                use_reentrant=False,
            )
        )
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


def _chunk_lse(
    hidden: torch.Tensor,
    items: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    offset: torch.Tensor,
    temperature: float,
    bonus: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Log-sum-exp over one chunk of items; ``bonus``: its (row, col, value) sums and gate."""
    logits = hidden @ items.T
    b_rows, b_cols, b_values, gate = bonus
    if gate.numel():
        bonus_values = gate[b_rows] * torch.log1p(b_values)
        logits = logits.index_put((b_rows, b_cols), bonus_values, accumulate=True)
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.index_put((rows, cols), torch.tensor(-math.inf))
    if int(offset) == 0:
        logits[:, PAD] = -math.inf
    return torch.logsumexp(logits, dim=-1)


def _is_seen(kd_items: torch.Tensor, seen: Pairs) -> torch.Tensor:
    """[P, K] whether each asked item is among its row's seen items."""
    rows, items = seen
    if rows.numel() == 0:
        return torch.zeros_like(kd_items, dtype=torch.bool)
    n = int(max(int(items.max()), int(kd_items.max()))) + 1
    seen_keys = torch.unique(rows * n + items)
    keys = torch.arange(kd_items.shape[0])[:, None] * n + kd_items
    found = torch.searchsorted(seen_keys, keys).clamp(max=seen_keys.numel() - 1)
    return seen_keys[found] == keys
