"""The end-to-end benchmark's verdict: targets met or missed (and why), as a BENCHMARKS.md section.

Runs are the dicts ``streamrec.bench.e2e`` writes: one per variant, offered
rate and repeat, which ``median_of_repeats`` folds into one per variant and
rate (the median of each figure, the repeats kept beside it).  CPU figures
are percent of one core (200 = both cores of a 2-core machine).  Where a
target is missed, ``obstacles`` names what the measurements show standing
in the way, so the table never just says "no".

>>> runs = [{"variant": "floor", "offered_rate": 1000, "p50_ms": 2.0, "p99_ms": 5.0},
...         {"variant": "student", "offered_rate": 1000, "p50_ms": 3.0, "p99_ms": 9.0}]
>>> [(t.name, t.met) for t in evaluate_targets(runs)][:2]  # doctest: +NORMALIZE_WHITESPACE
[('student: p50 at 1,000 ev/s ≤ 2× the Kafka floor', True),
 ('student: p99 at 1,000 ev/s ≤ 20 ms', True)]
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from streamrec.cpu import cpu_model, describe_int8_support

SECTION_TITLE = "## End to end"
REFERENCE_RATE = 1000.0
P50_FLOOR_FACTOR = 2.0
P99_AT_REFERENCE_MS = 20.0
P99_CAPACITY_MS = 50.0
CAPACITY_TARGET = 3000.0
TEACHER_FACTOR = 5.0
SERVED_VARIANTS = (
    "student",
    "student-2proc",
    "student-exactly-once",
    "student-no-changelog",
    "student-scraped",
)
PEER_VARIANTS = ("quix-streams", "bytewax-stock")
ALL_VARIANTS = ("floor", "teacher", *SERVED_VARIANTS, *PEER_VARIANTS)
# The served flow against the better peer: its highest rate at p99 ≤ 50 ms, this many times.
PEER_CAPACITY_FACTOR = 1.5
Run = dict[str, Any]
# Figures of a point that add up over its repeats; every other number is their median.
SUMMED = ("sent", "matched", "missing", "duplicates")
# Fewer events per point and the p99 rests on too few samples to quote.
QUOTABLE_EVENTS = 20_000
# The spread of the repeats is kept for these figures, as [lowest, highest].
RANGES = {"p50_ms": "p50_range_ms", "p99_ms": "p99_range_ms", "achieved_rate": "achieved_range"}


@dataclass(frozen=True, slots=True)
class TargetResult:
    name: str
    measured: str
    met: bool | None  # None: not measured in this run
    obstacles: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def median_of_repeats(runs: Sequence[Run], repeats: int) -> list[Run]:
    """One point per variant and rate: the median of its repeats, which it keeps as ``repeats``.

    Counts (sent, matched, missing, duplicates, models) are summed; every
    other figure (latencies, delivered rate, load lag, CPU, memory, stage
    split) is the median.  A point is saturated unless most of the
    ``repeats`` planned kept up: a repeat whose ladder stopped below it
    counts as not keeping up.

    >>> runs = [{"variant": "floor", "offered_rate": 500, "p99_ms": p, "sent": 10,
    ...          "saturated": False} for p in (9.0, 3.0, 4.0)]
    >>> point = median_of_repeats(runs, 3)[0]
    >>> point["p99_ms"], point["p99_range_ms"], point["sent"], point["saturated"]
    (4.0, [3.0, 9.0], 30, False)
    """
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run["variant"], float(run["offered_rate"])), []).append(run)
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    ordered = sorted(groups, key=lambda key: (variants.index(key[0]), key[1]))
    return [_median_point(groups[key], repeats) for key in ordered]


def _median_point(repeats: list[Run], planned: int) -> Run:
    first = repeats[0]
    point: Run = {}
    for name, value in first.items():
        values = [r[name] for r in repeats if name in r]
        if name in SUMMED:
            point[name] = sum(values)
        elif name == "models":
            totals: dict[str, int] = {}
            for models in values:
                for model, count in models.items():
                    totals[model] = totals.get(model, 0) + count
            point[name] = totals
        elif name == "stages_ms":
            point[name] = {
                stage: {
                    q: _median([v[stage][q] for v in values if stage in v and q in v[stage]])
                    for q in quantiles
                }
                for stage, quantiles in value.items()
            }
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            point[name] = _median(values)
        else:
            point[name] = value
    kept_up = sum(not r.get("saturated") for r in repeats)
    point["saturated"] = kept_up <= planned // 2
    point["repeats_planned"] = planned
    point["repeats_run"] = len(repeats)
    point["repeats_kept_up"] = kept_up
    point["events_per_repeat_min"] = min(int(r.get("sent", 0)) for r in repeats)
    for name, range_name in RANGES.items():
        if name in first:
            values = [float(r[name]) for r in repeats]
            point[range_name] = [min(values), max(values)]
    point.pop("repeat", None)
    point.pop("started", None)
    point["repeats"] = list(repeats)
    return point


def _median(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    middle = statistics.median(values)
    # Counts stay whole (cores, partitions) where the repeats agree.
    if all(isinstance(v, int) for v in values) and float(middle).is_integer():
        return int(middle)
    return round(float(middle), 3)


def run_at(runs: Sequence[Run], variant: str, rate: float) -> Run | None:
    return next(
        (r for r in runs if r["variant"] == variant and float(r["offered_rate"]) == rate), None
    )


def capacity(runs: Sequence[Run], variant: str, p99_ms: float = P99_CAPACITY_MS) -> float | None:
    """Highest offered rate the variant kept up with at p99 ≤ ``p99_ms``; None if none did."""
    good = [
        float(r["offered_rate"])
        for r in runs
        if r["variant"] == variant and not r.get("saturated") and r["p99_ms"] <= p99_ms
    ]
    return max(good) if good else None


def lowest_rate(runs: Sequence[Run], variant: str) -> float | None:
    rates = [float(r["offered_rate"]) for r in runs if r["variant"] == variant]
    return min(rates) if rates else None


def obstacles(run: Run, floor: Run | None, limit_ms: float | None = None) -> list[str]:
    """What the measurements of one run show standing in the way of a lower latency."""
    found: list[str] = []
    variant, rate = run["variant"], float(run["offered_rate"])
    if run.get("saturated"):
        found.append(
            f"{variant} did not keep up with {rate:,.0f} ev/s (delivered "
            f"{run.get('achieved_rate', 0):,.0f}/s, {run.get('missing', 0)} still missing)"
        )
    if floor is not None and limit_ms is not None and floor["p99_ms"] > limit_ms:
        found.append(
            f"Kafka alone (the floor) already has p99 {floor['p99_ms']:.1f} ms at this rate "
            "on this machine"
        )
    processes = 2 if variant == "student-2proc" else 1
    per_process = run.get("flow_cpu_pct", 0.0) / processes
    if per_process >= 85.0:
        found.append(
            f"the flow is CPU-bound: {per_process:.0f}% of a core per process (one interpreter "
            "lock per process)"
        )
    cores = run.get("cores", psutil.cpu_count() or 1)
    machine = run.get("machine_cpu_pct", 0.0)
    if machine >= 85.0 * cores:
        found.append(
            f"the {cores} cores were {machine:.0f}% busy (of {100 * cores}): flow "
            f"{run.get('flow_cpu_pct', 0):.0f}%, broker {run.get('broker_cpu_pct', 0):.0f}%, "
            f"load generator + latency {run.get('harness_cpu_pct', 0):.0f}%, "
            f"other {run.get('other_cpu_pct', 0):.0f}%"
        )
    if run.get("other_cpu_pct", 0.0) >= 20.0:
        found.append(
            f"other processes took {run['other_cpu_pct']:.0f}% of a core during the run: "
            "rerun on a quiet machine"
        )
    stages = run.get("stages_ms") or {}
    if stages:
        worst = max(stages, key=lambda s: stages[s]["p99"])
        meaning = {
            "queueing": "waiting before the flow reads an event (input polling, batching, "
            "the epoch, or a busy worker)",
            "processing": "the flow's own work per event (parse, state, candidates, scoring)",
            "output": "producing and fetching the result (sink flush per batch, broker)",
        }[worst]
        found.append(
            f"the p99 is mostly {worst} ({stages[worst]['p99']:.1f} of {run['p99_ms']:.1f} ms): "
            f"{meaning}"
        )
    return found


def evaluate_targets(runs: Sequence[Run]) -> list[TargetResult]:
    """The issue's targets, for each served variant present in ``runs``."""
    results: list[TargetResult] = []
    floor = run_at(runs, "floor", REFERENCE_RATE)
    teacher_capacity = capacity(runs, "teacher")
    served = [v for v in SERVED_VARIANTS if any(r["variant"] == v for r in runs)]
    for variant in served:
        at_ref = run_at(runs, variant, REFERENCE_RATE)
        name = f"{variant}: p50 at 1,000 ev/s ≤ {P50_FLOOR_FACTOR:g}× the Kafka floor"
        if at_ref is None or floor is None:
            results.append(
                TargetResult(name, "needs the floor and this variant at 1,000 ev/s", None)
            )
        else:
            ratio = at_ref["p50_ms"] / max(floor["p50_ms"], 1e-3)
            met = ratio <= P50_FLOOR_FACTOR and not at_ref.get("saturated")
            results.append(
                TargetResult(
                    name,
                    f"{at_ref['p50_ms']:.2f} ms vs floor {floor['p50_ms']:.2f} ms ({ratio:.1f}×)",
                    met,
                    [] if met else obstacles(at_ref, floor),
                )
            )
        name = f"{variant}: p99 at 1,000 ev/s ≤ {P99_AT_REFERENCE_MS:g} ms"
        if at_ref is None:
            results.append(TargetResult(name, "no 1,000 ev/s point", None))
        else:
            met = at_ref["p99_ms"] <= P99_AT_REFERENCE_MS and not at_ref.get("saturated")
            results.append(
                TargetResult(
                    name,
                    f"{at_ref['p99_ms']:.2f} ms",
                    met,
                    [] if met else obstacles(at_ref, floor, P99_AT_REFERENCE_MS),
                )
            )
        best = capacity(runs, variant)
        name = (
            f"{variant}: highest rate with p99 ≤ {P99_CAPACITY_MS:g} ms "
            f"≥ {CAPACITY_TARGET:,.0f} ev/s"
        )
        met = best is not None and best >= CAPACITY_TARGET
        first_miss = _first_miss(runs, variant)
        results.append(
            TargetResult(
                name,
                f"{best:,.0f} ev/s" if best is not None else "none of the rates run",
                met,
                []
                if met or first_miss is None
                else obstacles(
                    first_miss,
                    run_at(runs, "floor", float(first_miss["offered_rate"])),
                    P99_CAPACITY_MS,
                ),
            )
        )
        name = f"{variant}: that rate ≥ {TEACHER_FACTOR:g}× the fp32 teacher's"
        results.append(_teacher_ratio(name, runs, best, teacher_capacity))
        peers = [p for p in PEER_VARIANTS if any(r["variant"] == p for r in runs)]
        if peers:
            results += _against_peers(runs, variant, peers, best)
    return results


