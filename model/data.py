"""From a time-ordered event stream to item-index sequences, the vocabulary and the splits.

Two protocols share one training set, so neither leaks into the other:

* leave-one-out: per user, the last interaction is the test target and the one
  before it the validation target (early stopping); the rest may be trained on;
* streaming: every event of the final stretch of time (``stream_fraction`` of
  the events) is a test point, predicted from the user's session as it stood.

Training therefore uses each user's interactions that are neither one of their
last two nor inside the final stretch.  The vocabulary holds the items seen in
training: an item first seen later is cold (the models cannot score it; as a
target it counts as a miss for every variant alike).

>>> from streamrec.contracts import Event
>>> evs = [Event(f"e{i}", "u", f"i{i}", "view", 1000 * i) for i in range(6)]
>>> s = split_events(evs, stream_fraction=0.0)
>>> s.vocab.items, [t.tolist() for t in s.train], s.loo_test.targets.tolist()
(('i0', 'i1', 'i2', 'i3'), [[1, 2, 3, 4]], [0])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from streamrec.contracts import Event

PAD = 0  # item index 0 is padding and "unknown item"


class Vocab:
    """Item ids (strings) ↔ model indices 1..n; 0 is padding and any unknown item."""

    def __init__(self, items: Sequence[str]) -> None:
        self.items = tuple(items)
        self._index = {item: i + 1 for i, item in enumerate(self.items)}

    @property
    def size(self) -> int:
        """Rows of an embedding table over this vocabulary (padding included)."""
        return len(self.items) + 1

    def encode(self, item: str) -> int:
        return self._index.get(item, PAD)

    def encode_many(self, items: Iterable[str]) -> np.ndarray:
        index = self._index
        return np.fromiter((index.get(i, PAD) for i in items), dtype=np.int64)

    def decode(self, index: int) -> str:
        return self.items[index - 1]

    def save(self, path: Path) -> None:
        path.write_bytes(orjson.dumps({"items": list(self.items)}))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls.from_json(path.read_bytes())

    @classmethod
    def from_json(cls, data: bytes) -> Vocab:
        """The vocabulary ``save`` wrote, from its bytes."""
        return cls(tuple(orjson.loads(data)["items"]))


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Next-item test points: predict ``targets[i]`` from ``histories[i]`` (oldest first)."""

    histories: list[np.ndarray]  # known items only (unknown ones are invisible to every model)
    targets: np.ndarray  # item index, PAD when the target is cold (always a miss)
    users: np.ndarray  # user number of each point, for the per-user (cluster) bootstrap

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, idx: Sequence[int] | np.ndarray) -> EvalSet:
        return EvalSet([self.histories[i] for i in idx], self.targets[idx], self.users[idx])


@dataclass(frozen=True, slots=True)
class Split:
    vocab: Vocab
    users: list[str]
    train: list[np.ndarray]  # per user, the item indices that may be trained on, oldest first
    loo_valid: EvalSet
    loo_test: EvalSet
    stream_test: EvalSet
    cutoff_ts: int  # the final stretch starts here (event time, ms)

    def summary(self) -> dict[str, int]:
        return {
            "users": len(self.users),
            "items": len(self.vocab.items),
            "train_interactions": int(sum(len(t) for t in self.train)),
            "loo_test_points": len(self.loo_test),
            "stream_test_points": len(self.stream_test),
            "stream_cold_targets": int((self.stream_test.targets == PAD).sum()),
            "cutoff_ts": self.cutoff_ts,
        }


def split_events(events: Sequence[Event], stream_fraction: float = 0.1) -> Split:
    """Per-user sequences, vocabulary and both protocols' points from time-ordered ``events``."""
    if len(events) < 3:
        raise ValueError(f"need at least 3 events to split, got {len(events)}")
    cut_at = min(len(events) - 1, int(len(events) * (1.0 - stream_fraction)))
    cutoff_ts = events[cut_at].ts if stream_fraction > 0 else events[-1].ts + 1

    user_no: dict[str, int] = {}
    items: list[list[str]] = []
    times: list[list[int]] = []
    for e in events:
        u = user_no.setdefault(e.user_id, len(user_no))
        if u == len(items):
            items.append([])
            times.append([])
        items[u].append(e.item_id)
        times[u].append(e.ts)

    # Per user: how many leading interactions may be trained on.
    n_train = [
        min(max(len(seq) - 2, 0), int(np.searchsorted(np.asarray(ts), cutoff_ts, side="left")))
        for seq, ts in zip(items, times, strict=True)
    ]
    train_items = sorted({i for seq, n in zip(items, n_train, strict=True) for i in seq[:n]})
    vocab = Vocab(tuple(train_items))
    encoded = [vocab.encode_many(seq) for seq in items]
    train = [enc[:n] for enc, n in zip(encoded, n_train, strict=True)]

    def points(at: list[tuple[int, int]]) -> EvalSet:
        histories = [encoded[u][:t][encoded[u][:t] != PAD] for u, t in at]
        targets = np.array([encoded[u][t] for u, t in at], dtype=np.int64)
        return EvalSet(histories, targets, np.array([u for u, _ in at], dtype=np.int64))

    loo_users = [u for u, seq in enumerate(items) if len(seq) >= 3]
    stream_at = [
        (u, t)
        for u, ts in enumerate(times)
        for t in range(1, len(ts))
        if ts[t] >= cutoff_ts and stream_fraction > 0
    ]
    return Split(
        vocab=vocab,
        users=list(user_no),
        train=train,
        loo_valid=points([(u, len(items[u]) - 2) for u in loo_users]),
        loo_test=points([(u, len(items[u]) - 1) for u in loo_users]),
        stream_test=points(stream_at),
        cutoff_ts=cutoff_ts,
    )


def left_pad(histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """The newest ``max_len`` items of each history, right-aligned in a [B, L] int64 array.

    L is the longest (cut) history of the batch, at least 1: positions count from the
    right, so cutting the shared padding changes no score.
    """
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        tail = h[-width:]
        if len(tail):
            out[row, width - len(tail) :] = tail
    return out
