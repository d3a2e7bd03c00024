"""The model card: each variant's accuracy, size and speed, the choice by ``f``, two plots.

The served variant minimises ``f = α·T + (1−α)·(1−quality)`` among the
variants that can be served (those exported to ONNX), where ``T`` is the
variant's per-event latency (batch 1, one thread) relative to the teacher's
and ``quality`` its validation NDCG@10 (each user's second-to-last
interaction) relative to the teacher's: the test points report on the choice
but do not make it.

>>> teacher = objective(10.0, 0.1, reference_ms=10.0, reference_ndcg=0.1, alpha=0.5)
>>> small = objective(0.5, 0.097, reference_ms=10.0, reference_ndcg=0.1, alpha=0.5)
>>> teacher, round(small, 3)  # the small one is chosen: 20x faster, 3% less accurate
(0.5, 0.04)

``Card`` and the row types below are what ``card.json`` holds; their ``as_dict``
writes the document (keys in the order readers and past cards have them), and
``markdown`` and the plots read that document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from streamrec.model.metrics import Interval

CARD_JSON = "card.json"
CARD_MD = "card.md"
FRONTIER_PNG = "frontier.png"
CURVES_PNG = "learning_curves.png"
VERSION = 1
K = 10  # the cut-off of every ranking metric on the card


@dataclass(frozen=True, slots=True)
class Delta:
    """A paired difference of NDCG@10 between two variants, with its 95% interval."""

    delta: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True, slots=True)
class Paired:
    """``Delta`` under each protocol: leave-one-out and streaming."""

    loo: Delta
    stream: Delta

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"loo": self.loo.as_dict(), "stream": self.stream.as_dict()}


@dataclass(frozen=True, slots=True)
class Agreement:
    """An int8 variant against its fp32 source (``streamrec.model.export.agreement``; NDCG@10)."""

    source: str
    top_overlap: float  # of the top K items
    score_mae: float
    score_max_error: float
    score_mae_relative: float  # to the spread of the fp32 scores
    ndcg_relative_change: float  # leave-one-out
    stream_ndcg_relative_change: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            f"top{K}_overlap": self.top_overlap,
            "score_mae": self.score_mae,
            "score_max_error": self.score_max_error,
            "score_mae_relative": self.score_mae_relative,
            "ndcg_relative_change": self.ndcg_relative_change,
            "stream_ndcg_relative_change": self.stream_ndcg_relative_change,
        }


@dataclass(frozen=True, slots=True)
class Latency:
    """Median ms per event of the scoring call alone, one thread (``streamrec.model.bench``)."""

    b1: float
    b32: float
    # A model with a longer context than the flow's sessions: its cost at their length.
    b1_at_session_length: float | None = None

    def as_dict(self) -> dict[str, float]:
        out = {"ms_per_event_b1": self.b1, "ms_per_event_b32": self.b32}
        if self.b1_at_session_length is not None:
            out["ms_per_event_b1_at_session_length"] = self.b1_at_session_length
        return out


@dataclass(slots=True)
class VariantRow:
    """One variant's row: accuracy under both protocols, size, speed, and ``f``."""

    name: str
    parent: str | None  # the variant it is compared with (``vs_parent``)
    val_ndcg: float  # validation: what ``f`` reads
    ndcg: Interval  # leave-one-out, with its 95% interval
    hr: Interval
    stream_ndcg: Interval
    stream_hr: Interval
    vs_parent: Paired | None
    vs_baselines: dict[str, Paired] | None  # the teacher's only
    params: int
    bytes: int
    int8_fp32_matmuls: list[str] | None  # int8 variants: the MatMuls kept in fp32
    latency: Latency
    onnx: str | None  # the file, while it is shipped; baselines have none
    onnx_parity_max_abs: float | None  # exported models: ONNX against torch
    agreement: Agreement | None  # int8 variants
    f: float | None = None  # set by ``choose``

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "parent": self.parent}
        row[f"val_ndcg@{K}"] = self.val_ndcg
        for prefix, ndcg, hr in (
            ("", self.ndcg, self.hr),
            ("stream_", self.stream_ndcg, self.stream_hr),
        ):
            for key, iv in ((f"ndcg@{K}", ndcg), (f"hr@{K}", hr)):
                row[prefix + key] = iv.mean
                row[prefix + key + "_ci"] = [iv.lo, iv.hi]
        if self.vs_parent is not None:
            row["vs_parent"] = {"parent": self.parent, **self.vs_parent.as_dict()}
        if self.vs_baselines is not None:
            row["vs_baselines"] = {b: p.as_dict() for b, p in self.vs_baselines.items()}
        row.update(params=self.params, bytes=self.bytes)
        if self.int8_fp32_matmuls is not None:
            row["int8_fp32_matmuls"] = self.int8_fp32_matmuls
        row.update(self.latency.as_dict())
        row["onnx"] = self.onnx
        if self.onnx_parity_max_abs is not None:
            row["onnx_parity_max_abs"] = self.onnx_parity_max_abs
        if self.agreement is not None:
            row["agreement"] = self.agreement.as_dict()
        if self.f is not None:
            row["f"] = self.f
        return row