def _against_peers(
    runs: Sequence[Run], variant: str, peers: Sequence[str], best: float | None
) -> list[TargetResult]:
    """p99 below every peer's at every rate both ran, and 1.5× the better peer's capacity."""
    lost = []
    compared = 0
    for run in (r for r in runs if r["variant"] == variant):
        rate = float(run["offered_rate"])
        rivals = [p for peer in peers if (p := run_at(runs, peer, rate)) is not None]
        if not rivals:
            continue
        compared += 1
        for rival in rivals:
            # Saturated is worse than any latency; two saturated: the one that delivered more.
            if run.get("saturated") and rival.get("saturated"):
                won = run["achieved_rate"] > rival["achieved_rate"]
            else:
                won = not run.get("saturated") and (
                    rival.get("saturated") or run["p99_ms"] < rival["p99_ms"]
                )
            if not won:
                lost.append(f"{rate:,.0f} ev/s vs {rival['variant']}")
    name = f"{variant}: p99 below {' and '.join(peers)} at every rate"
    if not compared:
        measured, met = "no rate run by both", None
    elif lost:
        measured, met = "not at " + ", ".join(lost), False
    else:
        measured, met = f"lower at each of the {compared} rate(s) both ran", True
    results = [TargetResult(name, measured, met)]
    capacities = {p: capacity(runs, p) for p in peers}
    better = max((c for c in capacities.values() if c is not None), default=None)
    name = (
        f"{variant}: highest rate with p99 ≤ {P99_CAPACITY_MS:g} ms "
        f"≥ {PEER_CAPACITY_FACTOR:g}× the better peer's"
    )
    peers_text = ", ".join(
        f"{p} {c:,.0f} ev/s" if c is not None else f"{p} none" for p, c in capacities.items()
    )
    if best is None:
        results.append(TargetResult(name, f"none of the rates run ({peers_text})", False))
    elif better is None:
        results.append(
            TargetResult(name, f"{best:,.0f} ev/s; the peers met it at no rate run", True)
        )
    else:
        ratio = best / better
        results.append(
            TargetResult(
                name,
                f"{best:,.0f} ev/s vs {peers_text} ({ratio:.1f}×)",
                ratio >= PEER_CAPACITY_FACTOR,
            )
        )
    return results


