"""Structured pruning: remove whole FFN units, attention heads and embedding dimensions.

Masks and unstructured zeros leave dense matrices as large (and as slow) as
before, so the pruned model is a new, smaller SASRec whose matrices are the
kept rows and columns of the old one.  What to keep is ranked by first-order
Taylor importance, |Σ gradient × weight| over a structure's parameters,
accumulated over a few training batches: the loss change the removal would
cause, to first order.  Fine-tuning afterwards recovers most of what is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from streamrec.model.sasrec import SASRec
from streamrec.model.train import Batch, TeacherTargets, TrainConfig, loss_on


@dataclass(frozen=True, slots=True)
class PruneConfig:
    ffn_keep: float = 0.5  # share of FFN units kept in every block
    heads_keep: int = 1  # attention heads kept in every block
    dim_keep: float = 0.75  # share of embedding (residual stream) dimensions kept
    batches: int = 20  # training batches used to estimate importance


@dataclass(frozen=True, slots=True)
class Importance:
    ffn: list[torch.Tensor]  # per block [d_ff]
    heads: list[torch.Tensor]  # per block [n_heads]
    dims: torch.Tensor  # [d_model]


def importance(
    model: SASRec, batches: Sequence[Batch], cfg: TrainConfig, teacher: TeacherTargets | None
) -> Importance:
    """First-order Taylor importance of every FFN unit, head and dimension."""
    c = model.cfg
    ffn = [torch.zeros(c.d_ff) for _ in model.block_list()]
    heads = [torch.zeros(c.n_heads) for _ in model.block_list()]
    dims = torch.zeros(c.d_model)
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_on(model, batch, cfg, teacher).backward()
        with torch.no_grad():
            dim_sum = torch.zeros(c.d_model)
            for b, block in enumerate(model.block_list()):
                up, down = block.ffn.up, block.ffn.down
                unit = _gw(up.weight).sum(1) + _gw(up.bias) + _gw(down.weight).sum(0)
                ffn[b] += unit.abs()
                attn = block.attn
                per_head = (
                    sum(_gw(m.weight).sum(1) + _gw(m.bias) for m in (attn.q, attn.k, attn.v))
                    + _gw(attn.out.weight).sum(0)
                ).view(c.n_heads, c.head_dim)
                heads[b] += per_head.sum(1).abs()
                for ln in (block.ln_attn, block.ln_ffn):
                    dim_sum += _gw(ln.weight) + _gw(ln.bias)
                for m in (attn.q, attn.k, attn.v, up):
                    dim_sum += _gw(m.weight).sum(0)
                for m in (attn.out, down):
                    dim_sum += _gw(m.weight).sum(1) + _gw(m.bias)
            dim_sum += _gw(model.item_emb.weight).sum(0) + _gw(model.pos_emb.weight).sum(0)
            dim_sum += _gw(model.ln_out.weight) + _gw(model.ln_out.bias)
            if model.hybrid:
                dim_sum += _gw(model.covisit_gate.weight).sum(0)
            dims += dim_sum.abs()
    model.zero_grad(set_to_none=True)
    return Importance(ffn, heads, dims)


def _gw(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None, "importance needs the gradient of every parameter"
    return p.grad * p.detach()


def prune(model: SASRec, imp: Importance, cfg: PruneConfig) -> SASRec:
    """A new, smaller SASRec keeping the most important units, heads and dimensions."""
    c = model.cfg
    keep_dims = _top(imp.dims, max(8, round(c.d_model * cfg.dim_keep)))
    n_ff = max(4, round(c.d_ff * cfg.ffn_keep))
    n_heads = max(1, min(cfg.heads_keep, c.n_heads))
    small = SASRec(
        replace(
            c,
            d_model=len(keep_dims),
            d_ff=n_ff,
            n_heads=n_heads,
            emb_scale=c.embedding_scale,  # the tied output embedding keeps its meaning
        )
    )
    with torch.no_grad():
        small.item_emb.weight.copy_(model.item_emb.weight[:, keep_dims])
        small.pos_emb.weight.copy_(model.pos_emb.weight[:, keep_dims])
        _copy_norm(small.ln_out, model.ln_out, keep_dims)
        for b, (new, old) in enumerate(zip(small.block_list(), model.block_list(), strict=True)):
            _copy_norm(new.ln_attn, old.ln_attn, keep_dims)
            _copy_norm(new.ln_ffn, old.ln_ffn, keep_dims)
            heads = _top(imp.heads[b], n_heads)
            width = torch.cat([torch.arange(h * c.head_dim, (h + 1) * c.head_dim) for h in heads])
            for name in ("q", "k", "v"):
                _copy_linear(getattr(new.attn, name), getattr(old.attn, name), width, keep_dims)
            _copy_linear(new.attn.out, old.attn.out, keep_dims, width)
            units = _top(imp.ffn[b], n_ff)
            _copy_linear(new.ffn.up, old.ffn.up, units, keep_dims)
            _copy_linear(new.ffn.down, old.ffn.down, keep_dims, units)
        if model.hybrid:
            _copy_linear(small.covisit_gate, model.covisit_gate, torch.tensor([0]), keep_dims)
    small.covisit_table = model.covisit_table
    return small


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores, in their original order."""
    return torch.sort(torch.topk(scores, n).indices).values


def _copy_linear(new: nn.Linear, old: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    new.weight.copy_(old.weight[rows][:, cols])
    new.bias.copy_(old.bias[rows])


def _copy_norm(new: nn.LayerNorm, old: nn.LayerNorm, keep: torch.Tensor) -> None:
    new.weight.copy_(old.weight[keep])
    new.bias.copy_(old.bias[keep])


def describe(before: SASRec, after: SASRec) -> dict[str, int | float]:
    b, a = before.cfg, after.cfg
    return {
        "d_model": a.d_model,
        "d_model_before": b.d_model,
        "heads": a.n_heads,
        "heads_before": b.n_heads,
        "d_ff": a.d_ff,
        "d_ff_before": b.d_ff,
        "params": after.n_params(),
        "params_before": before.n_params(),
        "param_ratio": float(np.round(after.n_params() / before.n_params(), 3)),
    }