@dataclass(frozen=True, slots=True)
class Protocol:
    """How many test points a protocol evaluated, of how many, and what they are."""

    points: int
    of: int
    description: str
    fraction: float | None = None  # streaming: the final stretch's share of the events

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"points": self.points, "of": self.of}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class Recall:
    """The share of targets among the first ``c`` candidates, by protocol."""

    c: int
    by_protocol: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"C": self.c, **self.by_protocol}


@dataclass(frozen=True, slots=True)
class EndMetric:
    """The chosen variant's NDCG@10 scoring only its ``c`` candidates vs the whole catalogue."""

    c: int
    loo_candidates: float
    loo_full: float
    stream_candidates: float
    stream_full: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "C": self.c,
            "loo_candidates": self.loo_candidates,
            "loo_full": self.loo_full,
            "stream_candidates": self.stream_candidates,
            "stream_full": self.stream_full,
        }


@dataclass(frozen=True, slots=True)
class Candidates:
    """The candidate index: recall, cost, and what scoring candidates only costs in NDCG."""

    recall: list[Recall]
    ms_per_event: float  # candidate generation, batch 1
    ms_per_event_b32: float
    end_metric: EndMetric
    sources: str = "co-visitation, embedding neighbours, popular"

    def as_dict(self) -> dict[str, Any]:
        return {
            "recall": [r.as_dict() for r in self.recall],
            "sources": self.sources,
            "ms_per_event": self.ms_per_event,
            "ms_per_event_b32": self.ms_per_event_b32,
            "end_metric": self.end_metric.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Target:
    """One of the issue's targets, checked."""

    target: str
    met: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "met": self.met, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """The run's time budget, threads and early-stopping points, and the budget used."""

    minutes: float | None
    threads: int
    early_stop_points: int
    used_fraction: float | None = None  # only with a budget

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "minutes": self.minutes,
            "threads": self.threads,
            "early_stop_points": self.early_stop_points,
        }
        if self.used_fraction is not None:
            out["used_fraction"] = self.used_fraction
        return out


@dataclass(frozen=True, slots=True)
class Environment:
    """The versions and the CPU the card was measured with."""

    torch: str
    onnxruntime: str
    python: str
    cpu: str

    def as_dict(self) -> dict[str, str]:
        return {
            "torch": self.torch,
            "onnxruntime": self.onnxruntime,
            "python": self.python,
            "cpu": self.cpu,
        }


@dataclass(frozen=True, slots=True)
class Dataset:
    """The dataset trained on, and how the split came out."""

    name: str
    path: str
    summary: dict[str, int]  # ``streamrec.model.data.Split.summary``

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, **self.summary}


