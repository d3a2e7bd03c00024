"""SASRec: a causal transformer over a user's item sequence that predicts the next item.

One definition serves the teacher (wide, deep, long context) and the student
(narrow, shallow, short context); only the config differs.  Scores are dot
products with the item embedding table (tied input/output embeddings), so the
model ranks the whole catalogue in training and only the candidates it is given
at serving time.

A hybrid (``covisit_recent`` > 0) takes one more input, the
co-visitation sums of the candidates after the session's newest items
(``streamrec.model.candidates``), and adds ``gate(h) · log1p(sum)`` to each score: the gate is
learnt from the hidden state, so the model decides per session how far to trust
co-visitation, and the transformer learns what co-visitation misses.

Sequences are left-padded with item 0 and positions are counted from the right
(the newest item always sits at position ``max_len - 1``), so a batch may be cut
to its longest session without changing any score.

>>> import torch
>>> model = SASRec(SASRecConfig(n_items=20, max_len=8, d_model=16, n_heads=2, d_ff=32))
>>> model.score(torch.tensor([[0, 0, 3, 4]]), torch.tensor([[5, 6, 7]])).shape
torch.Size([1, 3])
>>> hybrid = SASRec(SASRecConfig(n_items=20, max_len=8, d_model=16, covisit_recent=3)).eval()
>>> seq, cands = torch.tensor([[3, 4]]), torch.tensor([[5, 6]])
>>> plain = hybrid.score(seq, cands, torch.zeros(1, 2))
>>> bonus = hybrid.score(seq, cands, torch.tensor([[9.0, 0.0]])) - plain
>>> bool(bonus[0, 0] > 0), bool(bonus[0, 1] == 0)  # only the co-visited candidate moves up
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0
# Large but finite: a query whose keys are all padding gets a uniform (unused)
# average instead of NaNs that would spread through the batch.
MASKED = -1e9


@dataclass(frozen=True, slots=True)
class SASRecConfig:
    n_items: int  # vocabulary size including the padding index 0
    max_len: int = 50  # context: the newest items the model looks at
    d_model: int = 64  # width of the residual stream (and of the item embeddings)
    n_heads: int = 2
    head_dim: int = 32  # kept apart from d_model so pruning can drop heads or dimensions
    d_ff: int = 256
    n_blocks: int = 2
    dropout: float = 0.2
    # Input embeddings are scaled by sqrt(d_model); pruning dimensions keeps the original factor.
    emb_scale: float | None = None
    # Hybrid: co-visitation from this many newest items adds to the scores (0: none).
    covisit_recent: int = 0

    @property
    def embedding_scale(self) -> float:
        return self.emb_scale if self.emb_scale is not None else math.sqrt(self.d_model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        width = cfg.n_heads * cfg.head_dim
        self.q = nn.Linear(cfg.d_model, width)
        self.k = nn.Linear(cfg.d_model, width)
        self.v = nn.Linear(cfg.d_model, width)
        self.out = nn.Linear(width, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``queries`` [B, Lq, d] attend to ``keys`` [B, Lk, d]; ``mask`` is additive."""
        b, lq, _ = queries.shape
        lk = keys.shape[1]
        q = self.q(queries).view(b, lq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(keys).view(b, lk, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(keys).view(b, lk, self.n_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + mask
        att = self.dropout(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, lq, self.n_heads * self.head_dim)
        return self.dropout(self.out(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.dropout(F.gelu(self.up(x)))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (stabler than SASRec's post-LN at any depth)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``mask`` is additive: [B, 1, L, L], or [B, 1, 1, L] with ``last_only``."""
        h = self.ln_attn(x)
        if last_only:
            # Serving needs only the newest position's output: its query alone, all keys.
            x, queries = x[:, -1:], h[:, -1:]
        else:
            queries = h
        x = x + self.attn(queries, h, mask)
        return x + self.ffn(self.ln_ffn(x))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items, cfg.d_model, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        future = torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool).triu(1)
        self.causal: torch.Tensor
        self.register_buffer(
            "causal",
            torch.zeros(cfg.max_len, cfg.max_len).masked_fill(future, MASKED),
            persistent=False,
        )
        self.apply(_init_weights)
        # Set from the training data before training (``streamrec.model.hybrid``); never exported:
        # at serving time the sums come from the candidate index, kept up to date online.
        self.covisit_table: Any = None
        if cfg.covisit_recent:
            self.covisit_gate = nn.Linear(cfg.d_model, 1)
            nn.init.zeros_(self.covisit_gate.weight)
            # softplus(0.5413) = 1: the sums start at full weight, as the baseline ranks.
            nn.init.constant_(self.covisit_gate.bias, 0.5413)

    def encode(self, seq: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states of ``seq`` [B, L ≤ max_len]: [B, L, d], or [B, d] with ``last_only``."""
        length = seq.shape[1]
        positions = self.pos_emb.weight[self.cfg.max_len - length :]
        x = self.item_emb(seq) * self.cfg.embedding_scale + positions
        x = self.emb_dropout(x)
        padding = (seq == PAD).to(x.dtype)[:, None, None, :] * MASKED  # [B, 1, 1, L]
        mask = padding + self.causal[-length:, -length:]  # [B, 1, L, L]
        for i, block in enumerate(self.blocks):
            if last_only and i == len(self.blocks) - 1:
                # The newest query sees every earlier key: only padding is masked.
                x = block(x, padding, last_only=True)
            else:
                x = block(x, mask)
        x = self.ln_out(x)
        return x[:, -1] if last_only else x

    @property
    def hybrid(self) -> bool:
        return self.cfg.covisit_recent > 0

    def covisit_weight(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate [...] on the co-visitation input, from hidden states [..., d]."""
        return F.softplus(self.covisit_gate(hidden)).squeeze(-1)

    def score(
        self, seq: torch.Tensor, candidates: torch.Tensor, covisit: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores [B, C] of ``candidates`` [B, C] as the next item after ``seq`` [B, L].

        ``covisit`` [B, C]: the candidates' co-visitation sums (a hybrid needs them).
        """
        h = self.encode(seq, last_only=True)
        return self._with_covisit(
            (self.item_emb(candidates) @ h.unsqueeze(-1)).squeeze(-1), h, covisit
        )

    def score_all(self, seq: torch.Tensor, covisit: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, n_items] of every item (index 0, the padding, included)."""
        h = self.encode(seq, last_only=True)
        return self._with_covisit(h @ self.item_emb.weight.T, h, covisit)

    def forward(
        self, seq: torch.Tensor, candidates: torch.Tensor, covisit: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.score(seq, candidates, covisit)

    def _with_covisit(
        self, scores: torch.Tensor, hidden: torch.Tensor, covisit: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.hybrid:
            return scores
        if covisit is None:
            raise ValueError(
                "a hybrid SASRec scores with its candidates' co-visitation sums: pass covisit "
                "(streamrec.model.hybrid.CovisitTable or CandidateIndex.covisit_sums)"
            )
        return scores + self.covisit_weight(hidden)[:, None] * torch.log1p(covisit)

    def block_list(self) -> list[Block]:
        """The blocks, typed (iterating an ``nn.ModuleList`` yields plain modules)."""
        return [cast(Block, block) for block in self.blocks]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
