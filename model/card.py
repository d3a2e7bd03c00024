"""The model card: each variant's accuracy, size and speed, the choice by ``f``, two plots.

The served variant minimises ``f = α·T + (1−α)·(1−quality)`` among the
variants that can be served (those exported to ONNX), where ``T`` is the
variant's per-event latency (batch 1, one thread) relative to the teacher's
and ``quality`` its validation NDCG@10 (each user's second-to-last
interaction) relative to the teacher's: the test points report on the choice
but do not make it.

>>> rows = [{"name": "teacher", "val_ndcg@10": 0.1, "ms_per_event_b1": 10.0, "onnx": "t.onnx"},
...         {"name": "small", "val_ndcg@10": 0.097, "ms_per_event_b1": 0.5, "onnx": "s.onnx"}]
>>> choose(rows, alpha=0.5)
'small'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

CARD_JSON = "card.json"
CARD_MD = "card.md"
FRONTIER_PNG = "frontier.png"
CURVES_PNG = "learning_curves.png"


def objective(row: dict[str, Any], reference: dict[str, Any], alpha: float) -> float:
    """``f`` of one variant against the reference (the teacher); lower is better."""
    t = row["ms_per_event_b1"] / reference["ms_per_event_b1"]
    ref_quality = reference["val_ndcg@10"]
    quality = row["val_ndcg@10"] / ref_quality if ref_quality > 0 else 0.0
    return alpha * t + (1.0 - alpha) * (1.0 - quality)


def choose(rows: list[dict[str, Any]], alpha: float, reference: str = "teacher") -> str:
    """Name of the servable variant with the lowest ``f``; sets every row's ``f``."""
    ref = next(r for r in rows if r["name"] == reference)
    for row in rows:
        row["f"] = objective(row, ref, alpha)
    servable = [r for r in rows if r.get("onnx")]
    return str(min(servable, key=lambda r: r["f"])["name"])


def write(out_dir: Path, card: dict[str, Any]) -> None:
    (out_dir / CARD_JSON).write_bytes(
        orjson.dumps(card, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (out_dir / CARD_MD).write_text(markdown(card), encoding="utf-8")
    plot_frontier(card, out_dir / FRONTIER_PNG)
    plot_learning_curves(card, out_dir / CURVES_PNG)


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
