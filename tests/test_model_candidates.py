"""The candidate index: what it proposes, what it never proposes, and its online updates."""

from pathlib import Path

import numpy as np
import pytest

from streamrec.model.candidates import PAD, CandidateIndex, Excluded, nearest_items, recall_at


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


def random_index(
    n_items: int = 120, dim: int = 8, seed: int = 0, **kwargs: float
) -> CandidateIndex:
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, n_items, rng.integers(2, 30)) for _ in range(60)]
    vectors = rng.normal(size=(n_items, dim)).astype(np.float32)
    idx = CandidateIndex.build(sequences, n_items, vectors, width=10)
    for name, value in kwargs.items():
        setattr(idx, name, value)
    return idx


def random_sessions(n_items: int, count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items, rng.integers(0, 40)) for _ in range(count)]


def test_batch_invariance_holds_on_a_larger_index() -> None:
    idx = random_index()
    sessions = random_sessions(idx.n_items, 40)
    alone = [idx.candidates([s], 50)[0].tolist() for s in sessions]
    for size in (3, 8, 40):
        batched = [
            c.tolist()
            for lo in range(0, len(sessions), size)
            for c in idx.candidates(sessions[lo : lo + size], 50)
        ]
        assert batched == alone


def test_candidates_are_distinct_unseen_items() -> None:
    idx = random_index()
    sessions = random_sessions(idx.n_items, 40)
    for session, cands in zip(sessions, idx.candidates(sessions, 80), strict=True):
        assert len(cands) == 80 == len(set(cands.tolist()))
        assert not set(cands.tolist()) & {PAD, *session.tolist()}


def test_nearest_items_are_the_top_of_the_exact_product() -> None:
    vectors = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    table = nearest_items(vectors, width=7)
    sims = vectors @ vectors.T
    for item in range(1, 50):
        others = [j for j in range(1, 50) if j != item]
        exact = sorted(others, key=lambda j: -sims[item, j])[:7]
        assert sorted(table[item].tolist()) == sorted(exact)
    assert not table[PAD].any()  # padding has no neighbours


def test_a_full_width_table_ranks_like_a_full_scan() -> None:
    # Nearest items only (no co-visitation share): with every item in every item's
    # table, the pool is the whole catalogue, so the ranking is the exact product's.
    idx = random_index(covisit_share=0.0, nn_share=1.0)
    idx.similar = nearest_items(idx.item_vectors, width=idx.n_items)
    for session in random_sessions(idx.n_items, 10, seed=3):
        if not len(session):
            continue
        newest = session[::-1][: idx.recent]
        recency = 0.7 ** np.arange(len(newest), dtype=np.float32)  # the newest counts most
        query = (recency[:, None] * idx.item_vectors[newest]).sum(axis=0)
        scores = idx.item_vectors @ query
        unseen = [i for i in range(1, idx.n_items) if i not in set(session.tolist())]
        exact = sorted(unseen, key=lambda i: (-scores[i], i))[:20]
        assert idx.candidates([session], 20)[0].tolist() == exact


def test_an_index_saved_before_the_nearest_items_table_still_loads(tmp_path: Path) -> None:
    idx = random_index()
    np.savez_compressed(  # the format before the table was saved with the index
        tmp_path / "old.npz",
        neighbours=idx.neighbours.astype(np.int32),
        neighbour_weights=idx.neighbour_weights,
        popularity=idx.popularity,
        item_vectors=idx.item_vectors.astype(np.float16),
    )
    idx.save(tmp_path / "new.npz")
    old, new = CandidateIndex.load(tmp_path / "old.npz"), CandidateIndex.load(tmp_path / "new.npz")
    sessions = random_sessions(idx.n_items, 10)
    assert [c.tolist() for c in old.candidates(sessions, 30)] == [
        c.tolist() for c in new.candidates(sessions, 30)
    ]


