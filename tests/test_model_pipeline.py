"""`streamrec train --quick` end to end: a valid card, ONNX files, a working Recommender."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from tests.test_model_serving import REQUIRED, check_recommender  # noqa: E402


@pytest.fixture(scope="module")
def quick_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    from streamrec.model.cli import train_command

    out = tmp_path_factory.mktemp("model")
    result = CliRunner().invoke(
        train_command,
        ["--quick", "--out", str(out), "--seed", "1", "--time-budget", "5", "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    return out


def test_quick_run_writes_every_artifact(quick_artifacts: Path) -> None:
    names = {p.name for p in quick_artifacts.iterdir()}
    assert {"card.json", "card.md", "frontier.png", "vocab.json", "candidates.npz"} <= names
    assert "learning_curves.png" in names
    assert "teacher.onnx" in names
    card = json.loads((quick_artifacts / "card.json").read_text())
    assert f"{card['chosen']}.onnx" in names


def test_card_has_every_variant_with_both_protocols(quick_artifacts: Path) -> None:
    card = json.loads((quick_artifacts / "card.json").read_text())
    rows = {v["name"]: v for v in card["variants"]}
    assert {"popular", "covisit", "teacher", "student", "student_nokd", "student_pruned"} <= set(
        rows
    )
    assert any(name.endswith("int8_dynamic") for name in rows)
    assert any(name.endswith("int8_static") for name in rows)
    for row in rows.values():
        assert set(row) >= REQUIRED
        assert 0.0 <= row["ndcg@10"] <= 1.0 and 0.0 <= row["stream_ndcg@10"] <= 1.0
        lo, hi = row["ndcg@10_ci"]
        assert lo <= row["ndcg@10"] <= hi
    assert rows["student_pruned"]["params"] < rows["student"]["params"] < rows["teacher"]["params"]
    assert card["chosen"] in rows and 0.0 <= card["alpha"] <= 1.0
    assert [c["C"] for c in card["candidates"]["recall"]]


def test_int8_variants_report_agreement_with_their_source(quick_artifacts: Path) -> None:
    card = json.loads((quick_artifacts / "card.json").read_text())
    for row in card["variants"]:
        if "int8" in row["name"]:
            assert 0.0 <= row["agreement"]["top10_overlap"] <= 1.0
            assert row["agreement"]["source"] in row["name"]


def test_quick_artifacts_serve(quick_artifacts: Path) -> None:
    check_recommender(quick_artifacts)


def test_training_seals_every_file_serving_reads(quick_artifacts: Path) -> None:
    from streamrec.model.manifest import MANIFEST_FILE, served_files, verify

    card = json.loads((quick_artifacts / "card.json").read_text())
    manifest = verify(quick_artifacts)
    assert sorted(manifest.digests) == sorted(served_files(card))
    assert f"{card['chosen']}.onnx" in manifest.digests
    listed = json.loads((quick_artifacts / MANIFEST_FILE).read_text())["files"]
    assert all(not Path(name).is_absolute() and ".." not in name for name in listed)


def test_training_is_reproducible() -> None:
    import numpy as np

    from streamrec.model.data import EvalSet
    from streamrec.model.sasrec import SASRec, SASRecConfig
    from streamrec.model.train import TrainConfig, fit

    train = [np.array([1, 2, 3, 4, 5, 6]), np.array([2, 3, 4, 5]), np.array([6, 5, 4, 3])]
    valid = EvalSet([np.array([1, 2])], np.array([3]), np.array([0]))
    cfg = TrainConfig(epochs=2, batch_size=2, warmup_steps=1)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SASRec(SASRecConfig(n_items=7, max_len=4, d_model=8, n_heads=2, head_dim=4, d_ff=8))
        fit(model, train, valid, cfg, seed=0, name="repro")
        weights.append(model.item_emb.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_pruning_removes_rows_and_columns() -> None:
    import numpy as np

    from streamrec.model.prune import PruneConfig, importance, prune
    from streamrec.model.sasrec import SASRec, SASRecConfig
    from streamrec.model.train import TrainConfig, batches, training_windows

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=9, max_len=5, d_model=16, n_heads=2, head_dim=8, d_ff=32))
    train = [np.array([1, 2, 3, 4, 5, 6, 7, 8])]
    rng = np.random.default_rng(0)
    sample = batches(train, training_windows(train, 5, rng), 2, rng, None)
    small = prune(model, importance(model, sample, TrainConfig(), None), PruneConfig())
    assert small.cfg.d_model == 12 and small.cfg.d_ff == 16 and small.cfg.n_heads == 1
    assert small.block_list()[0].ffn.up.weight.shape == (16, 12)
    assert small.score(torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])).shape == (1, 2)


def test_train_help_explains_the_options() -> None:
    from click.testing import CliRunner

    from streamrec.model.cli import train_command

    result = CliRunner().invoke(train_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--data", "--out", "--quick", "--alpha", "--seed", "--time-budget", "--threads"):
        assert option in result.output


def test_the_card_records_the_search_the_budget_and_why_training_stopped(
    quick_artifacts: Path,
) -> None:
    card = json.loads((quick_artifacts / "card.json").read_text())
    assert card["budget"]["minutes"] == 5.0 and card["budget"]["threads"] == 1
    trials = card["search"]["trials"]
    assert card["search"]["winner"] in {t["candidate"] for t in trials}
    assert card["config"]["teacher_train"]["lr"] == float(card["search"]["winner"].split()[0][3:])
    for name in ("teacher", "student_nokd", "student", "student_pruned"):
        assert card["training"][name]["stopped"] in {"patience", "deadline", "epochs"}
    assert "uniform negatives" in card["config"]["loss_rule"]
    markdown = (quick_artifacts / "card.md").read_text()
    assert "## Training" in markdown and card["search"]["winner"] in markdown


def test_the_loss_follows_the_catalogue_size() -> None:
    from streamrec.model.pipeline import loss_for

    assert loss_for(10_000, softmax_max_items=10_000) == "softmax"
    assert loss_for(10_001, softmax_max_items=10_000) == "sampled"


def test_batch_sizes_follow_the_number_of_training_windows() -> None:
    import numpy as np

    from streamrec.model.pipeline import QUICK, for_data

    few = [np.arange(1, 6)] * 40
    many = [np.arange(1, 6)] * 40_000
    small, large = for_data(QUICK, few, 10, seed=0), for_data(QUICK, many, 20_000, seed=0)
    assert small.teacher_train.batch_size == 16 and small.teacher_train.loss == "softmax"
    assert large.teacher_train.batch_size == QUICK.teacher_train.batch_size
    assert large.student_train.loss == large.finetune.loss == "sampled"


def test_the_progress_bar_shows_the_time_left_of_a_budget() -> None:
    from streamrec.model.budget import Budget
    from streamrec.model.pipeline import BUDGET_SHARES, Progress

    progress = Progress(Budget(600.0, BUDGET_SHARES))
    progress.stage("load")
    assert "left of the budget" in progress.bar.postfix
    progress.close()


def test_the_teacher_grows_a_block_per_doubling_of_training_windows() -> None:
    from streamrec.model.pipeline import teacher_blocks

    assert teacher_blocks(8192, base=3, windows_per_block=8192) == 3
    assert teacher_blocks(2 * 8192, base=3, windows_per_block=8192) == 4
    assert teacher_blocks(4 * 8192, base=3, windows_per_block=8192) == 5
    assert teacher_blocks(2**40, base=3, windows_per_block=8192, most=3) == 6


def test_many_training_windows_deepen_the_teacher_and_never_the_students() -> None:
    import numpy as np

    from streamrec.model.pipeline import FULL, for_data

    few = [np.arange(1, 6)] * 40
    many = [np.arange(1, 6)] * 40_000
    small, large = for_data(FULL, few, 10, seed=0), for_data(FULL, many, 20_000, seed=0)
    assert small.teacher.n_blocks == FULL.teacher.n_blocks
    assert large.teacher.n_blocks > FULL.teacher.n_blocks
    assert large.student == small.student == FULL.student


def test_the_students_take_the_teachers_covisitation_input() -> None:
    from streamrec.model.pipeline import FULL, QUICK

    for cfg in (FULL, QUICK):
        assert cfg.student.covisit_recent == cfg.teacher.covisit_recent > 0


def test_the_teacher_holds_at_least_half_of_a_time_budget() -> None:
    from streamrec.model.pipeline import BUDGET_SHARES

    assert sum(BUDGET_SHARES.values()) == pytest.approx(1.0)
    assert BUDGET_SHARES["teacher"] >= 0.5
