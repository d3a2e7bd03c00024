"""The end-to-end benchmark's verdict: targets met or missed (and why), as a BENCHMARKS.md section.

Runs are the dicts ``tools.bench_e2e`` writes (one per variant and offered
rate).  CPU figures are percent of one core (200 = both cores of a 2-core
machine).  Where a target is missed, ``obstacles`` names what the
measurements show standing in the way, so the table never just says "no".

>>> runs = [{"variant": "floor", "offered_rate": 1000, "p50_ms": 2.0, "p99_ms": 5.0},
...         {"variant": "student", "offered_rate": 1000, "p50_ms": 3.0, "p99_ms": 9.0}]
>>> [(t.name, t.met) for t in evaluate_targets(runs)][:2]  # doctest: +NORMALIZE_WHITESPACE
[('student: p50 at 1,000 ev/s ≤ 2× the Kafka floor', True),
 ('student: p99 at 1,000 ev/s ≤ 20 ms', True)]
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

SECTION_TITLE = "## End to end"
REFERENCE_RATE = 1000.0
P50_FLOOR_FACTOR = 2.0
P99_AT_REFERENCE_MS = 20.0
P99_CAPACITY_MS = 50.0
CAPACITY_TARGET = 3000.0
TEACHER_FACTOR = 5.0
SERVED_VARIANTS = ("student", "student-2proc")
ALL_VARIANTS = ("floor", "teacher", *SERVED_VARIANTS)
Run = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TargetResult:
    name: str
    measured: str
    met: bool | None  # None: not measured in this run
    obstacles: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


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
    return results


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
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = psutil.virtual_memory().total / 2**30
    return f"{model}, {psutil.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.system()}"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def runs_table(runs: Sequence[Run]) -> str:
    head = (
        "| variant | offered ev/s | achieved /s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| queue / process / output p50 ms | flow CPU % | flow RSS MB | broker CPU % "
        "| machine CPU % | note |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"
    )
    rows = []
    for r in runs:
        stages = r.get("stages_ms") or {}
        split = " / ".join(
            _ms(stages[s]["p50"]) for s in ("queueing", "processing", "output") if s in stages
        )
        notes = []
        if r.get("saturated"):
            notes.append(f"saturated: {r.get('missing', 0)} missing")
        if r.get("schedule_lag_p99_ms", 0) > 5:
            notes.append(f"load lagged p99 {r['schedule_lag_p99_ms']:.0f} ms")
        if r.get("other_cpu_pct", 0) >= 20:
            notes.append(f"other load {r['other_cpu_pct']:.0f}%")
        rows.append(
            f"| {r['variant']} | {r['offered_rate']:,.0f} | {r['achieved_rate']:,.0f} "
            f"| {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {_ms(r['p99_ms'])} "
            f"| {_ms(r['p99_9_ms'])} | {_ms(r['max_ms'])} | {split} "
            f"| {r.get('flow_cpu_pct', 0):.0f} | {r.get('flow_rss_mb', 0):.0f} "
            f"| {r.get('broker_cpu_pct', 0):.0f} | {r.get('machine_cpu_pct', 0):.0f} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join([head, *rows])


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
        "settings and no work (`python -m tools.kafka_floor`): what Kafka alone costs. "
        "Broker, service, load generator and latency consumer share the machine.",
        "",
        f"- Command: `{command}`",
        f"- Run: {started}; {machine_description()}; Kafka {kafka_version} on the same machine",
        f"- Figures: `{json_path}`" + (f"; plot: `{plot_path}`" if plot_path else ""),
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
