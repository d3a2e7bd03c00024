"""The candidate index: what it proposes, what it never proposes, and its online updates."""

from pathlib import Path

import numpy as np

from model.candidates import PAD, CandidateIndex, recall_at


def index(width: int = 4) -> CandidateIndex:
    sequences = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([5, 6])]
    return CandidateIndex.build(sequences, n_items=8, item_vectors=np.eye(8, 4), width=width)


def test_co_visited_items_come_first() -> None:
    assert index().candidates([np.array([1])], 3)[0][0] == 2


def test_seen_items_and_padding_are_never_candidates() -> None:
    [cands] = index().candidates([np.array([1, 2, 3])], 7)
    assert not set(cands.tolist()) & {PAD, 1, 2, 3}
    assert len(cands) == len(set(cands.tolist())) == 4  # every unseen item, once


def test_empty_history_gets_popular_items() -> None:
    [cands] = index().candidates([np.zeros(0, dtype=np.int64)], 2)
    assert cands.tolist() == [1, 2]  # the two most interacted-with items


def test_observe_counts_popularity_and_co_visitation() -> None:
    idx = index()
    for _ in range(5):
        idx.observe(7, 5)
    assert idx.popular(1).tolist() == [5]
    assert idx.candidates([np.array([7])], 1)[0].tolist() == [5]


def test_a_full_neighbour_table_evicts_its_weakest_entry() -> None:
    idx = index(width=1)  # room for one neighbour per item
    assert idx.neighbours[5, 0] == 6
    idx.observe(5, 7)  # 7 inherits the evicted count + 1 (Space-Saving)
    assert idx.neighbours[5, 0] == 7


def test_index_survives_a_save_and_load(tmp_path: Path) -> None:
    idx = index()
    idx.save(tmp_path / "c.npz")
    again = CandidateIndex.load(tmp_path / "c.npz")
    h = [np.array([1]), np.array([5, 6])]
    assert [c.tolist() for c in again.candidates(h, 3)] == [
        c.tolist() for c in idx.candidates(h, 3)
    ]


def test_a_sessions_candidates_do_not_depend_on_its_batch() -> None:
    idx = index()
    alone = idx.candidates([np.array([1])], 4)[0].tolist()
    batched = idx.candidates([np.array([1]), np.array([2, 3, 4, 5, 6, 7])], 4)[0].tolist()
    assert batched == alone


def test_recall_counts_targets_inside_their_candidate_sets() -> None:
    assert recall_at([np.array([1, 2]), np.array([3])], np.array([2, 4])) == 0.5