def side_by_side_table(runs: Sequence[Run]) -> str:
    """p50 / p99 of the served flow and each peer at each rate, then each one's capacity."""
    shown = [
        v
        for v in ("floor", *SERVED_VARIANTS, *PEER_VARIANTS)
        if any(r["variant"] == v for r in runs)
    ]
    rates = sorted({float(r["offered_rate"]) for r in runs if r["variant"] in shown})
    lines = [
        "| offered ev/s | " + " | ".join(f"{v} p50 / p99 ms" for v in shown) + " |",
        "|---:|" + "---:|" * len(shown),
    ]
    for rate in rates:
        cells = []
        for variant in shown:
            run = run_at(runs, variant, rate)
            if run is None:
                cells.append("not run")
            elif run.get("saturated"):
                cells.append(f"saturated at {run['achieved_rate']:,.0f}/s")
            else:
                cells.append(f"{_ms(run['p50_ms'])} / {_ms(run['p99_ms'])}")
        lines.append(f"| {rate:,.0f} | " + " | ".join(cells) + " |")
    best = []
    for variant in shown:
        c = capacity(runs, variant)
        best.append(f"{c:,.0f} ev/s" if c is not None else "none")
    lines.append(f"| highest rate with p99 ≤ {P99_CAPACITY_MS:g} ms | " + " | ".join(best) + " |")
    return "\n".join(lines)


