"""Scoring latency, measured the way the flow scores: prepared inputs, one call per micro-batch.

Only the scoring call is timed (inputs are built beforehand), on one thread,
after a warm-up, in CPU time of the calling thread (onnxruntime with one
intra-op thread computes on it): time the machine gives to other processes is
not counted.  The median over calls is reported.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import numpy as np

from streamrec.model.data import left_pad
from streamrec.model.serving import OnnxScorer

Call = Callable[[], object]


def median_ms_per_event(calls: Sequence[Call], events_per_call: int, rounds: int = 3) -> float:
    """Median wall time of ``calls`` divided by the events each scores, in milliseconds."""
    return interleaved({"only": (calls, events_per_call)}, rounds)["only"]


# Calls per turn: short turns put every suite in the same minute of the machine's load.
TURN = 16


def interleaved(suites: dict[str, tuple[Sequence[Call], int]], rounds: int = 5) -> dict[str, float]:
    """Median ms per event of each suite of calls, the suites taking short turns.

    Each suite makes ``rounds`` passes over its calls, ``TURN`` calls at a time, the
    suites' order shuffled at every turn: whatever else the machine does falls on
    all suites alike.  (Turns of a whole pass each gave two runs of the same pair of
    models latency ratios from 0.78 to 1.01 on a shared machine.)
    """
    timings: dict[str, list[float]] = {name: [] for name in suites}
    for calls, _ in suites.values():
        for call in calls[: max(1, len(calls) // 10)]:
            call()  # warm-up: first-call allocations and caches
    pending = {
        name: [c for _ in range(rounds) for c in calls] for name, (calls, _) in suites.items()
    }
    order = list(suites)
    shuffle = random.Random(0).shuffle
    clock = time.thread_time
    at = 0
    while any(at < len(calls) for calls in pending.values()):
        shuffle(order)
        for name in order:
            for call in pending[name][at : at + TURN]:
                start = clock()
                call()
                timings[name].append(clock() - start)
        at += TURN
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
