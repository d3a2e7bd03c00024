"""The teacher's search: the best trial on validation wins and keeps training, within time."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from streamrec.model.data import EvalSet  # noqa: E402
from streamrec.model.sasrec import SASRec, SASRecConfig  # noqa: E402
from streamrec.model.search import Candidate, search  # noqa: E402
from streamrec.model.train import TrainConfig  # noqa: E402

# Every user walks 1 → 2 → 3 → 4 → 5 → 6: the next item is easy to learn.
TRAIN = [np.array([1, 2, 3, 4, 5, 6])] * 24
VALID = EvalSet(
    [np.array([1, 2]), np.array([2, 3]), np.array([3, 4])],
    np.array([3, 4, 5]),
    np.array([0, 1, 2]),
)
BASE = TrainConfig(epochs=3, patience=1, batch_size=4, warmup_steps=1)


def make_model(dropout: float) -> SASRec:
    torch.manual_seed(0)
    return SASRec(
        SASRecConfig(
            n_items=7, max_len=4, d_model=8, n_heads=2, head_dim=4, d_ff=8, dropout=dropout
        )
    )


def test_the_trial_that_learns_wins_and_every_trial_is_recorded() -> None:
    frozen, learning = Candidate(lr=0.0, dropout=0.0), Candidate(lr=0.05, dropout=0.0)
    found = search(make_model, TRAIN, VALID, BASE, [frozen, learning], 2, seed=0, name="t")
    record = found.record()
    assert found.winner == learning and record["winner"] == learning.name
    assert [t["candidate"] for t in record["trials"]] == [frozen.name, learning.name]
    scores = {t["candidate"]: t["val_ndcg@10"] for t in record["trials"]}
    assert scores[learning.name] > scores[frozen.name]
    assert record["continued"]["val_ndcg@10"] >= scores[learning.name]


def test_trials_that_cannot_hold_an_epoch_are_skipped_for_the_first() -> None:
    first, second = Candidate(lr=1e-3, dropout=0.1), Candidate(lr=3e-3, dropout=0.1)
    found = search(
        make_model,
        TRAIN,
        VALID,
        BASE,
        [first, second],
        2,
        seed=0,
        name="t",
        deadline=time.monotonic() - 1.0,
    )
    trials = found.record()["trials"]
    assert found.winner == first
    assert trials[0]["stopped"] == "deadline" and trials[0]["steps"] == 1
    assert trials[1]["candidate"] == second.name and "epoch" in trials[1]["skipped"]
    assert found.final.stopped == "deadline" and found.final.steps == 1


def test_a_search_without_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        search(make_model, TRAIN, VALID, BASE, [], 1, seed=0, name="t")


def test_the_winner_continues_at_the_learning_rate_its_trial_decayed_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streamrec.model.search as search_module

    rates: list[float] = []
    real_fit = search_module.fit

    def recording_fit(*args: Any, **kwargs: Any) -> Any:
        rates.append(args[3].lr)  # fit(model, train, valid, cfg, ...)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(search_module, "fit", recording_fit)
    # Too slow to change a ranking: every epoch after the first fails to improve.
    stalled = Candidate(lr=1e-9, dropout=0.0)
    found = search(make_model, TRAIN, VALID, BASE, [stalled], 3, seed=0, name="t")
    [trial] = found.trials
    assert (trial["best_epoch"], trial["epochs_run"]) == (1, 3)
    assert rates == [stalled.lr, pytest.approx(stalled.lr * BASE.lr_decay**2)]
