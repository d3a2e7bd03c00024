"""How good the demo's recommendations are on events the model never saw, and against what.

Three pieces, used by ``streamrec demo``:

- ``held_out``: the events after the model card's training cut-off (the
  streaming protocol's final stretch of time), the only ones whose online hit
  rate is not mostly in-sample;
- ``baseline_hit_rates``: the online hit rate of two baselines on the same
  events, computed in process (no Kafka): "popular" (the most popular unseen
  items as of each event) and "co-visitation" (the candidate index's
  co-visitation neighbours of the session's newest items), both with the
  flow's online updates of the index (the same rules: a repeat within the
  window never counts, and a ``UserQuota`` caps each user).  A hit is judged by
  ``streamrec.tools.latency.OnlineHitRate``, as for the served model;
- ``user_bootstrap``: a 95% interval for a hit rate, resampling users (a
  user's events are not independent of each other).

On a tiny hand-made stream (items a..d are indices 1..4; popularity in
training: c 3, b 2, a 1), "popular" answers c on the first event while
co-visitation answers b, the item seen right after a:

>>> from streamrec.model.candidates import CandidateIndex
>>> from streamrec.model.data import Vocab
>>> from streamrec.contracts import Event
>>> index = CandidateIndex.build(
...     [np.array([1, 2, 3]), np.array([2, 3]), np.array([3])], 5, np.eye(5, 2))
>>> stream = [Event(f"e{i}", "u1", item, "rating", i) for i, item in enumerate("abc")]
>>> rates = baseline_hit_rates(stream, index, Vocab(list("abcd")), k=1)
>>> {name: (stats.hits, stats.judged) for name, stats in rates.items()}
{'popular': (1, 2), 'co-visitation': (2, 2)}
>>> user_bootstrap({"u1": 1, "u2": 0}, {"u1": 2, "u2": 2}, resamples=200).point
0.25
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrec.contracts import Event, Recommendation, ScoredItem
from streamrec.model.candidates import RECENCY, CandidateIndex
from streamrec.model.data import PAD, Vocab
from streamrec.model.quota import UserQuota, is_repeat
from streamrec.tools.latency import ModelStats, OnlineHitRate

POPULAR = "popular"
COVISIT = "co-visitation"
BASELINES = (POPULAR, COVISIT)
# streamrec.model.pipeline.PipelineConfig.stream_fraction, for a card that does not record its own.
DEFAULT_STREAM_FRACTION = 0.1
RESAMPLES = 2000
SEED = 0


class CardError(ValueError):
    """The model card lacks what the held-out stretch or the comparison needs."""


@dataclass(frozen=True, slots=True)
class StreamProtocol:
    """What the model card says about its streaming protocol and its served variant."""

    fraction: float  # the final share of the events (by time) held out of training
    cutoff_ts: int | None  # the first held-out event time (ms), when the card records it
    chosen: str  # the variant the flow serves
    hr: float | None  # the chosen variant's offline stream HR@10
    hr_ci: tuple[float, float] | None

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> StreamProtocol:
        """The protocol of a card as ``streamrec.model.pipeline`` writes it (``card.json``)."""
        try:
            stream = card["protocols"]["stream"]
            chosen = str(card["chosen"])
        except (KeyError, TypeError) as err:
            raise CardError(
                f"the model card has no streaming protocol or chosen variant: {err}"
            ) from None
        cutoff = card.get("dataset", {}).get("cutoff_ts")
        variant: Mapping[str, Any] = next(
            (v for v in card.get("variants", ()) if v.get("name") == chosen), {}
        )
        ci = variant.get("stream_hr@10_ci")
        return cls(
            fraction=float(stream.get("fraction", DEFAULT_STREAM_FRACTION)),
            cutoff_ts=None if cutoff is None else int(cutoff),
            chosen=chosen,
            hr=variant.get("stream_hr@10"),
            hr_ci=None if ci is None else (float(ci[0]), float(ci[1])),
        )


def stream_cutoff(events: Sequence[Event], fraction: float) -> int:
    """The cut-off ``streamrec.model.data.split_events`` draws in time-ordered ``events`` (ms).

    >>> stream_cutoff([Event(f"e{i}", "u", "i", "view", 10 * i) for i in range(10)], 0.1)
    90
    """
    cut_at = min(len(events) - 1, int(len(events) * (1.0 - fraction)))
    return events[cut_at].ts if fraction > 0 else events[-1].ts + 1


@dataclass(frozen=True, slots=True)
class HeldOut:
    """The stretch of a time-ordered dataset after the training cut-off, and the part replayed."""

    cutoff_ts: int
    start: int  # position of the first event at or after the cut-off
    available: int  # events from there to the end
    asked: int  # events asked for
    # The cut-off recomputed from this data and the card's fraction; it differs from
    # ``cutoff_ts`` when the model was trained on other data.
    recomputed_ts: int

    @property
    def count(self) -> int:
        """Events replayed: the ones asked for, or all there are when fewer."""
        return min(self.asked, self.available)

    @property
    def short(self) -> bool:
        """Whether fewer events are held out than were asked for."""
        return self.available < self.asked


def held_out(events: Sequence[Event], protocol: StreamProtocol, count: int) -> HeldOut:
    """The first ``count`` of ``events`` (time-ordered) after the card's training cut-off.

    The card records the cut-off (``dataset.cutoff_ts``); a card without it gets the
    one the pipeline would draw on these events from the card's recorded fraction.
    Events at the cut-off time belong to the held-out stretch, as in ``split_events``.
    """
    if not events:
        raise CardError("the dataset holds no events")
    recomputed = stream_cutoff(events, protocol.fraction)
    cutoff = recomputed if protocol.cutoff_ts is None else protocol.cutoff_ts
    start = bisect.bisect_left(events, cutoff, key=lambda e: e.ts)
    return HeldOut(cutoff, start, len(events) - start, count, recomputed)


@dataclass(slots=True)
class _Session:
    known: list[int]  # item indices of the vocabulary, oldest first
    last_item: int = PAD  # the latest item, known or not: the ``prev_item`` of observe
    window: list[str] = field(default_factory=list)  # the last L item ids, known or not


Ranker = Callable[[CandidateIndex, np.ndarray, int], np.ndarray]


def popular_items(index: CandidateIndex, session: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most popular items not in ``session``, as the flow answers a cold session."""
    top = index.popular(k + len(session))
    return top[~np.isin(top, session)][:k]


