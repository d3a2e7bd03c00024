"""Splitting the event stream: leave-one-out, streaming, and what may be trained on."""

import numpy as np

from streamrec.contracts import Event
from streamrec.model.data import PAD, Split, Vocab, left_pad, split_events


def events(rows: list[tuple[str, str, int]]) -> list[Event]:
    ordered = sorted(rows, key=lambda r: r[2])
    return [Event(f"e{n}", u, i, "view", ts) for n, (u, i, ts) in enumerate(ordered)]


def items_of(split: Split, seq: np.ndarray) -> list[str]:
    return [split.vocab.decode(int(i)) for i in seq]


def test_last_item_is_test_and_the_one_before_is_validation() -> None:
    # User "v" trains on every item, so the vocabulary knows them all.
    rows = [("v", f"i{t}", t) for t in range(7)] + [("u", f"i{t}", 10 + t) for t in range(5)]
    s = split_events(events(rows), stream_fraction=0.0)
    u = s.users.index("u")
    assert items_of(s, s.train[u]) == ["i0", "i1", "i2"]
    row = list(s.loo_valid.users).index(u)
    assert items_of(s, s.loo_valid.histories[row]) == ["i0", "i1", "i2"]
    assert items_of(s, s.loo_valid.targets[row : row + 1]) == ["i3"]
    assert items_of(s, s.loo_test.histories[row]) == ["i0", "i1", "i2", "i3"]
    assert items_of(s, s.loo_test.targets[row : row + 1]) == ["i4"]


def test_final_stretch_is_never_trained_on_and_every_late_event_is_a_stream_point() -> None:
    rows = [("a", f"a{t}", t) for t in range(10)] + [("b", f"b{t}", 100 + t) for t in range(10)]
    s = split_events(events(rows), stream_fraction=0.25)  # the last 5 of 20 events
    assert s.cutoff_ts == 105
    b = s.users.index("b")
    assert items_of(s, s.train[b]) == ["b0", "b1", "b2", "b3", "b4"]
    assert len(s.train[s.users.index("a")]) == 8  # the last two are held out
    assert len(s.stream_test) == 5
    assert [len(h) for h in s.stream_test.histories] == [5, 5, 5, 5, 5]  # later items are cold


def test_items_first_seen_after_training_are_cold_targets() -> None:
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "new", 4)]
    s = split_events(events(rows), stream_fraction=0.0)
    assert "new" not in s.vocab.items
    assert s.loo_test.targets.tolist() == [PAD]


def test_unknown_items_encode_to_padding() -> None:
    v = Vocab(["x", "y"])
    assert v.encode_many(["x", "zzz", "y"]).tolist() == [1, PAD, 2]
    assert v.size == 3


def test_left_pad_right_aligns_and_keeps_the_newest() -> None:
    out = left_pad([np.array([1, 2, 3]), np.array([4])], max_len=2)
    assert out.tolist() == [[2, 3], [0, 4]]
