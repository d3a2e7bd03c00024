"""The hybrid teacher: co-visitation sums as an input, the same in training, ONNX and serving."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from torch import Tensor

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from streamrec.model.candidates import CandidateIndex  # noqa: E402
from streamrec.model.data import EvalSet, left_pad  # noqa: E402
from streamrec.model.export import export_onnx  # noqa: E402
from streamrec.model.hybrid import CovisitTable, score_bonus  # noqa: E402
from streamrec.model.losses import ScoreBonus, full_softmax, gbce, sampled_softmax  # noqa: E402
from streamrec.model.sasrec import SASRec, SASRecConfig  # noqa: E402
from streamrec.model.serving import ArtifactError, OnnxScorer  # noqa: E402
from streamrec.model.train import Batch, TrainConfig, fit, loss_on, teacher_targets  # noqa: E402

N_ITEMS = 30
RECENT = 3
RNG = np.random.default_rng(0)
TRAIN = [RNG.integers(1, N_ITEMS, size=RNG.integers(3, 15)) for _ in range(40)]
VALID = EvalSet([s[:-1] for s in TRAIN[:8]], np.array([s[-1] for s in TRAIN[:8]]), np.arange(8))


def hybrid(seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(
        n_items=N_ITEMS, max_len=6, d_model=8, n_heads=2, head_dim=4, d_ff=8, covisit_recent=RECENT
    )
    model = SASRec(cfg)
    model.covisit_table = CovisitTable.build(TRAIN, N_ITEMS, RECENT, width=8)
    return model.eval()


def index() -> CandidateIndex:
    return CandidateIndex.build(TRAIN, N_ITEMS, np.eye(N_ITEMS, 4), width=8)


def test_training_reads_the_same_covisitation_sums_that_serving_computes() -> None:
    table = CovisitTable.build(TRAIN, N_ITEMS, RECENT, width=8)
    sessions = left_pad([s[:-1] for s in TRAIN[:10]], 6)
    everything = np.tile(np.arange(N_ITEMS), (len(sessions), 1))
    served = index().covisit_sums(sessions, everything, RECENT)
    newest = table.newest(torch.from_numpy(sessions))
    assert served.max() > 0
    np.testing.assert_allclose(table.dense(newest).numpy(), served, rtol=1e-6)
    np.testing.assert_allclose(
        table.sums(newest, torch.from_numpy(everything)).numpy(), served, rtol=1e-6
    )


def test_each_prefix_reads_its_own_newest_items_newest_first() -> None:
    table = CovisitTable.build(TRAIN, N_ITEMS, RECENT)
    prefixes = table.prefixes(torch.tensor([[0, 7, 8, 9, 10]]))
    assert prefixes[0, 1].tolist() == [7, 0, 0]
    assert prefixes[0, 4].tolist() == [10, 9, 8]


def test_a_covisited_candidate_moves_up_by_the_gate_times_log1p_of_its_sum() -> None:
    model = hybrid()
    seq, cands = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])
    with torch.no_grad():
        plain = model.score(seq, cands, torch.zeros(1, 2))
        boosted = model.score(seq, cands, torch.tensor([[math.e - 1, 0.0]]))
        gate = model.covisit_weight(model.encode(seq, last_only=True))
    assert float(gate) == pytest.approx(1.0, abs=1e-3)  # starts at the baseline's full weight
    assert torch.allclose(boosted - plain, torch.stack([gate, torch.zeros(1)], dim=1))


def test_a_closed_gate_ignores_covisitation() -> None:
    model = hybrid()
    with torch.no_grad():
        model.covisit_gate.bias.fill_(-50.0)
    seq, cands = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])
    with torch.no_grad():
        plain = model.score(seq, cands, torch.zeros(1, 2))
        boosted = model.score(seq, cands, torch.tensor([[100.0, 0.0]]))
    assert torch.allclose(plain, boosted, atol=1e-6)


def test_a_hybrid_scored_without_its_covisitation_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="pass covisit"):
        hybrid().score(torch.tensor([[1, 2]]), torch.tensor([[3]]))


def test_a_hybrid_trained_without_its_table_says_how_to_build_it() -> None:
    model = hybrid()
    model.covisit_table = None
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_steps=1)
    with pytest.raises(ValueError, match="CovisitTable.build"):
        fit(model, TRAIN, VALID, cfg, seed=0, name="t")


def bonus_for(hidden: Tensor, recent: Tensor, table: CovisitTable) -> ScoreBonus:
    gate = torch.full((hidden.shape[0],), 0.7, requires_grad=True)
    return ScoreBonus(gate, lambda items: table.sums(recent, items), *table.pairs(recent))


def test_the_chunked_softmax_adds_the_bonus_to_every_logit() -> None:
    torch.manual_seed(0)
    table = CovisitTable.build(TRAIN, N_ITEMS, RECENT, width=8)
    recent = torch.from_numpy(np.stack([s[-RECENT:][::-1].copy() for s in TRAIN[:6]]))
    h, w = torch.randn(6, 8), torch.randn(N_ITEMS, 8)
    y = torch.from_numpy(np.array([s[0] for s in TRAIN[:6]]))
    none = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    bonus = bonus_for(h, recent, table)
    got = full_softmax(h, w, y, none, chunk_elements=6 * 7, bonus=bonus).loss
    logits = h @ w.T + bonus.gate[:, None] * torch.log1p(table.dense(recent))
    logits[:, 0] = -math.inf
    want = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()
    assert bonus.gate.grad is not None and bonus.gate.grad.abs().sum() > 0  # the gate learns


@pytest.mark.parametrize("loss", [sampled_softmax, gbce])
def test_sampled_losses_add_the_bonus_to_targets_and_negatives(loss: object) -> None:
    torch.manual_seed(0)
    h, w, y = torch.randn(5, 8), torch.randn(N_ITEMS, 8), torch.tensor([1, 2, 3, 4, 5])
    args = (10, 0.75) if loss is gbce else (10,)

    def with_bonus(on_target: bool) -> float:
        def sums(items: Tensor) -> Tensor:
            return 20.0 * ((items == y[:, None]) == on_target).float()

        none = torch.zeros(0, dtype=torch.long)
        bonus = ScoreBonus(torch.ones(5), sums, none, none, torch.zeros(0))
        out = loss(h, w, y, *args, generator=torch.Generator().manual_seed(1), bonus=bonus)  # type: ignore[operator]
        return float(out.loss)

    plain = float(loss(h, w, y, *args, generator=torch.Generator().manual_seed(1)).loss)  # type: ignore[operator]
    assert with_bonus(on_target=True) < plain < with_bonus(on_target=False)


def test_training_a_hybrid_moves_its_gate() -> None:
    model = hybrid().train()
    before = model.covisit_gate.bias.detach().clone()
    inputs = torch.from_numpy(left_pad([s[:-1] for s in TRAIN[:4]], 6))
    targets = torch.from_numpy(left_pad([s[1:] for s in TRAIN[:4]], 6))
    batch = Batch(inputs, targets, torch.full(inputs.shape, -1))
    loss_on(model, batch, TrainConfig(), None).backward()
    assert model.covisit_gate.bias.grad is not None and float(model.covisit_gate.bias.grad) != 0
    assert torch.equal(model.covisit_gate.bias, before)  # (no step taken: only the gradient)
    valid = inputs != 0
    bonus = score_bonus(model, inputs, valid, model.encode(inputs)[valid])
    assert bonus is not None and bonus.values.numel() > 0


def test_hybrid_teacher_targets_rank_with_the_covisitation_input() -> None:
    model = hybrid()
    with torch.no_grad():
        model.item_emb.weight.mul_(0.0)  # co-visitation alone decides the ranking
    train = [np.array([1, 2, 3, 4]), np.array([5, 6, 7])]
    got = teacher_targets(model, train, top=2, temperature=1.0, batch_size=1, chunk_elements=11)
    table = model.covisit_table
    informative = 0
    for user, seq in enumerate(train):
        for position in range(1, len(seq)):
            prefix = torch.from_numpy(seq[:position])[None]
            sums = table.dense(table.newest(prefix))[0]
            sums[0], sums[prefix[0]] = -1.0, -1.0  # padding and seen items are never targets
            top = int(got.items[got.offsets[user] + position - 1][0])
            assert sums[top] == sums.max()
            informative += int(sums.max() > 0)
    assert informative > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[SASRec, Path]:
    model = hybrid(seed=3)
    with torch.no_grad():  # a gate that varies with the session, as a trained one does
        model.covisit_gate.weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("hybrid") / "teacher.onnx"
    assert export_onnx(model, path, "teacher") < 1e-4
    return model, path


def test_the_exported_hybrid_scores_as_torch_does_given_the_covisit_input(
    exported: tuple[SASRec, Path],
) -> None:
    model, path = exported
    seq = left_pad([s[:-1] for s in TRAIN[:5]], 6)
    cands = np.tile(np.arange(1, 11), (5, 1))
    sums = index().covisit_sums(seq, cands, RECENT)
    assert (sums > 0).any()
    got = OnnxScorer(path).score(seq, cands, sums)
    with torch.no_grad():
        want = model.score(*map(torch.from_numpy, (seq, cands, sums))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(got, OnnxScorer(path).score(seq, cands, np.zeros_like(sums)))


def test_serving_feeds_a_hybrid_the_sums_of_its_own_index(exported: tuple[SASRec, Path]) -> None:
    _, path = exported
    served_index = index()
    scorer = OnnxScorer(path, covisit=served_index)
    seq = left_pad([s[:-1] for s in TRAIN[:5]], 6)
    cands = np.tile(np.arange(1, 11), (5, 1))
    explicit = OnnxScorer(path).score(seq, cands, served_index.covisit_sums(seq, cands, RECENT))
    np.testing.assert_allclose(scorer.score(seq, cands), explicit, atol=1e-6)
    # Online co-visitation (the flow's observe) reaches the hybrid's scores.
    before = scorer.score(seq[:1], cands[:1])
    newest, stranger = int(seq[0, -1]), int(cands[0, -1])
    for _ in range(20):
        served_index.observe(newest, stranger)
    after = scorer.score(seq[:1], cands[:1])
    assert after[0, -1] > before[0, -1]
    assert (after[0, :-1] <= before[0, :-1] + 1e-6).all()  # others may only lose a slot


def test_a_hybrid_scorer_without_an_index_says_what_to_give_it(
    exported: tuple[SASRec, Path],
) -> None:
    _, path = exported
    with pytest.raises(ArtifactError, match="candidate index"):
        OnnxScorer(path).score(np.array([[1, 2]]), np.array([[3, 4]]))


def test_pruning_a_hybrid_keeps_its_gate_on_the_kept_dimensions() -> None:
    from streamrec.model.prune import Importance, PruneConfig, prune

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=N_ITEMS, max_len=6, d_model=16, covisit_recent=RECENT))
    model.covisit_table = CovisitTable.build(TRAIN, N_ITEMS, RECENT)
    with torch.no_grad():
        model.covisit_gate.weight.normal_()
    c = model.cfg
    dims = torch.arange(c.d_model, dtype=torch.float32)  # the last dimensions matter most
    imp = Importance([torch.ones(c.d_ff)] * c.n_blocks, [torch.ones(c.n_heads)] * c.n_blocks, dims)
    small = prune(model, imp, PruneConfig(dim_keep=0.5))
    kept = torch.arange(c.d_model // 2, c.d_model)
    assert small.hybrid and small.covisit_table is model.covisit_table
    assert torch.equal(small.covisit_gate.weight, model.covisit_gate.weight[:, kept])
    assert torch.equal(small.covisit_gate.bias, model.covisit_gate.bias)


def test_calibration_feeds_of_a_hybrid_carry_the_sums_serving_would_give() -> None:
    from streamrec.model.export import calibration_feeds

    histories = [s[:-1] for s in TRAIN[:6]]
    candidates = [np.arange(1, 9) for _ in histories]
    served = index()
    [feed] = calibration_feeds(histories, candidates, 6, covisit=served, covisit_recent=RECENT)
    want = served.covisit_sums(feed["items"], feed["candidates"], RECENT)
    np.testing.assert_array_equal(feed["covisit"], want)
    assert "covisit" not in calibration_feeds(histories, candidates, 6)[0]


def test_the_recommender_serves_a_hybrid_with_the_covisitation_it_observes(
    exported: tuple[SASRec, Path], tmp_path: Path
) -> None:
    import orjson

    from streamrec.model.data import Vocab
    from streamrec.model.manifest import seal
    from streamrec.model.serving import Recommender

    _, path = exported
    (tmp_path / "teacher.onnx").write_bytes(path.read_bytes())
    (tmp_path / "card.json").write_bytes(
        orjson.dumps({"chosen": "teacher", "variants": [{"name": "teacher", "onnx": path.name}]})
    )
    Vocab([str(i) for i in range(1, N_ITEMS)]).save(tmp_path / "vocab.json")
    index().save(tmp_path / "candidates.npz")
    seal(tmp_path)  # artifacts made by hand, sealed as `streamrec model seal` would
    rec = Recommender.load(tmp_path, candidates=N_ITEMS - 1)
    session = ["1", "2", "3"]
    [before] = rec.recommend([session], k=N_ITEMS)
    last = before[-1][0]  # the item the hybrid likes least
    for _ in range(200):
        rec.observe("3", last)  # the flow sees it follow item 3 again and again
    [after] = rec.recommend([session], k=N_ITEMS)
    assert dict(after)[last] > dict(before)[last]
    assert [item for item, _ in after].index(last) < len(after) - 1