def covisit_items(index: CandidateIndex, session: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` unseen items of highest co-visitation sum with the session's newest items.

    The sum is the candidate index's: the k-th newest item's neighbour weights
    count ``RECENCY**k``, over its ``recent`` newest items; ties go to the lower
    index.  Popular items fill a list the neighbours leave short.
    """
    newest = session[::-1][: index.recent]
    recency = RECENCY ** np.arange(len(newest), dtype=np.float32)
    sums = np.bincount(
        index.neighbours[newest].ravel(),
        (index.neighbour_weights[newest] * recency[:, None]).ravel(),
        minlength=index.n_items,
    )
    sums[PAD] = 0.0
    sums[session] = 0.0
    found = np.flatnonzero(sums > 0)
    top = found[np.argsort(-sums[found], kind="stable")][:k]
    if len(top) < k:
        top = np.concatenate([top, popular_items(index, np.concatenate([session, top]), k)])
    return top[:k]


RANKERS: dict[str, Ranker] = {POPULAR: popular_items, COVISIT: covisit_items}


def baseline_hit_rates(
    events: Sequence[Event],
    index: CandidateIndex,
    vocab: Vocab,
    k: int,
    warmup: Sequence[Event] = (),
    online: bool = True,
    quota: UserQuota | None = None,
    session_length: int = 50,
) -> dict[str, ModelStats]:
    """Each baseline's online hit rate@``k`` on ``events``, judged as ``streamrec.tools.latency``.

    Every event first updates its user's session (and, when ``online``, the
    index, as the flow's ``Recommender.learn`` does: not for a repeat within the
    last ``session_length`` items, nor past the user's ``quota``), then each
    baseline recommends ``k``
    items for it; a user's next event is a hit when its item is among them.
    ``warmup`` events only build sessions and counts, as the flow's warm-up
    does before the measured replay.  ``index`` is changed in place.
    """
    sessions: dict[str, _Session] = {}
    stats = {name: ModelStats(name, top_k=k) for name in RANKERS}
    judges = {name: OnlineHitRate() for name in RANKERS}

    def apply(event: Event) -> np.ndarray:
        session = sessions.setdefault(event.user_id, _Session([]))
        code = vocab.encode(event.item_id)
        window = session.window
        window.append(event.item_id)
        del window[:-session_length]
        counted = online and not is_repeat(window)
        if counted and (quota is None or quota.admit(event.user_id)):
            index.observe(session.last_item, code)
        session.last_item = code
        if code != PAD:
            session.known.append(code)
        return np.asarray(session.known, dtype=np.int64)

    for event in warmup:
        apply(event)
    for event in events:
        session = apply(event)
        for name, ranker in RANKERS.items():
            judges[name].on_event(event.user_id, event.event_id, event.item_id)
            items = [ScoredItem(vocab.decode(int(i)), 0.0) for i in ranker(index, session, k)]
            rec = Recommendation(event.event_id, event.user_id, items, name, event.ts, 0.0, 0.0)
            judges[name].on_answer(rec, stats[name])
    return stats


@dataclass(frozen=True, slots=True)
class Interval:
    """A hit rate and its bootstrap interval (users resampled)."""

    hits: int
    judged: int
    users: int
    point: float
    low: float
    high: float

    def describe(self) -> str:
        """One line, e.g. ``10.2% [7.9%, 12.8%] (510 of 5,000 events, 70 users)``."""
        if not self.judged:
            return "- (no event judged)"
        return (
            f"{self.point:.1%} [{self.low:.1%}, {self.high:.1%}] "
            f"({self.hits:,} of {self.judged:,} events, {self.users} users)"
        )


def user_bootstrap(
    hits_by_user: Mapping[str, int],
    judged_by_user: Mapping[str, int],
    resamples: int = RESAMPLES,
    level: float = 0.95,
    seed: int = SEED,
) -> Interval:
    """All hits over all judged events, with a percentile interval over resampled users.

    Each resample draws as many users as there are, with replacement, and
    takes their hits over their judged events: the ratio of sums, the same
    estimator as the point.  Seeded, so one run prints what the next does.
    """
    users = [u for u, n in judged_by_user.items() if n > 0]
    hits = np.array([hits_by_user.get(u, 0) for u in users], dtype=np.float64)
    judged = np.array([judged_by_user[u] for u in users], dtype=np.float64)
    if not users:
        return Interval(0, 0, 0, float("nan"), float("nan"), float("nan"))
    point = float(hits.sum() / judged.sum())
    rng = np.random.default_rng(seed)
    rates = np.empty(resamples)
    chunk = max(1, 1_000_000 // len(users))  # bounds memory to a million draws at a time
    for lo in range(0, resamples, chunk):
        picks = rng.integers(0, len(users), size=(min(chunk, resamples - lo), len(users)))
        rates[lo : lo + len(picks)] = hits[picks].sum(axis=1) / judged[picks].sum(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(rates, [tail, 100.0 - tail])
    return Interval(int(hits.sum()), int(judged.sum()), len(users), point, float(low), float(high))


def interval_of(stats: Sequence[ModelStats], seed: int = SEED) -> Interval:
    """The bootstrap interval of the hit rate of ``stats`` taken together (e.g. every model)."""
    hits: dict[str, int] = {}
    judged: dict[str, int] = {}
    for s in stats:
        for user, n in s.judged_by_user.items():
            judged[user] = judged.get(user, 0) + n
            hits[user] = hits.get(user, 0) + s.hits_by_user.get(user, 0)
    return user_bootstrap(hits, judged, seed=seed)
