"""Training: next-item loss over the catalogue, optionally distilled from a teacher.

Every position of a training window predicts the next item, with a full softmax
over all items or a loss on sampled negatives (``streamrec.model.losses``; the pipeline
picks one by catalogue size).  A student may also learn the teacher's
ranking: for each training position the teacher's top-``kd_top`` items and
probabilities (at temperature ``kd_temperature``) are precomputed once, and the
student's loss mixes the data's target with that soft target.

Validation decides when training ends, not a fixed number of epochs: the
learning rate warms up, is halved after each epoch that does not improve
validation NDCG@10, and training stops after ``patience`` such epochs in a row,
at the ``epochs`` cap, or at a deadline (checked after every batch).  The model
keeps the weights of its best validation epoch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from streamrec.model.budget import clock_text
from streamrec.model.data import PAD, EvalSet, left_pad
from streamrec.model.hybrid import dense_sums, score_bonus, table_of
from streamrec.model.losses import LossOut, full_softmax, gbce, sampled_softmax
from streamrec.model.metrics import ndcg_at, target_ranks
from streamrec.model.sasrec import SASRec

LOSSES = ("softmax", "gbce", "sampled")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 100  # upper bound; validation (patience) or the deadline usually ends sooner
    patience: int = 3  # epochs in a row without a better validation NDCG@10 before stopping
    batch_size: int = 64  # training windows per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    lr_decay: float = 0.5  # learning rate factor after an epoch that does not improve
    # "softmax" (full, in chunks), "gbce" or "sampled" (softmax) on uniform negatives
    loss: str = "softmax"
    negatives: int = 256  # gbce and sampled: uniform negatives per batch
    gbce_t: float = 0.75  # gbce: calibration of the positive term (gSASRec's t)
    chunk_elements: int = 1 << 26  # softmax: most logits alive at once (256 MB of fp32)
    kd_weight: float = 0.0  # share of the loss taken from the teacher's soft targets
    kd_temperature: float = 1.0
    # Serving never recommends a seen item: keep the prefix's items out of the softmax, so
    # the model spends no capacity pushing them down (the target itself is never masked).
    mask_seen: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r} (known: {', '.join(LOSSES)})")


@dataclass(slots=True)
class FitReport:
    """What one ``fit`` did: the learning curve and why it stopped."""

    val_ndcg: list[float] = field(default_factory=list)  # validation NDCG@10 per epoch
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch
    best_epoch: int = 0  # 0: no epoch beat the weights training started from
    start_score: float = -1.0  # validation NDCG@10 of those weights, when known
    stopped: str = "epochs"  # "patience", "deadline" or "epochs"
    seconds: float = 0.0  # the whole fit, validation included
    train_seconds: float = 0.0  # the training steps alone
    steps: int = 0
    sequences: int = 0  # training windows seen

    def summary(self) -> dict[str, Any]:
        return {
            "val_ndcg@10": max([self.start_score, *self.val_ndcg, 0.0]),
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.val_ndcg),
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
            "steps": self.steps,
            "sequences_per_s": round(self.sequences / max(self.train_seconds, 1e-9), 1),
            "s_per_epoch": round(self.train_seconds / max(len(self.val_ndcg), 1), 1),
            "val_curve": [round(v, 5) for v in self.val_ndcg],
        }


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
    model: SASRec,
    batch: Batch,
    cfg: TrainConfig,
    teacher: TeacherTargets | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    hidden = model.encode(batch.inputs)
    valid = batch.targets != PAD
    h, targets = hidden[valid], batch.targets[valid]
    items = model.item_emb.weight
    bonus = score_bonus(model, batch.inputs, valid, h)
    distil = teacher is not None and cfg.kd_weight > 0.0
    kd_items = None
    if distil:
        assert teacher is not None
        rows = batch.kd_rows[valid].numpy()
        kd_items = torch.from_numpy(teacher.items[rows])
    out: LossOut
    if cfg.loss == "gbce":
        out = gbce(
            h,
            items,
            targets,
            cfg.negatives,
            cfg.gbce_t,
            generator,
            kd_items,
            cfg.kd_temperature,
            bonus,
        )
    elif cfg.loss == "sampled":
        out = sampled_softmax(
            h, items, targets, cfg.negatives, generator, kd_items, cfg.kd_temperature, bonus
        )
    else:
        empty = torch.zeros(0, dtype=torch.long)
        seen = (
            seen_in_prefix(batch.inputs, valid, batch.targets) if cfg.mask_seen else (empty, empty)
        )
        out = full_softmax(
            h, items, targets, seen, cfg.chunk_elements, kd_items, cfg.kd_temperature, bonus
        )
    if not distil:
        return out.loss
    assert teacher is not None and out.log_probs is not None
    t_probs = torch.from_numpy(teacher.probs[batch.kd_rows[valid].numpy()])
    # A soft target on an item the student has masked as seen (one the teacher saw only
    # beyond its own window) contributes nothing.
    usable = torch.isfinite(out.log_probs) & (t_probs > 0)
    per_item = torch.where(usable, t_probs * out.log_probs, torch.zeros_like(out.log_probs))
    kd = -per_item.sum(dim=1).mean() * cfg.kd_temperature**2
    return (1.0 - cfg.kd_weight) * out.loss + cfg.kd_weight * kd


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
        out.append(model.score_all(seq, dense_sums(model, seq)).numpy())
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
    deadline: float | None = None,
    start_score: float = -1.0,
) -> FitReport:
    """Train ``model`` in place; it ends with the weights of its best validation epoch.

    ``deadline`` is a ``time.monotonic()`` instant: past it, the epoch under way ends
    early, is validated, and training stops (at least one batch always runs).
    ``start_score``: the validation NDCG@10 of the weights given, which an epoch must
    beat to replace them (a warm restart).
    """
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
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
    report = FitReport(start_score=start_score)
    best, best_state, lr = start_score, copy.deepcopy(model.state_dict()), cfg.lr
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {name}", unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        epoch_batches = batches(
            train, training_windows(train, model.cfg.max_len, rng), cfg.batch_size, rng, kd_offsets
        )
        total, done, epoch_started = 0.0, 0, time.monotonic()
        inner = tqdm(epoch_batches, desc=f"epoch {epoch}", unit="batch", leave=False)
        for batch in inner:
            report.steps += 1
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, report.steps / max(cfg.warmup_steps, 1))
            loss = loss_on(model, batch, cfg, teacher, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach())
            done += 1
            report.sequences += batch.inputs.shape[0]
            if deadline is not None:
                left = deadline - time.monotonic()
                inner.set_postfix_str(f"{clock_text(left)} left")
                if left <= 0:
                    report.stopped = "deadline"
                    break
        report.train_seconds += time.monotonic() - epoch_started
        score = float(ndcg_at(evaluate_ranks(model, valid), 10).mean())
        report.val_ndcg.append(score)
        report.loss.append(total / max(done, 1))
        bar.set_postfix(loss=f"{report.loss[-1]:.3f}", val_ndcg=f"{score:.4f}")
        tqdm.write(
            f"{name} epoch {epoch}: loss {report.loss[-1]:.3f}, validation NDCG@10 {score:.4f}"
            + (" (stopped early: deadline)" if report.stopped == "deadline" else "")
        )
        if score > best:
            best, best_state, report.best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        else:
            lr *= cfg.lr_decay
            if epoch - report.best_epoch >= cfg.patience and report.stopped == "epochs":
                report.stopped = "patience"
        if report.stopped != "epochs":
            break
    model.load_state_dict(best_state)
    model.eval()
    report.seconds = time.monotonic() - started
    return report


@torch.no_grad()
def teacher_targets(
    teacher: SASRec,
    train: Sequence[np.ndarray],
    top: int,
    temperature: float,
    batch_size: int = 128,
    chunk_elements: int = 1 << 24,
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
    jobs.sort(key=lambda j: j[2] - j[1])  # similar widths together: less padding to encode
    weight = teacher.item_emb.weight
    table = table_of(teacher) if teacher.hybrid else None
    for lo in tqdm(range(0, len(jobs), batch_size), desc="teacher targets", leave=False):
        part = jobs[lo : lo + batch_size]
        inputs = torch.from_numpy(left_pad([train[u][s:e] for u, s, e, _ in part], length))
        width = inputs.shape[1]
        kept = torch.zeros(inputs.shape, dtype=torch.bool)
        dest = []
        for r, (user, start, end, keep_from) in enumerate(part):
            kept[r, width - (end - start) + keep_from :] = True
            dest.append(offsets[user] + np.arange(start + keep_from, end))
        rows_out = np.concatenate(dest)
        hidden = teacher.encode(inputs)[kept]  # [P, d], row-major as seen_in_prefix counts
        recent = table.prefixes(inputs)[kept] if table is not None else None
        # Items the user has already seen are never a soft target (the student masks them).
        seen_rows, seen_items = seen_in_prefix(inputs, kept)
        step = max(1, chunk_elements // weight.shape[0])
        for p_lo in range(0, hidden.shape[0], step):
            p_hi = min(p_lo + step, hidden.shape[0])
            logits = hidden[p_lo:p_hi] @ weight.T
            if table is not None and recent is not None:
                gate = teacher.covisit_weight(hidden[p_lo:p_hi])
                logits += gate[:, None] * torch.log1p(table.dense(recent[p_lo:p_hi]))
            logits /= temperature
            logits[:, PAD] = -math.inf
            inside = (seen_rows >= p_lo) & (seen_rows < p_hi)
            logits[seen_rows[inside] - p_lo, seen_items[inside]] = -math.inf
            p, idx = torch.softmax(logits, dim=-1).topk(top, dim=-1)
            items[rows_out[p_lo:p_hi]] = idx.numpy()
            probs[rows_out[p_lo:p_hi]] = (p / p.sum(dim=-1, keepdim=True)).numpy()
    return TeacherTargets(offsets, items, probs)


def covisit_embeddings(
    train: Sequence[np.ndarray], n_items: int, dim: int, seed: int, std: float = 0.05
) -> torch.Tensor:
    """Item vectors [n_items, dim] from the truncated SVD of the co-visitation PPMI matrix.

    A warm start for the item embeddings: on a dataset this small, pair statistics
    that co-visitation gathers in one pass take a transformer many epochs to find.
    """
    from streamrec.model.candidates import covisit_pairs

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