def _first_miss(runs: Sequence[Run], variant: str) -> Run | None:
    misses = [
        r
        for r in runs
        if r["variant"] == variant and (r.get("saturated") or r["p99_ms"] > P99_CAPACITY_MS)
    ]
    return min(misses, key=lambda r: float(r["offered_rate"])) if misses else None


def _teacher_ratio(
    name: str, runs: Sequence[Run], best: float | None, teacher_capacity: float | None
) -> TargetResult:
    if not any(r["variant"] == "teacher" for r in runs):
        return TargetResult(name, "the teacher was not run", None)
    if best is None:
        return TargetResult(name, "the student met p99 ≤ 50 ms at no rate", False)
    if teacher_capacity is None:
        # The teacher missed even the lowest rate: the ratio is at least best / lowest.
        floor_rate = lowest_rate(runs, "teacher") or 1.0
        ratio = best / floor_rate
        return TargetResult(
            name,
            f"teacher < {floor_rate:,.0f} ev/s (missed at every rate): ratio > {ratio:.0f}×",
            True if ratio >= TEACHER_FACTOR else None,
        )
    ratio = best / teacher_capacity
    met = ratio >= TEACHER_FACTOR
    return TargetResult(
        name,
        f"{best:,.0f} vs teacher {teacher_capacity:,.0f} ev/s ({ratio:.1f}×)"
        + (
            ""
            if met or best < max(float(r["offered_rate"]) for r in runs)
            else " — the ladder's top rate bounds it; add higher --rates"
        ),
        met,
    )


