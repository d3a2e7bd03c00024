"""Every variant scored as served, and the card's rows from those scores.

``rank_targets`` ranks each point's target in the catalogue through a scoring
function (a baseline's, or an ONNX model's through ``OnnxScorer``); ``variant_rows``
turns the ranks into each variant's card row: NDCG@10 and HR@10 with bootstrap
intervals (users resampled), paired differences against its parent, and an int8
variant's agreement with its fp32 source.  ``check_targets`` reads the rows against
the issue's targets.  Candidate recall and scoring latency are measured here too.

>>> points = EvalSet([np.array([1]), np.array([2])], np.array([2, 1]), np.array([0, 1]))
>>> scores = np.array([[0.0, 0.9, 0.8, 0.1], [0.0, 0.1, 0.9, 0.5]])  # item 0 is padding
>>> rank_targets(lambda histories: scores, points).tolist()  # seen items are out of the ranking
[0, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamrec.model.baselines import Covisit, Popular
from streamrec.model.bench import Call, baseline_calls, interleaved, onnx_calls
from streamrec.model.candidates import CandidateIndex, recall_at
from streamrec.model.card import Agreement, Delta, K, Latency, Paired, Recall, Target, VariantRow
from streamrec.model.data import PAD, EvalSet, left_pad
from streamrec.model.export import agreement
from streamrec.model.metrics import Interval, bootstrap, hit_at, ndcg_at, target_ranks
from streamrec.model.serving import OnnxScorer

BASELINES = ("popular", "covisit")


@dataclass(slots=True)
class Variant:
    """One variant while it is measured: its size and file, then its ranks and latency."""

    name: str
    parent: str | None  # the variant its row is compared with
    params: int
    bytes: int
    onnx: Path | None = None  # baselines have none
    source: str | None = None  # the fp32 variant an int8 one was quantized from
    parity: float | None = None  # exported models: largest |ONNX - torch| score
    int8_fp32_matmuls: list[str] | None = None  # int8 variants: the MatMuls kept in fp32
    scores_loo: np.ndarray | None = None  # [points, n_items], kept for agreement checks
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # by protocol
    latency: Latency | None = None


def rank_targets(
    score_all: Callable[[list[np.ndarray]], np.ndarray],
    points: EvalSet,
    keep: list[np.ndarray] | None = None,
    batch: int = 64,
) -> np.ndarray:
    """Each point's target rank among every item (``streamrec.model.metrics.target_ranks``);
    ``keep`` collects the scores as float32."""
    ranks = []
    for lo in range(0, len(points), batch):
        part = points.subset(np.arange(lo, min(lo + batch, len(points))))
        scores = score_all(part.histories)
        if keep is not None:
            keep.append(scores.astype(np.float32))
        ranks.append(target_ranks(scores, part.histories, part.targets))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def onnx_score_all(scorer: OnnxScorer, n_items: int) -> Callable[[list[np.ndarray]], np.ndarray]:
    """Scores of the whole catalogue for each session, through the served scorer."""
    everything = np.arange(n_items, dtype=np.int64)

    def score(histories: list[np.ndarray]) -> np.ndarray:
        items = left_pad(histories, scorer.max_len)
        return scorer.score(
            items, np.ascontiguousarray(np.broadcast_to(everything, (len(histories), n_items)))
        )

    return score


def onnx_score_candidates(
    scorer: OnnxScorer, n_items: int, candidates: list[np.ndarray]
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """Full-width scores, finite only at each point's candidates (points come in order)."""
    served = iter(candidates)

    def score(histories: list[np.ndarray]) -> np.ndarray:
        cands = [next(served) for _ in histories]
        width = max(len(c) for c in cands)
        matrix = np.zeros((len(cands), width), dtype=np.int64)
        for r, c in enumerate(cands):
            matrix[r, : len(c)] = c
        part = scorer.score(left_pad(histories, scorer.max_len), matrix)
        full = np.full((len(cands), n_items), -np.inf, dtype=np.float32)
        for r, c in enumerate(cands):
            full[r, c] = part[r, : len(c)]
        return full

    return score


