"""Training: full-softmax cross-entropy over the catalogue, optionally distilled from a teacher.

Every position of a training window predicts the next item against all items
(no sampled negatives).  A student may also learn the teacher's ranking: for
each training position the teacher's top-``kd_top`` items and probabilities
(at temperature ``kd_temperature``) are precomputed once, and the student's
loss mixes the data's one-hot target with that soft target.  Early stopping
keeps the epoch with the best validation NDCG@10.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.data import PAD, EvalSet, left_pad
from model.metrics import ndcg_at, target_ranks
from model.sasrec import SASRec


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    batch_size: int = 64  # training windows per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    kd_weight: float = 0.0  # share of the loss taken from the teacher's soft targets
    kd_temperature: float = 1.0
    # Serving never recommends a seen item: keep the prefix's items out of the softmax, so
    # the model spends no capacity pushing them down (the target itself is never masked).
    mask_seen: bool = True


@dataclass(frozen=True, slots=True)
class TeacherTargets:
    """The teacher's top items for every training position: row = offsets[user] + position - 1."""

    offsets: np.ndarray  # [users + 1] first row of each user
    items: np.ndarray  # [positions, top] int64
    probs: np.ndarray  # [positions, top] float32, renormalised over the top items


@dataclass(frozen=True, slots=True)
class Batch:
    inputs: torch.Tensor  # [B, L] item indices, left-padded
    targets: torch.Tensor  # [B, L] next item at each position, PAD where none
    kd_rows: torch.Tensor  # [B, L] row into TeacherTargets, -1 where none


def training_windows(
    train: Sequence[np.ndarray], max_len: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """(user, start, end) windows of at most ``max_len + 1`` items covering every target.

    The window ending at the newest item is always there; the others are shifted by a
    random offset each epoch, so the model sees each history cut in different places.
    """
    windows = []
    for user, seq in enumerate(train):
        n = len(seq)
        if n < 2:
            continue
        ends = {n}
        end = n - int(rng.integers(1, max_len + 1))
        while end >= 2:
            ends.add(end)
            end -= max_len
        windows += [(user, max(0, e - max_len - 1), e) for e in sorted(ends)]
    return windows


def batches(
    train: Sequence[np.ndarray],
    windows: list[tuple[int, int, int]],
    batch_size: int,
    rng: np.random.Generator,
    kd_offsets: np.ndarray | None,
) -> list[Batch]:
    """Windows shuffled, grouped by length (less padding to compute), then batches shuffled."""
    order = rng.permutation(len(windows))
    chunk = batch_size * 32
    grouped: list[list[int]] = []
    for lo in range(0, len(order), chunk):
        part = sorted(order[lo : lo + chunk], key=lambda w: windows[w][2] - windows[w][1])
        grouped += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    out = []
    for b in rng.permutation(len(grouped)):
        rows = [windows[w] for w in grouped[b]]
        width = max(e - s for _, s, e in rows) - 1
        inputs = np.zeros((len(rows), width), dtype=np.int64)
        targets = np.zeros((len(rows), width), dtype=np.int64)
        kd_rows = np.full((len(rows), width), -1, dtype=np.int64)
        for r, (user, start, end) in enumerate(rows):
            n = end - start - 1
            inputs[r, width - n :] = train[user][start : end - 1]
            targets[r, width - n :] = train[user][start + 1 : end]
            if kd_offsets is not None:
                kd_rows[r, width - n :] = kd_offsets[user] + np.arange(start, end - 1)
        out.append(
            Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(kd_rows))
        )
    return out


def loss_on(
    model: SASRec, batch: Batch, cfg: TrainConfig, teacher: TeacherTargets | None
) -> torch.Tensor:
    hidden = model.encode(batch.inputs)
    valid = batch.targets != PAD
    logits = hidden[valid] @ model.item_emb.weight.T  # [positions, n_items]
    if cfg.mask_seen:
        rows, items = seen_in_prefix(batch.inputs, valid, batch.targets)
        logits = logits.index_put((rows, items), torch.tensor(-math.inf))
    loss = F.cross_entropy(logits, batch.targets[valid])
    if teacher is None or cfg.kd_weight == 0.0:
        return loss
    rows = batch.kd_rows[valid]
    t_items = torch.from_numpy(teacher.items[rows.numpy()])
    t_probs = torch.from_numpy(teacher.probs[rows.numpy()])
    temp = cfg.kd_temperature
    log_probs = F.log_softmax(logits / temp, dim=-1).gather(1, t_items)
    # A soft target on an item the student has masked as seen (one the teacher saw only
    # beyond its own window) contributes nothing.
    usable = torch.isfinite(log_probs) & (t_probs > 0)
    per_item = torch.where(usable, t_probs * log_probs, torch.zeros_like(log_probs))
    kd = -per_item.sum(dim=1).mean() * temp * temp
    return (1.0 - cfg.kd_weight) * loss + cfg.kd_weight * kd


def seen_in_prefix(
    inputs: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs of the items each valid position has already seen.

    Rows number the valid positions of ``inputs`` [B, L] in row-major order, as
    ``hidden[valid]`` does.  A position's own target is left out.
    """
    length = inputs.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool).tril()  # [t, j]: j ≤ t
    pairs = valid[:, :, None] & earlier[None] & (inputs != PAD)[:, None, :]
    b, t, j = pairs.nonzero(as_tuple=True)
    row_of = torch.cumsum(valid.flatten(), 0).view(valid.shape) - 1
    rows, items = row_of[b, t], inputs[b, j]
    if targets is not None:
        keep = items != targets[b, t]
        rows, items = rows[keep], items[keep]
    return rows, items


@torch.no_grad()
def score_all(model: SASRec, histories: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Scores [N, n_items] of every item after each history (the model's context)."""
    model.eval()
    out = []
    for lo in range(0, len(histories), batch_size):
        seq = torch.from_numpy(left_pad(histories[lo : lo + batch_size], model.cfg.max_len))
        out.append(model.score_all(seq).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.n_items), np.float32)


