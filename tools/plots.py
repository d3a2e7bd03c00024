"""The PNG plots of `streamrec latency`, `streamrec bench e2e` and `streamrec bench memory`.

matplotlib is imported inside each function (with the file-only Agg backend)
so that commands which do not plot start fast and work without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

    from streamrec.tools.latency import LatencyHistogram, LatencyStats

# Percentiles the distribution plot samples, denser towards the tail.
_TAIL_FRACTIONS = np.logspace(0, -5, 400)  # 1 - percentile/100, from 0 % to 99.999 %
_SCATTER_POINTS = 20_000


def _figure(width: float = 8.0, height: float = 5.0) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plain_numbers(axis: Axis) -> None:
    """ "200" rather than "2 x 10^2" on a log axis: these are milliseconds and rates."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # Between decades only 2 and 5 are labelled, or the labels run into each other.
    axis.set_minor_formatter(
        FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else "")
    )


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _distribution(histogram: LatencyHistogram) -> tuple[np.ndarray, np.ndarray]:
    percentiles = [float(p) for p in 100.0 * (1.0 - _TAIL_FRACTIONS)]
    at = histogram.histogram.get_percentile_to_value_dict(percentiles)
    xs = np.array([1.0 / max(1.0 - p / 100.0, 1e-6) for p in percentiles])
    ys = np.array([at.get(p, 0) / 1000.0 for p in percentiles])
    return xs, ys


def plot_latency_cdf(stats: LatencyStats, path: Path, title: str = "") -> Path:
    """Latency by percentile (HDR style: the tail stretched out), total and per stage."""
    figure = _figure()
    ax = figure.subplots()
    stages = [(name, stats.stage(name)) for name in ("queueing", "processing", "output")]
    for name, histogram in [("total", stats.total), *stages]:
        if histogram.count:
            xs, ys = _distribution(histogram)
            ax.plot(xs, ys, label=name, linewidth=2.0 if name == "total" else 1.0)
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10_000, 100_000]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlim(1, 1.0 / max(1.0 / max(stats.matched, 1), 1e-5))
    ax.set_yscale("log")
    _plain_numbers(ax.yaxis)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or f"event → recommendation latency ({stats.matched:,} matched)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(figure, path)


def plot_latency_over_time(stats: LatencyStats, path: Path, title: str = "") -> Path:
    """Each latency at its receipt time, with the per-second p50 and p99 drawn over it."""
    figure = _figure(9.0, 4.5)
    ax = figure.subplots()
    if stats.matched:
        t = (np.asarray(stats.receipt_ms) - min(stats.receipt_ms)) / 1000.0
        lat = np.maximum(np.asarray(stats.latency_ms), 1e-3)
        step = max(1, len(t) // _SCATTER_POINTS)
        ax.scatter(t[::step], lat[::step], s=2, alpha=0.3, color="tab:gray", label="latency")
        seconds = np.floor(t).astype(int)
        edges = np.unique(seconds)
        for q, color in ((50, "tab:blue"), (99, "tab:red")):
            per_second = [np.percentile(lat[seconds == s], q) for s in edges]
            ax.plot(edges + 0.5, per_second, color=color, label=f"p{q} per second")
    ax.set_yscale("log")
    _plain_numbers(ax.yaxis)
    ax.set_xlabel("seconds since the first recommendation")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or "latency over time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    return _save(figure, path)


def plot_latency_vs_throughput(
    runs: Sequence[dict[str, Any]], path: Path, targets_ms: Sequence[float] = (20.0, 50.0)
) -> Path:
    """p50 (dashed) and p99 (solid) against achieved rate, one colour per variant."""
    figure = _figure()
    ax = figure.subplots()
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    for index, variant in enumerate(variants):
        points = sorted(
            (r for r in runs if r["variant"] == variant and r.get("matched")),
            key=lambda r: r["offered_rate"],
        )
        if not points:
            continue
        color = f"C{index}"
        x = [r["achieved_rate"] for r in points]
        ax.plot(x, [r["p99_ms"] for r in points], "o-", color=color, label=f"{variant} p99")
        ax.plot(
            x, [r["p50_ms"] for r in points], "s--", color=color, alpha=0.7, label=f"{variant} p50"
        )
    for target in targets_ms:
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.annotate(
            f"{target:g} ms",
            (0, target),
            xycoords=("axes fraction", "data"),
            xytext=(4, 2),
            textcoords="offset points",
            color="gray",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_numbers(ax.xaxis)
    _plain_numbers(ax.yaxis)
    ax.set_xlabel("achieved rate (recommendations / s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("end-to-end latency vs throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(figure, path)


def plot_memory_over_time(
    samples: Sequence[Mapping[str, float]],
    path: Path,
    summary: Mapping[str, float],
    title: str = "",
) -> Path:
    """The flow's resident memory over a soak, the warm-up shaded, the fitted slope after it."""
    figure = _figure(9.0, 4.5)
    ax = figure.subplots()
    minutes = np.array([s["t_s"] for s in samples]) / 60.0
    rss = np.array([s["rss_mb"] for s in samples])
    warmup = summary["warmup_s"] / 60.0
    ax.axvspan(0, warmup, color="tab:gray", alpha=0.15, label="warm-up")
    ax.plot(minutes, rss, color="tab:blue", linewidth=1.5, label="flow RSS")
    after = minutes >= warmup
    if after.sum() >= 2:
        slope = summary["slope_mb_per_10min"] / 10.0  # MB per minute
        t = minutes[after]
        line = rss[after].mean() + slope * (t - t.mean())
        ax.plot(t, line, "--", color="tab:red", label=f"fit: {slope * 10:+.1f} MB / 10 min")
    ax.set_ylim(0, max(rss.max() * 1.15, 1.0))
    ax.set_xlabel("minutes of load")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(title or "flow resident memory over the soak", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(figure, path)