def candidate_recall(
    index: CandidateIndex,
    protocols: dict[str, EvalSet],
    recall_sizes: Sequence[int],
    serve_candidates: int,
) -> tuple[list[Recall], dict[str, list[np.ndarray]]]:
    """Recall of the index at every size, and each point's served candidates, by protocol."""
    recall = []
    served: dict[str, list[np.ndarray]] = {}
    for c in recall_sizes:
        by_protocol = {}
        for proto, points in protocols.items():
            cands = [
                cand
                for lo in range(0, len(points), 64)
                for cand in index.candidates(
                    [
                        h if len(h) else np.zeros(0, np.int64)
                        for h in points.histories[lo : lo + 64]
                    ],
                    c,
                )
            ]
            by_protocol[proto] = recall_at(cands, points.targets)
            if c == serve_candidates:
                served[proto] = cands
        recall.append(Recall(c, by_protocol))
    for proto, points in protocols.items():
        if proto not in served:
            served[proto] = [
                cand
                for lo in range(0, len(points), 64)
                for cand in index.candidates(points.histories[lo : lo + 64], serve_candidates)
            ]
    return recall, served


def scoring_latency(
    variants: Sequence[Variant],
    index: CandidateIndex,
    popular: Popular,
    covisit: Covisit,
    sessions: list[np.ndarray],
    cands: list[np.ndarray],
    session_length: int,
) -> dict[str, Latency]:
    """Per-event scoring latency of every variant at batch 1 and 32, on one thread."""
    suites: dict[tuple[str, str], tuple[list[Call], int]] = {}
    for v in variants:
        if v.onnx is None:
            score = (popular if v.name == "popular" else covisit).score
            for batch in (1, 32):
                suites[v.name, f"b{batch}"] = (baseline_calls(score, sessions, cands, batch), batch)
            continue
        scorer = OnnxScorer(v.onnx, threads=1, covisit=index)
        for batch in (1, 32):
            suites[v.name, f"b{batch}"] = (onnx_calls(scorer, sessions, cands, batch), batch)
        if scorer.max_len > session_length:
            # What serving it in the flow costs: sessions there hold at most session_length.
            suites[v.name, "b1_at_session_length"] = (
                onnx_calls(scorer, sessions, cands, 1, max_len=session_length),
                1,
            )
    # The suites' names and order are what interleaved shuffles: as they always were.
    medians = interleaved(
        {f"{name}/ms_per_event_{key}": suite for (name, key), suite in suites.items()}
    )
    return {
        v.name: Latency(
            medians[f"{v.name}/ms_per_event_b1"],
            medians[f"{v.name}/ms_per_event_b32"],
            medians.get(f"{v.name}/ms_per_event_b1_at_session_length"),
        )
        for v in variants
    }


def variant_rows(
    variants: dict[str, Variant], protocols: dict[str, EvalSet], n_boot: int
) -> list[VariantRow]:
    """The card's row of every variant, in order (``f``: ``streamrec.model.card.choose``)."""
    ndcg = {v.name: {p: ndcg_at(v.ranks[p], K) for p in protocols} for v in variants.values()}
    hr = {v.name: {p: hit_at(v.ranks[p], K) for p in protocols} for v in variants.values()}
    loo, stream = protocols["loo"], protocols["stream"]
    rows = []
    for v in variants.values():
        assert v.latency is not None, f"{v.name}: latency not measured"
        row = VariantRow(
            name=v.name,
            parent=v.parent,
            val_ndcg=float(ndcg_at(v.ranks["valid"], K).mean()),
            ndcg=_interval(ndcg[v.name]["loo"], loo, n_boot),
            hr=_interval(hr[v.name]["loo"], loo, n_boot),
            stream_ndcg=_interval(ndcg[v.name]["stream"], stream, n_boot),
            stream_hr=_interval(hr[v.name]["stream"], stream, n_boot),
            vs_parent=_paired(ndcg, v.name, v.parent, protocols, n_boot) if v.parent else None,
            vs_baselines=(
                {b: _paired(ndcg, v.name, b, protocols, n_boot) for b in BASELINES}
                if v.name == "teacher"
                else None
            ),
            params=v.params,
            bytes=v.bytes,
            int8_fp32_matmuls=v.int8_fp32_matmuls,
            latency=v.latency,
            onnx=v.onnx.name if v.onnx else None,
            onnx_parity_max_abs=v.parity,
            agreement=None,
        )
        if v.source:
            row.agreement = _agreement(v, variants[v.source], row, ndcg, loo)
        rows.append(row)
    return rows


def _interval(values: np.ndarray, points: EvalSet, n_boot: int) -> Interval:
    return bootstrap(values, points.users, n_boot=n_boot, seed=0)