def machine_description() -> str:
    memory_gib = psutil.virtual_memory().total / 2**30
    support = describe_int8_support()
    return (
        f"{cpu_model()}{f' ({support})' if support else ''}, {psutil.cpu_count()} cores, "
        f"{memory_gib:.0f} GiB, {platform.system()}"
    )


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def runs_table(runs: Sequence[Run]) -> str:
    """One row per point; with repeats, the p99 cell gives the repeats' range in brackets."""
    head = (
        "| variant | offered ev/s | achieved /s | p50 ms | p90 ms | p99 ms (range) | p99.9 ms "
        "| max ms | queue / process / output p50 ms | load lag p99 ms | flow CPU % | flow RSS MB "
        "| broker CPU % | harness CPU % | machine CPU % | note |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
    )
    rows = []
    for r in runs:
        stages = r.get("stages_ms") or {}
        split = " / ".join(
            _ms(stages[s]["p50"]) for s in ("queueing", "processing", "output") if s in stages
        )
        p99 = _ms(r["p99_ms"])
        if r.get("p99_range_ms") and r.get("repeats_run", 1) > 1:
            low, high = r["p99_range_ms"]
            p99 += f" ({_ms(low)}–{_ms(high)})"
        rows.append(
            f"| {r['variant']} | {r['offered_rate']:,.0f} | {r['achieved_rate']:,.0f} "
            f"| {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {p99} "
            f"| {_ms(r['p99_9_ms'])} | {_ms(r['max_ms'])} | {split} "
            f"| {_ms(r.get('schedule_lag_p99_ms', 0.0))} "
            f"| {r.get('flow_cpu_pct', 0):.0f} | {r.get('flow_rss_mb', 0):.0f} "
            f"| {r.get('broker_cpu_pct', 0):.0f} | {r.get('harness_cpu_pct', 0):.0f} "
            f"| {r.get('machine_cpu_pct', 0):.0f} | {'; '.join(_notes(r))} |"
        )
    return "\n".join([head, *rows])


def _notes(r: Run) -> list[str]:
    notes = []
    planned, ran = r.get("repeats_planned", 1), r.get("repeats_run", 1)
    if r.get("saturated"):
        kept = r.get("repeats_kept_up")
        notes.append(
            f"saturated: {r.get('missing', 0)} missing"
            + (f", kept up in {kept} of {planned} repeats" if kept is not None else "")
        )
    if ran < planned:
        notes.append(f"ran in {ran} of {planned} repeats")
    events = int(r.get("events_per_repeat_min") or r.get("sent") or 0)
    if events < QUOTABLE_EVENTS:
        notes.append(f"{events:,} events per point")
    if r.get("schedule_lag_p99_ms", 0) > 5:
        notes.append(f"load lagged p99 {r['schedule_lag_p99_ms']:.0f} ms")
    if r.get("other_cpu_pct", 0) >= 20:
        notes.append(f"other load {r['other_cpu_pct']:.0f}%")
    return notes


