"""The committed artifacts in model/artifacts load and serve, with numpy and onnxruntime alone."""

import re
from pathlib import Path

import numpy as np
import pytest

from streamrec.item_hashes import item_hashes
from streamrec.model.serving import ArtifactError, Recommender, read_card
from streamrec.settings import Settings

ARTIFACTS = Settings().model_dir
REQUIRED = {"name", "ndcg@10", "hr@10", "params", "bytes", "ms_per_event_b1", "ms_per_event_b32"}


def known_items(rec: Recommender, n: int) -> list[str]:
    return list(rec.vocab.items[:n])


def check_recommender(artifacts: Path) -> None:
    """The serving contract, shared by the committed artifacts and a fresh --quick run."""
    rec = Recommender.load(artifacts)
    assert re.fullmatch(r"[\w.]+@[0-9a-f]{8}", rec.version)
    history = known_items(rec, 5)

    [top] = rec.recommend([history], k=10)
    assert len(top) == 10
    assert not {item for item, _ in top} & set(history)
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)

    [with_unknown] = rec.recommend([[*history, "no-such-item"]], k=10)
    assert [i for i, _ in with_unknown] == [i for i, _ in top]  # unknown items are invisible

    cold = rec.recommend([[], ["no-such-item"]], k=5)
    popular = [item for item, _ in cold[0]]
    assert len(popular) == 5 and [item for item, _ in cold[1]] == popular

    batch = [known_items(rec, n) for n in range(1, 66)]  # 65 sessions: more than one call
    tops = rec.recommend(batch, k=3)
    assert len(tops) == 65 and all(len(t) == 3 for t in tops)
    assert all(not {i for i, _ in t} & set(h) for t, h in zip(tops, batch, strict=True))
    assert rec.recommend([history], k=10)[0] == top

    # A session's answer does not depend on the sessions batched with it (fp32 and static
    # int8; dynamic int8 takes its activation scales from the whole batch, so only nearly).
    fp32 = Recommender.load(artifacts, variant="teacher")
    [alone] = fp32.recommend([history], k=10)
    [batched, _] = fp32.recommend([history, known_items(rec, 60)], k=10)
    assert [i for i, _ in batched] == [i for i, _ in alone]
    assert [s for _, s in batched] == pytest.approx([s for _, s in alone], rel=1e-4, abs=1e-4)

    rec.observe(None, history[0])
    rec.observe(history[0], history[1])  # online counts: cheap, no error

    card = read_card(artifacts)
    names = {v["name"] for v in card["variants"]}
    assert {"popular", "covisit", "teacher", card["chosen"]} <= names
    assert all(set(v) >= REQUIRED for v in card["variants"])
    assert Recommender.load(artifacts, variant="teacher").version.startswith("teacher@")
    not_shipped = next(v["name"] for v in card["variants"] if not v.get("onnx"))
    with pytest.raises(ArtifactError, match="servable here"):
        Recommender.load(artifacts, variant=not_shipped)


def test_committed_artifacts_load_and_serve() -> None:
    assert (ARTIFACTS / "card.json").exists(), f"no trained artifacts in {ARTIFACTS}"
    check_recommender(ARTIFACTS)


def test_committed_artifacts_are_small() -> None:
    total = sum(f.stat().st_size for f in ARTIFACTS.iterdir() if f.is_file())
    assert total < 30e6


def test_missing_artifacts_say_how_to_train(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="streamrec train"):
        Recommender.load(tmp_path)


def test_scores_for_a_batch_are_numbers() -> None:
    rec = Recommender.load(ARTIFACTS)
    [[(_, score), *_]] = rec.recommend([known_items(rec, 3)], k=2)
    assert np.isfinite(score)


def test_consumed_items_are_never_recommended_and_the_per_user_lookup_changes_nothing() -> None:
    rec = Recommender.load(ARTIFACTS)
    fresh = Recommender.load(ARTIFACTS)  # looks every user's hashes up anew
    history = known_items(rec, 5)
    [top] = rec.recommend([history], k=10)
    consumed = np.zeros(0, dtype=np.uint64)
    # The user consumes what they were offered, one item per event: their record grows
    # by appends (the cached codes by one lookup each), then is cut (a session restart).
    steps = [item for item, _ in top] + ["no-such-item"]
    records = [item_hashes(steps[: n + 1]) for n in range(len(steps))] + [item_hashes(steps[:1])]
    for consumed in records:
        [cached] = rec.recommend([history], k=10, exclude=[consumed], users=["u1"])
        [anew] = fresh.recommend([history], k=10, exclude=[consumed])
        assert [i for i, _ in cached] == [i for i, _ in anew]
        assert len(cached) == 10
        assert not {item_hashes([i])[0] for i, _ in cached} & set(consumed.tolist())