@dataclass(frozen=True, slots=True)
class Card:
    """The whole card; ``as_dict`` is what ``card.json`` holds."""

    dataset: Dataset
    quick: bool
    seed: int
    alpha: float
    chosen: str  # the served variant
    variants: list[VariantRow]
    protocols: dict[str, Protocol]  # "loo" and "stream"
    candidates: Candidates
    # The sections below come from other modules' records, as they write them.
    training: dict[str, dict[str, Any]]  # each fit's ``streamrec.model.train.FitReport.summary``
    pruning: dict[str, int | float]  # ``streamrec.model.prune.describe``
    config: dict[str, Any]  # the configs as trained: shapes, training, distillation, pruning
    environment: Environment
    command: str
    int8: str  # the int8 student shipped (the served one, else the best by f)
    targets: list[Target]
    notes: list[str]
    search: dict[str, Any]  # ``streamrec.model.search.SearchResult.record``
    budget: BudgetUse
    timings_s: dict[str, float]  # seconds by stage, and the total

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "dataset": self.dataset.as_dict(),
            "quick": self.quick,
            "seed": self.seed,
            "alpha": self.alpha,
            "chosen": self.chosen,
            "variants": [v.as_dict() for v in self.variants],
            "protocols": {name: p.as_dict() for name, p in self.protocols.items()},
            "candidates": self.candidates.as_dict(),
            "training": self.training,
            "pruning": self.pruning,
            "config": self.config,
            "environment": self.environment.as_dict(),
            "command": self.command,
            "int8": self.int8,
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
            "search": self.search,
            "budget": self.budget.as_dict(),
            "timings_s": self.timings_s,
        }


def objective(
    ms_per_event: float, val_ndcg: float, reference_ms: float, reference_ndcg: float, alpha: float
) -> float:
    """``f`` of one variant against the reference (the teacher); lower is better."""
    t = ms_per_event / reference_ms
    quality = val_ndcg / reference_ndcg if reference_ndcg > 0 else 0.0
    return alpha * t + (1.0 - alpha) * (1.0 - quality)


def choose(rows: list[VariantRow], alpha: float, reference: str = "teacher") -> str:
    """Name of the servable variant with the lowest ``f``; sets every row's ``f``."""
    ref = next(r for r in rows if r.name == reference)
    for row in rows:
        row.f = objective(row.latency.b1, row.val_ndcg, ref.latency.b1, ref.val_ndcg, alpha)
    servable = [r for r in rows if r.onnx]
    return min(servable, key=lambda r: math.inf if r.f is None else r.f).name


def write(out_dir: Path, card: Card) -> None:
    """``card.json``, ``card.md`` and the two plots, all read from the one document."""
    document = card.as_dict()
    (out_dir / CARD_JSON).write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (out_dir / CARD_MD).write_text(markdown(document), encoding="utf-8")
    plot_frontier(document, out_dir / FRONTIER_PNG)
    plot_learning_curves(document, out_dir / CURVES_PNG)