def targets_table(results: Sequence[TargetResult]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.verdict} |" for t in results]
    return "\n".join(lines)


def section_markdown(
    runs: Sequence[Run],
    *,
    command: str,
    started: str,
    json_path: str,
    plot_path: str | None,
    failures: Sequence[str],
    stopped_early: Sequence[str],
    kafka_version: str,
    quick: bool,
    variants: Sequence[str] = (),
    method: Sequence[str] = (),
) -> str:
    """The whole "End to end" section of BENCHMARKS.md for one benchmark run."""
    results = evaluate_targets(runs)
    parts = [
        SECTION_TITLE,
        "",
        "Event → recommendation latency through a real broker, measured by `streamrec latency` "
        "from each input record's Kafka timestamp (its scheduled send time: the load is open "
        "loop) to the moment the recommendation is received; throughput is recommendations "
        "delivered per second. The **floor** is a consume→produce loop with the flow's client "
        "settings and no work (`python -m streamrec.bench.kafka_floor`): what Kafka alone costs. "
        "Broker, service, load generator and latency consumer share the machine.",
        "",
        f"- Command: `{command}`",
        f"- Run: {started}; {machine_description()}; Kafka {kafka_version} on the same machine",
        f"- Figures: `{json_path}`" + (f"; plot: `{plot_path}`" if plot_path else ""),
        *(f"- {line}" for line in method),
    ]
    if quick:
        parts.append(
            "- **Quick run** (a few seconds per point): a smoke check of the harness, "
            "not figures to quote"
        )
    left_out = [v for v in ALL_VARIANTS if variants and v not in variants]
    if left_out:
        parts.append(f"- Not in this run: {', '.join(left_out)} (see `--variants`)")
    busiest = max((r.get("other_cpu_pct", 0.0) for r in runs), default=0.0)
    if busiest >= 20.0:
        parts.append(
            f"- **Other work shared the machine** (up to {busiest:.0f}% of a core, column "
            "'note'): these figures are pessimistic; rerun on a quiet machine"
        )
    if any(r["variant"] in PEER_VARIANTS for r in runs):
        parts += [
            "",
            "### Side by side",
            "",
            "The same job in each framework (validation, a session of the last 50 items "
            "stamped with its source offset, the project's `Recommender`, the same output "
            "contract): `bench/peers/`. Medians of the repeats.",
            "",
            side_by_side_table(runs),
            "",
            "### Every point",
        ]
    parts += ["", runs_table(runs) if runs else "_No run completed._", ""]
    if stopped_early:
        parts += ["Ladders stopped early (higher rates would only be worse):", ""]
        parts += [f"- {line}" for line in stopped_early]
        parts.append("")
    if failures:
        parts += ["Variants that could not be measured:", ""]
        parts += [f"- {line}" for line in failures]
        parts.append("")
    if not results:
        parts += [
            "_The targets compare the served flow (student, student-2proc) with the floor and "
            "the fp32 teacher: run those variants to check them._",
            "",
        ]
    else:
        parts += ["### Targets", "", targets_table(results), ""]
        missed = [t for t in results if t.met is False and t.obstacles]
        if missed:
            parts += ["What stands in the way:", ""]
            for t in missed:
                parts.append(f"- {t.name}: " + "; ".join(t.obstacles) + ".")
            parts.append("")
    if plot_path:
        parts += [f"![latency vs throughput]({plot_path})", ""]
    return "\n".join(parts)


def write_section(path: Path, section: str, title: str = SECTION_TITLE) -> None:
    """Replace the section that starts with ``title`` (up to the next ``## ``), or append it.

    Other sections of the file belong to other benchmarks and are kept as they are.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    body = section.rstrip("\n").splitlines()
    if start is None:
        new_lines = [*lines, "", *body] if lines else body
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        new_lines = [*lines[:start], *body, *([""] if tail else []), *tail]
    path.write_text("\n".join(new_lines).rstrip("\n") + "\n")