def test_the_popular_list_keeps_up_with_observed_interactions() -> None:
    idx = random_index(n_items=1100)  # more items than the cached top list (1000) holds
    rng = np.random.default_rng(4)
    for step in range(1500):
        # Micro-batches of one to 20 events, some items counted twice in one: popular
        # items move up the list, rarely seen ones enter it and push its last item out.
        hot = idx.popular(20).tolist()
        for _ in range((1, 1, 1, 2, 5, 9, 20)[step % 7]):
            item = hot[int(rng.integers(0, 20))] if rng.random() < 0.3 else rng.integers(1, 1100)
            idx.observe(PAD, int(item))
        top = idx.popular(1000)
        assert len(set(top.tolist())) == 1000
        assert idx.popularity[top].tolist() == np.sort(idx.popularity)[::-1][:1000].tolist()


def test_excluded_items_are_never_candidates_and_rows_stay_full() -> None:
    idx = random_index()
    sessions = [s for s in random_sessions(idx.n_items, 20) if len(s)]
    rng = np.random.default_rng(5)
    # Some rows exclude nothing, some a few items, one almost the whole catalogue.
    excluded = [rng.choice(np.arange(1, idx.n_items), size, replace=False) for size in (0, 5, 90)]
    excluded += [np.zeros(0, dtype=np.int64)] * (len(sessions) - len(excluded))
    rows = np.repeat(np.arange(len(sessions)), [len(e) for e in excluded])
    batch = idx.candidate_batch(sessions, 20, Excluded(rows, np.concatenate(excluded)))
    for session, gone, cands, count in zip(
        sessions, excluded, batch.items, batch.counts, strict=True
    ):
        proposed = cands[:count].tolist()
        assert not set(proposed) & {PAD, *session.tolist(), *gone.tolist()}
        unseen_left = idx.n_items - 1 - len(set(session.tolist()) | set(gone.tolist()))
        assert count == len(set(proposed)) == min(20, unseen_left)


def test_rows_without_exclusions_are_unchanged_by_others_in_the_batch() -> None:
    idx = random_index()
    sessions = [s for s in random_sessions(idx.n_items, 8) if len(s)]
    plain = idx.candidate_batch(sessions, 30).items
    others = Excluded(np.zeros(50, dtype=np.int64), np.arange(1, 51))  # row 0 excludes 1..50
    batch = idx.candidate_batch(sessions, 30, others).items
    assert (batch[1:] == plain[1:]).all()
    assert not set(batch[0].tolist()) & set(range(1, 51))


def test_co_visitation_sums_come_with_the_candidates_as_computed_apart() -> None:
    idx = random_index()
    sessions = [s for s in random_sessions(idx.n_items, 12) if len(s)]
    batch = idx.candidate_batch(sessions, 40, covisit_recent=idx.recent)
    longest = max(len(s) for s in sessions)
    items = np.zeros((len(sessions), longest), dtype=np.int64)
    for row, session in enumerate(sessions):
        items[row, longest - len(session) :] = session
    apart = idx.covisit_sums(items, batch.items, idx.recent)
    assert batch.covisit is not None and batch.covisit.dtype == np.float32
    assert np.allclose(batch.covisit, apart)
    assert batch.covisit.any()  # not trivially zero
    assert idx.candidate_batch(sessions, 40).covisit is None  # only when asked for


def decaying_index(half_life: int, n_items: int = 120) -> CandidateIndex:
    idx = random_index(n_items)
    return CandidateIndex(
        idx.neighbours,
        idx.neighbour_weights,
        idx.popularity,
        idx.item_vectors,
        similar=idx.similar,
        half_life=half_life,
    )


def test_counts_halve_every_half_life() -> None:
    idx = decaying_index(half_life=100)
    before = idx.counts(np.arange(idx.n_items))
    idx.observe(PAD, 7)  # ages the counts by one event, then counts 7
    for _ in range(100):
        idx.observe(PAD, PAD)  # every event ages the counts, one of no known item too
    expected = before * 2.0 ** (-101 / 100)
    expected[7] += 0.5  # counted a half-life ago
    assert np.allclose(idx.counts(np.arange(idx.n_items)), expected)


