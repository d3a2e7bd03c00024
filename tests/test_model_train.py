"""Training stops by validation or deadline; the losses are what they claim to be."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from torch import Tensor

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from streamrec.model.data import EvalSet  # noqa: E402
from streamrec.model.losses import full_softmax, gbce, sampled_softmax  # noqa: E402
from streamrec.model.sasrec import SASRec, SASRecConfig  # noqa: E402
from streamrec.model.train import TrainConfig, fit  # noqa: E402

TRAIN = [np.array([1, 2, 3, 4, 5, 6]), np.array([2, 3, 4, 5]), np.array([6, 5, 4, 3])] * 8
VALID = EvalSet([np.array([1, 2]), np.array([6, 5])], np.array([3, 4]), np.array([0, 1]))


def tiny() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=7, max_len=4, d_model=8, n_heads=2, head_dim=4, d_ff=8))


def test_a_passed_deadline_stops_training_after_one_batch() -> None:
    cfg = TrainConfig(epochs=5, batch_size=2, warmup_steps=1)
    report = fit(tiny(), TRAIN, VALID, cfg, seed=0, name="t", deadline=time.monotonic() - 1.0)
    assert report.steps == 1 and report.stopped == "deadline"
    assert len(report.val_ndcg) == 1  # the cut epoch is still validated


def test_training_stops_after_patience_epochs_without_improvement() -> None:
    # With a zero learning rate validation never improves on the first epoch.
    cfg = TrainConfig(epochs=20, patience=2, batch_size=4, lr=0.0, warmup_steps=1)
    report = fit(tiny(), TRAIN, VALID, cfg, seed=0, name="t")
    assert report.stopped == "patience"
    assert report.best_epoch == 1 and len(report.val_ndcg) == 3


def test_without_a_deadline_or_plateau_the_epoch_cap_ends_training() -> None:
    cfg = TrainConfig(epochs=2, patience=5, batch_size=4, warmup_steps=1)
    report = fit(tiny(), TRAIN, VALID, cfg, seed=0, name="t")
    assert report.stopped == "epochs" and len(report.val_ndcg) == 2


def test_weights_that_no_epoch_beats_are_kept() -> None:
    model = tiny()
    before = model.item_emb.weight.detach().clone()
    cfg = TrainConfig(epochs=2, patience=5, batch_size=4, warmup_steps=1)
    report = fit(model, TRAIN, VALID, cfg, seed=0, name="t", start_score=2.0)
    assert report.best_epoch == 0
    assert torch.equal(model.item_emb.weight, before)


def test_the_fit_summary_reports_throughput_and_the_curve() -> None:
    cfg = TrainConfig(epochs=2, patience=5, batch_size=4, warmup_steps=1)
    summary = fit(tiny(), TRAIN, VALID, cfg, seed=0, name="t").summary()
    assert summary["epochs_run"] == 2 and len(summary["val_curve"]) == 2
    assert summary["sequences_per_s"] > 0 and summary["val_ndcg@10"] == max(summary["val_curve"])


@pytest.mark.parametrize("loss", ["gbce", "sampled"])
def test_training_with_sampled_negatives_runs_and_is_reproducible(loss: str) -> None:
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_steps=1, loss=loss, negatives=3)
    weights = []
    for _ in range(2):
        model = tiny()
        fit(model, TRAIN, VALID, cfg, seed=0, name="t")
        weights.append(model.item_emb.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_an_unknown_loss_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="softmax, gbce, sampled"):
        TrainConfig(loss="bpr")


def masked_cross_entropy(h: Tensor, w: Tensor, y: Tensor, rows: Tensor, items: Tensor) -> Tensor:
    logits = h @ w.T
    logits[:, 0] = -math.inf
    logits[rows, items] = -math.inf
    return torch.nn.functional.cross_entropy(logits, y)


def test_chunked_softmax_equals_the_whole_softmax_with_seen_items_masked() -> None:
    torch.manual_seed(0)
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(50, 4, requires_grad=True)
    y = torch.tensor([1, 7, 13, 25, 38, 49])
    rows, items = torch.tensor([0, 0, 3, 5]), torch.tensor([2, 30, 49, 48])
    want = masked_cross_entropy(h, w, y, rows, items)
    (want_h, want_w) = torch.autograd.grad(want, (h, w))
    got = full_softmax(h, w, y, (rows, items), chunk_elements=6 * 7).loss  # 8 chunks
    (got_h, got_w) = torch.autograd.grad(got, (h, w))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got_h, want_h, atol=1e-5) and torch.allclose(got_w, want_w, atol=1e-5)


def test_softmax_distillation_log_probs_are_the_masked_log_softmax() -> None:
    torch.manual_seed(1)
    h, w = torch.randn(3, 4), torch.randn(20, 4)
    y = torch.tensor([1, 2, 3])
    rows, items = torch.tensor([1]), torch.tensor([5])
    kd_items = torch.tensor([[4, 5], [5, 6], [0, 7]])
    out = full_softmax(h, w, y, (rows, items), chunk_elements=9, kd_items=kd_items)
    logits = h @ w.T
    logits[:, 0] = -math.inf
    logits[1, 5] = -math.inf
    want = torch.log_softmax(logits, -1).gather(1, kd_items)
    assert out.log_probs is not None
    assert torch.equal(torch.isinf(out.log_probs), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(out.log_probs[finite], want[finite], atol=1e-5)


def test_gbce_with_t_zero_is_binary_cross_entropy_on_the_negatives_drawn() -> None:
    torch.manual_seed(2)
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    y = torch.tensor([1, 2, 3, 4])
    got = gbce(h, w, y, negatives=5, t=0.0, generator=torch.Generator().manual_seed(7)).loss
    neg = torch.randint(1, 10, (5,), generator=torch.Generator().manual_seed(7))
    pos = (h * w[y]).sum(-1)
    negs = h @ w[neg].T
    per_negative = torch.nn.functional.softplus(negs).masked_fill(neg[None] == y[:, None], 0.0)
    want = ((torch.nn.functional.softplus(-pos) + per_negative.sum(-1)) / 6).mean()
    assert torch.allclose(got, want, atol=1e-6)


def test_gbce_calibration_weighs_the_positive_term_down_as_t_rises() -> None:
    torch.manual_seed(3)
    h, w = torch.randn(4, 3), torch.randn(100, 3)
    y = torch.tensor([1, 2, 3, 4])

    def loss(t: float) -> float:
        return float(gbce(h, w, y, 8, t, torch.Generator().manual_seed(0)).loss)

    # beta = alpha·(t·(1 − 1/alpha) + 1/alpha): 1 at t = 0, alpha (here 8/99) at t = 1.
    assert loss(0.0) > loss(0.5) > loss(1.0)


def test_sampled_softmax_is_cross_entropy_over_the_target_and_the_negatives_drawn() -> None:
    torch.manual_seed(4)
    h, w = torch.randn(3, 4), torch.randn(12, 4)
    y = torch.tensor([1, 5, 9])
    got = sampled_softmax(h, w, y, negatives=6, generator=torch.Generator().manual_seed(3))
    neg = torch.randint(1, 12, (6,), generator=torch.Generator().manual_seed(3))
    logits = torch.cat([(h * w[y]).sum(-1, keepdim=True), h @ w[neg].T], dim=1)
    logits[:, 1:] = logits[:, 1:].masked_fill(neg[None] == y[:, None], -math.inf)
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(got.loss, want, atol=1e-6)


@pytest.mark.parametrize("loss", ["softmax", "sampled", "gbce"])
def test_distillation_trains_with_every_loss(loss: str) -> None:
    from streamrec.model.train import teacher_targets

    targets = teacher_targets(tiny(), TRAIN, top=3, temperature=1.0)
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_steps=1, loss=loss, negatives=3, kd_weight=0.5)
    report = fit(tiny(), TRAIN, VALID, cfg, seed=0, name="t", teacher=targets)
    assert report.steps > 0 and all(math.isfinite(v) for v in report.loss)


def test_teacher_targets_are_the_teachers_masked_top_items_at_each_position() -> None:
    from streamrec.model.train import teacher_targets

    model = tiny()
    model.eval()
    with torch.no_grad():  # spread the scores: no near-ties for float noise to reorder
        model.item_emb.weight.mul_(100.0)
    train = [np.array([1, 2, 3]), np.array([4, 5, 6, 1]), np.array([6])]
    got = teacher_targets(model, train, top=2, temperature=1.0, batch_size=2, chunk_elements=7)
    for user, seq in enumerate(train):
        for position in range(1, len(seq)):
            prefix = torch.from_numpy(seq[:position])[None]
            with torch.no_grad():
                logits = model.score_all(prefix)[0]
            logits[0] = -math.inf
            logits[prefix[0]] = -math.inf
            want = torch.softmax(logits, -1).topk(2).indices.numpy()
            row = got.offsets[user] + position - 1
            assert list(got.items[row]) == list(want)
    assert got.offsets.tolist() == [0, 2, 5, 5]
