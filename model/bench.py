"""Scoring latency, measured the way the flow scores: prepared inputs, one call per micro-batch.

Only the scoring call is timed (inputs are built beforehand), on one thread,
after a warm-up.  The median over calls is reported: other processes share
these cores, and the median is what a steady stream of events sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from model.data import left_pad
from model.serving import OnnxScorer

Call = Callable[[], object]


def median_ms_per_event(calls: Sequence[Call], events_per_call: int, rounds: int = 3) -> float:
    """Median wall time of ``calls`` divided by the events each scores, in milliseconds."""
    return interleaved({"only": (calls, events_per_call)}, rounds)["only"]


def interleaved(suites: dict[str, tuple[Sequence[Call], int]], rounds: int = 5) -> dict[str, float]:
    """Median ms per event of each suite of calls, the suites taking turns round by round.

    Taking turns spreads whatever else the machine is doing over all suites alike,
    instead of favouring the ones that happened to run in a quiet minute.
    """
    timings: dict[str, list[float]] = {name: [] for name in suites}
    for calls, _ in suites.values():
        for call in calls[: max(1, len(calls) // 10)]:
            call()  # warm-up: first-call allocations and caches
    for _ in range(rounds):
        for name, (calls, _) in suites.items():
            for call in calls:
                start = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - start)
    return {
        name: float(np.median(timings[name])) * 1e3 / per_call
        for name, (_, per_call) in suites.items()
    }


def onnx_calls(
    scorer: OnnxScorer,
    histories: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    batch: int,
    max_len: int | None = None,
) -> list[Call]:
    """One prepared ``scorer.score`` call per ``batch`` sessions, each with its candidates."""
    max_len = max_len or scorer.max_len
    calls: list[Call] = []
    for lo in range(0, len(histories) - batch + 1, batch):
        items = left_pad(histories[lo : lo + batch], max_len)
        cands = np.stack(candidates[lo : lo + batch])

        def call(items: np.ndarray = items, cands: np.ndarray = cands) -> object:
            return scorer.score(items, cands)

        calls.append(call)
    return calls


def baseline_calls(
    score: Callable[[Sequence[np.ndarray], np.ndarray], np.ndarray],
    histories: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    batch: int,
) -> list[Call]:
    calls: list[Call] = []
    for lo in range(0, len(histories) - batch + 1, batch):
        part = list(histories[lo : lo + batch])
        cands = np.stack(candidates[lo : lo + batch])

        def call(part: list[np.ndarray] = part, cands: np.ndarray = cands) -> object:
            return score(part, cands)

        calls.append(call)
    return calls