def evaluate_ranks(model: SASRec, points: EvalSet, batch_size: int = 256) -> np.ndarray:
    ranks = []
    for lo in range(0, len(points), batch_size):
        part = points.subset(np.arange(lo, min(lo + batch_size, len(points))))
        ranks.append(target_ranks(score_all(model, part.histories), part.histories, part.targets))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def fit(
    model: SASRec,
    train: Sequence[np.ndarray],
    valid: EvalSet,
    cfg: TrainConfig,
    seed: int,
    name: str,
    teacher: TeacherTargets | None = None,
) -> dict[str, float]:
    """Train ``model`` in place; it ends with the weights of its best validation epoch."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "emb" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    kd_offsets = teacher.offsets if teacher is not None else None
    best, best_state, best_epoch, step = -1.0, copy.deepcopy(model.state_dict()), 0, 0
    history: list[float] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {name}", unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        epoch_batches = batches(
            train, training_windows(train, model.cfg.max_len, rng), cfg.batch_size, rng, kd_offsets
        )
        total = 0.0
        for batch in tqdm(epoch_batches, desc=f"epoch {epoch}", unit="batch", leave=False):
            step += 1
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _schedule(step, len(epoch_batches) * cfg.epochs, cfg)
            loss = loss_on(model, batch, cfg, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach())
        score = float(ndcg_at(evaluate_ranks(model, valid), 10).mean())
        history.append(score)
        mean_loss = total / max(len(epoch_batches), 1)
        bar.set_postfix(loss=f"{mean_loss:.3f}", val_ndcg=f"{score:.4f}")
        tqdm.write(f"{name} epoch {epoch}: loss {mean_loss:.3f}, validation NDCG@10 {score:.4f}")
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"val_ndcg@10": best, "best_epoch": best_epoch, "epochs_run": len(history)}


def _schedule(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then linear decay to a tenth over the epoch budget."""
    warm = min(1.0, step / max(cfg.warmup_steps, 1))
    return warm * max(0.1, 1.0 - step / max(total, 1))


@torch.no_grad()
def teacher_targets(
    teacher: SASRec, train: Sequence[np.ndarray], top: int, temperature: float, batch_size: int = 16
) -> TeacherTargets:
    """The teacher's top items at every training position, each seen with its full context."""
    teacher.eval()
    length = teacher.cfg.max_len
    stride = max(1, length // 2)
    sizes = np.array([max(len(s) - 1, 0) for s in train])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = np.zeros((int(offsets[-1]), top), dtype=np.int64)
    probs = np.zeros((int(offsets[-1]), top), dtype=np.float32)
    # Window [start, start+length) predicts targets start+1..start+length; beyond the first
    # window only the second half is kept, where every prediction has ≥ length/2 context.
    jobs = []
    for user, seq in enumerate(train):
        n = len(seq)
        for start in range(0, max(n - 1, 0), stride):
            keep_from = 0 if start == 0 else length - stride
            jobs.append((user, start, min(start + length, n - 1), keep_from))
            if start + length >= n - 1:
                break
    for lo in tqdm(range(0, len(jobs), batch_size), desc="teacher targets", leave=False):
        part = jobs[lo : lo + batch_size]
        windows = [train[u][s:e] for u, s, e, _ in part]
        inputs = torch.from_numpy(left_pad(windows, length))
        hidden = teacher.encode(inputs)
        width = inputs.shape[1]
        for r, (user, start, end, keep_from) in enumerate(part):
            n = end - start
            h = hidden[r, width - n + keep_from :]
            logits = (h @ teacher.item_emb.weight.T) / temperature
            logits[:, PAD] = -math.inf
            # Items the user has already seen are never a soft target (the student masks them).
            window = inputs[r : r + 1, width - n :]
            kept = torch.zeros(1, n, dtype=torch.bool)
            kept[0, keep_from:] = True
            rows, seen = seen_in_prefix(window, kept)
            logits[rows, seen] = -math.inf
            p, idx = torch.softmax(logits, dim=-1).topk(top, dim=-1)
            rows = offsets[user] + np.arange(start + keep_from, end)
            items[rows] = idx.numpy()
            probs[rows] = (p / p.sum(dim=-1, keepdim=True)).numpy()
    return TeacherTargets(offsets, items, probs)


def covisit_embeddings(
    train: Sequence[np.ndarray], n_items: int, dim: int, seed: int, std: float = 0.05
) -> torch.Tensor:
    """Item vectors [n_items, dim] from the truncated SVD of the co-visitation PPMI matrix.

    A warm start for the item embeddings: on a dataset this small, pair statistics
    that co-visitation gathers in one pass take a transformer many epochs to find.
    """
    from model.candidates import covisit_pairs

    indptr, col, weight = covisit_pairs(train, n_items, window=3)
    row = np.repeat(np.arange(n_items), np.diff(indptr))
    total = float(weight.sum())
    marginal = np.bincount(row, weights=weight, minlength=n_items)
    pmi = np.log(weight * total / (marginal[row] * marginal[col] + 1e-12) + 1e-12)
    keep = pmi > 0
    matrix = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([row[keep], col[keep]])),
        torch.from_numpy(pmi[keep].astype(np.float32)),
        (n_items, n_items),
        check_invariants=False,
    ).coalesce()
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(matrix, q=dim, niter=4)
    vectors = u * s.sqrt()
    vectors = vectors / vectors.std() * std
    vectors[PAD] = 0.0
    return vectors