def _paired(
    ndcg: dict[str, dict[str, np.ndarray]],
    name: str,
    other: str,
    protocols: dict[str, EvalSet],
    n_boot: int,
) -> Paired:
    """``name``'s NDCG@10 minus ``other``'s, point by point (a paired bootstrap)."""
    deltas = {}
    for proto, points in protocols.items():
        iv = _interval(ndcg[name][proto] - ndcg[other][proto], points, n_boot)
        deltas[proto] = Delta(iv.mean, iv.lo, iv.hi)
    return Paired(deltas["loo"], deltas["stream"])


def _agreement(
    v: Variant,
    source: Variant,
    row: VariantRow,
    ndcg: dict[str, dict[str, np.ndarray]],
    loo: EvalSet,
) -> Agreement:
    """How an int8 variant's leave-one-out scores and NDCG@10 follow its fp32 source's."""
    assert source.scores_loo is not None and v.scores_loo is not None
    a = agreement(_masked(source.scores_loo, loo), _masked(v.scores_loo, loo), K)
    src_ndcg = float(ndcg[source.name]["loo"].mean())
    stream_src = float(ndcg[source.name]["stream"].mean())
    return Agreement(
        source=source.name,
        top_overlap=a[f"top{K}_overlap"],
        score_mae=a["score_mae"],
        score_max_error=a["score_max_error"],
        score_mae_relative=a["score_mae_relative"],
        ndcg_relative_change=(row.ndcg.mean - src_ndcg) / src_ndcg if src_ndcg else 0.0,
        stream_ndcg_relative_change=(
            (row.stream_ndcg.mean - stream_src) / stream_src if stream_src else 0.0
        ),
    )


def _masked(scores: np.ndarray, points: EvalSet) -> np.ndarray:
    """Scores with padding and each session's seen items out, as serving ranks them."""
    masked = scores.copy()
    masked[:, PAD] = -np.inf
    for r, h in enumerate(points.histories):
        masked[r, h] = -np.inf
    return masked


def int8_student(rows: Sequence[VariantRow], chosen: str) -> VariantRow:
    """The served variant if it is int8, else the int8 variant with the lowest f."""
    by_name = {r.name: r for r in rows}
    if "int8" in chosen:
        return by_name[chosen]
    return min((r for r in rows if "int8" in r.name), key=lambda r: np.inf if r.f is None else r.f)


def check_targets(rows: Sequence[VariantRow], chosen: str) -> list[Target]:
    """The issue's targets, checked on the int8 student: the served one, else the best by f."""
    t = next(r for r in rows if r.name == "teacher")
    student = int8_student(rows, chosen)
    name = student.name
    served = "served" if name == chosen else f"not served: f chose {chosen}"
    assert t.vs_baselines is not None and student.agreement is not None
    beats = {b: t.vs_baselines[b].loo for b in BASELINES}
    speedup = t.latency.b1 / student.latency.b1
    at_flow = t.latency.b1_at_session_length
    flow_teacher = t.latency.b1 if at_flow is None else at_flow
    kept = student.ndcg.mean / t.ndcg.mean if t.ndcg.mean else 0.0
    agree = student.agreement
    return [
        Target(
            "teacher beats popular and covisit on NDCG@10 beyond the 95% interval",
            all(d.lo > 0 for d in beats.values()),
            ", ".join(
                f"vs {b}: {d.delta:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}]" for b, d in beats.items()
            ),
        ),
        Target(
            "served int8 student ≥ 10× faster per event than the fp32 teacher "
            "(same candidates, batch 1, one thread)",
            name == chosen and speedup >= 10.0,
            f"{name} ({served}): {speedup:.1f}× against the teacher at its full "
            f"context; {flow_teacher / student.latency.b1:.1f}× against the teacher "
            "given the flow's session length",
        ),
        Target(
            "served int8 student keeps ≥ 95% of the teacher's NDCG@10",
            name == chosen and kept >= 0.95,
            f"{name} ({served}): {kept:.1%} ({student.ndcg.mean:.4f} vs {t.ndcg.mean:.4f})",
        ),
        Target(
            "int8 vs its fp32 source: NDCG@10 within 1% relative, top-10 overlap ≥ 0.9",
            abs(agree.ndcg_relative_change) <= 0.01 and agree.top_overlap >= 0.9,
            f"{name} vs {agree.source}: NDCG@10 "
            f"{agree.ndcg_relative_change:+.2%} (stream "
            f"{agree.stream_ndcg_relative_change:+.2%}), top-10 overlap "
            f"{agree.top_overlap:.3f}",
        ),
    ]