def _ci(row: dict[str, Any], key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def _delta(row: dict[str, Any]) -> str:
    vs = row.get("vs_parent")
    if not vs:
        return "–"
    d = vs["loo"]
    return f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] vs {vs['parent']}"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def markdown(card: dict[str, Any]) -> str:
    rows = card["variants"]
    lines = [
        f"# Model card — {card['dataset']['name']}",
        "",
        f"Served variant: **{card['chosen']}**, chosen by f = α·T + (1−α)·(1−quality) with "
        f"α = {card['alpha']} (T: latency at batch 1 relative to the teacher; quality: "
        "validation NDCG@10, each user's second-to-last interaction, relative to the teacher; "
        "the test columns report on the choice but do not make it)."
        + (
            ""
            if card["int8"] == card["chosen"]
            else f" The int8 student shipped beside it, for comparison: **{card['int8']}**."
        ),
        "",
        "Full-ranking metrics over all items, seen items excluded, ties pessimistic; "
        "95% bootstrap intervals (users resampled). LOO: each user's last interaction"
        + (
            f" ({card['protocols']['loo']['points']} of {card['protocols']['loo']['of']} users, "
            "a fixed random subset). "
            if card["protocols"]["loo"].get("of", 0) > card["protocols"]["loo"]["points"]
            else ". "
        )
        + f"Stream: {card['protocols']['stream']['points']} next-item predictions in the final "
        f"{card['protocols']['stream']['fraction']:.0%} of time.",
        "",
        "| variant | NDCG@10 LOO | HR@10 LOO | NDCG@10 stream | HR@10 stream | Δ NDCG@10 LOO "
        "vs parent | params | size | ms/event b1 | ms/event b32 | NDCG@10 val | f |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = f"{r['f']:.3f}" if "f" in r else "–"
        name = f"**{r['name']}**" if r["name"] == card["chosen"] else r["name"]
        lines.append(
            f"| {name} | {_ci(r, 'ndcg@10')} | {_ci(r, 'hr@10')} | {_ci(r, 'stream_ndcg@10')} | "
            f"{_ci(r, 'stream_hr@10')} | {_delta(r)} | {r['params']:,} | {_size(r['bytes'])} | "
            f"{r['ms_per_event_b1']:.3f} | {r['ms_per_event_b32']:.3f} | "
            f"{r['val_ndcg@10']:.4f} | {f} |"
        )
    lines += ["", "## Quantization agreement with the fp32 source", ""]
    lines += ["| variant | source | top-10 overlap | score MAE (rel.) | NDCG@10 change |"]
    lines += ["|---|---|---|---|---|"]
    for r in rows:
        a = r.get("agreement")
        if a:
            lines.append(
                f"| {r['name']} | {a['source']} | {a['top10_overlap']:.3f} | "
                f"{a['score_mae']:.4f} ({a['score_mae_relative']:.3f}) | "
                f"{a['ndcg_relative_change']:+.2%} |"
            )
    cand = card["candidates"]
    lines += ["", "## Candidates", ""]
    lines += ["| C | recall@C LOO | recall@C stream |", "|---|---|---|"]
    for c in cand["recall"]:
        lines.append(f"| {c['C']} | {c['loo']:.3f} | {c['stream']:.3f} |")
    e = cand["end_metric"]
    lines += [
        "",
        f"{card['chosen']} scoring its {e['C']} candidates vs the full catalogue: NDCG@10 LOO "
        f"{e['loo_candidates']:.4f} vs {e['loo_full']:.4f}, stream {e['stream_candidates']:.4f} "
        f"vs {e['stream_full']:.4f}. Candidate generation: {cand['ms_per_event']:.3f} ms/event "
        f"at batch 1, {cand['ms_per_event_b32']:.3f} at batch 32.",
        "",
        "## Targets",
        "",
    ]
    for t in card["targets"]:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']} — {t['detail']}")
    lines += _training(card)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    lines += ["", f"Command: `{card['command']}`", ""]
    return "\n".join(lines)


def _training(card: dict[str, Any]) -> list[str]:
    """How each model was trained and why it stopped; the teacher's search; the budget."""
    config, training = card.get("config", {}), card.get("training", {})
    lines = ["", "## Training", ""]
    if "loss_rule" in config:
        lines += [f"Loss: {config['loss_rule']}.", ""]
    budget = card.get("budget")
    if budget:
        minutes = budget.get("minutes")
        used = budget.get("used_fraction")
        lines += [
            (f"Time budget: {minutes:g} min, {used:.0%} used" if minutes else "No time budget")
            + f"; {budget['threads']} threads; early stopping on "
            f"{budget['early_stop_points']} validation points.",
            "",
        ]
    configs = {
        "teacher": config.get("teacher_train", {}),
        "student_nokd": config.get("student_train", {}),
        "student": config.get("student_train", {}),
        "student_pruned": config.get("finetune", {}),
    }
    lines += [
        "| model | loss | batch | lr | best epoch / run | stopped by | s/epoch | sequences/s "
        "| validation NDCG@10 by epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in training.items():
        c = configs.get(name, {})
        curve = ", ".join(f"{v:.4f}" for v in t.get("val_curve", []))
        lines.append(
            f"| {name} | {c.get('loss', '–')} | {c.get('batch_size', '–')} | "
            f"{c.get('lr', '–')} | {t['best_epoch']} / {t['epochs_run']} | "
            f"{t.get('stopped', '–')} | {t.get('s_per_epoch', '–')} | "
            f"{t.get('sequences_per_s', '–')} | {curve} |"
        )
    lines += ["", f"Learning curves, against the baselines' validation NDCG@10: {CURVES_PNG}."]
    search = card.get("search")
    if search:
        lines += [
            "",
            "Teacher search (each trial from the same initialisation, judged on the validation "
            f"points): the winner, **{search['winner']}**, then trained on from its best trial "
            "epoch, as the table above shows (best epoch 0: no further epoch beat the trial).",
            "",
            "| trial | validation NDCG@10 | epochs | stopped by | s |",
            "|---|---|---|---|---|",
        ]
        for t in search["trials"]:
            if "skipped" in t:
                lines.append(f"| {t['candidate']} | skipped: {t['skipped']} | | | |")
                continue
            lines.append(
                f"| {t['candidate']} | {t['val_ndcg@10']:.4f} | {t['epochs_run']} | "
                f"{t['stopped']} | {t['seconds']} |"
            )
    return lines


def plot_frontier(card: dict[str, Any], path: Path) -> None:
    """Speed/accuracy plane: per-event latency (log) vs NDCG@10, the Pareto frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in card["variants"] if r["ms_per_event_b1"] > 0]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        kind = "baseline" if not r.get("onnx") and r["name"] in ("popular", "covisit") else "model"
        marker = "*" if r["name"] == card["chosen"] else ("s" if kind == "baseline" else "o")
        ax.scatter(
            r["ms_per_event_b1"], r["ndcg@10"], marker=marker, s=140 if marker == "*" else 50
        )
        lo, hi = r.get("ndcg@10_ci", [r["ndcg@10"]] * 2)
        ax.vlines(r["ms_per_event_b1"], lo, hi, alpha=0.3)
        ax.annotate(
            r["name"],
            (r["ms_per_event_b1"], r["ndcg@10"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    frontier, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["ms_per_event_b1"]):
        if r["ndcg@10"] > best:
            frontier.append(r)
            best = r["ndcg@10"]
    ax.plot(
        [r["ms_per_event_b1"] for r in frontier],
        [r["ndcg@10"] for r in frontier],
        "--",
        alpha=0.5,
        label="Pareto frontier",
    )
    ax.set_xscale("log")
    ax.set_xlabel("scoring latency, ms per event (batch 1, one thread, 200 candidates)")
    ax.set_ylabel("NDCG@10 (leave-one-out, full ranking)")
    ax.set_title(f"{card['dataset']['name']}: speed/accuracy (★ served: {card['chosen']})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(card: dict[str, Any], path: Path) -> None:
    """Validation NDCG@10 by epoch of every trained model (the teacher's search trials
    dashed), with the baselines' validation NDCG@10 as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    search = card.get("search") or {}
    trials = [t for t in search.get("trials", []) if "val_curve" in t]
    for t in trials:
        curve = t["val_curve"]
        ax.plot(range(1, len(curve) + 1), curve, "x--", alpha=0.6, label=f"trial {t['candidate']}")
    # The teacher trains on from its winning trial's best epoch: its curve continues there.
    winner = next((t for t in trials if t["candidate"] == search.get("winner")), None)
    start = winner["best_epoch"] if winner else 0
    for name, info in card.get("training", {}).items():
        curve = info.get("val_curve", [])
        offset = start if name == "teacher" else 0
        ax.plot(range(offset + 1, offset + len(curve) + 1), curve, "o-", label=name)
    for row in card["variants"]:
        if row["name"] in ("popular", "covisit"):
            ax.axhline(row["val_ndcg@10"], color="grey", linestyle=":")
            ax.annotate(row["name"], (1, row["val_ndcg@10"]), fontsize=7, va="bottom")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"{card['dataset']['name']}: learning curves")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