def test_decay_lets_a_burst_fade_and_steady_items_take_its_place() -> None:
    idx = decaying_index(half_life=1000)
    for _ in range(5000):
        idx.observe(PAD, 7)  # a burst: item 7 is the most popular by far
    assert idx.popular(1).tolist() == [7]
    for step in range(20_000):  # then steady traffic: items 1 to 3, a little of 4, no 7
        idx.observe(PAD, 4 if step % 10 == 0 else 1 + step % 3)
    top = idx.popular(5).tolist()
    assert set(top[:3]) == {1, 2, 3} and top[3:] == [4, 7]  # 7 only ahead of the unseen
    assert idx.counts(np.array([7]))[0] < 5000 * 2.0**-19  # 20 half-lives later


def test_without_a_half_life_counts_never_decay() -> None:
    idx = decaying_index(half_life=0)
    before = idx.counts(np.arange(idx.n_items)).copy()
    for _ in range(1000):
        idx.observe(PAD, 7)
    before[7] += 1000
    assert np.array_equal(idx.counts(np.arange(idx.n_items)), before)


def test_folding_the_decay_unit_back_changes_no_count_and_no_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folded, kept = decaying_index(half_life=50), decaying_index(half_life=50)
    monkeypatch.setattr("streamrec.model.candidates.RENORMALISE_AT", 4.0)  # every 100 events
    rng = np.random.default_rng(6)
    for _ in range(1000):
        prev, item = (int(i) for i in rng.integers(1, folded.n_items, 2))
        folded.observe(prev, item)
    monkeypatch.setattr("streamrec.model.candidates.RENORMALISE_AT", 2.0**300)
    rng = np.random.default_rng(6)
    for _ in range(1000):
        prev, item = (int(i) for i in rng.integers(1, kept.n_items, 2))
        kept.observe(prev, item)
    assert folded.unit < 4.0 < kept.unit
    everything = np.arange(folded.n_items)
    assert np.allclose(folded.counts(everything), kept.counts(everything))
    sessions = [s for s in random_sessions(folded.n_items, 10) if len(s)]
    assert [c.tolist() for c in folded.candidates(sessions, 20)] == [
        c.tolist() for c in kept.candidates(sessions, 20)
    ]


def test_co_visitation_sums_read_decayed_counts(tmp_path: Path) -> None:
    # A hybrid model takes these sums as input: they must be counts, whatever the unit.
    plain, decaying = random_index(), decaying_index(half_life=10)
    sessions = [s for s in random_sessions(plain.n_items, 12) if len(s)]
    longest = max(len(s) for s in sessions)
    items = np.zeros((len(sessions), longest), dtype=np.int64)
    for row, session in enumerate(sessions):
        items[row, longest - len(session) :] = session
    candidates = plain.candidate_batch(sessions, 40).items
    for _ in range(30):
        decaying.observe(PAD, PAD)  # three half-lives, nothing new counted
    sums = decaying.covisit_sums(items, candidates, decaying.recent)
    assert np.allclose(sums, plain.covisit_sums(items, candidates, plain.recent) / 8, rtol=1e-4)
    batch = decaying.candidate_batch(sessions, 40, covisit_recent=decaying.recent)
    read = [decaying.reads(s, 40, 0, decaying.recent) for s in sessions]
    taken = decaying.candidate_batch(sessions, 40, covisit_recent=decaying.recent, reads=read)
    assert batch.covisit is not None and taken.covisit is not None
    assert np.allclose(batch.covisit, taken.covisit)
    decaying.save(tmp_path / "saved.npz")  # counts, not units: a reload reads the same
    reloaded = CandidateIndex.load(tmp_path / "saved.npz")
    assert np.allclose(reloaded.covisit_sums(items, candidates, reloaded.recent), sums, rtol=1e-4)
