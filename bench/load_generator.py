"""The benchmark's load generator: ``replay`` at a fixed rate, in a process of its own.

The generator runs apart from the latency collector so that neither waits for
the other's interpreter lock: a collector that cannot run when a
recommendation arrives would add its own delay to every figure.  The process
loads the dataset once and then replays one ladder point per request,
continuing through the dataset (and lapping it) from where the last point
ended.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from streamrec.datasets import load_events
from streamrec.settings import Settings
from streamrec.tools.replay import DatasetSource, KafkaSender, replay
from streamrec.tools.schedule import Timing

# How long to wait for the child to answer beyond the point's own duration.
REPLY_MARGIN_S = 120.0


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """``rate`` events/s for ``duration_s`` s into ``topic``, from dataset position ``start``."""

    rate: float
    duration_s: float
    start: int
    topic: str

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.rate * self.duration_s))


def _serve(connection: Connection, settings: Settings, dataset: Path) -> None:
    try:
        events = load_events(dataset)
        connection.send(("ready", len(events)))
        sender: KafkaSender | None = None
        while (point := connection.recv()) is not None:
            if sender is None or sender.topic != point.topic:
                if sender is not None:
                    # Its delivery callbacks keep it in a reference cycle: collected now,
                    # it does not linger to log the deletion of its topic.
                    sender.finish(5.0)
                    sender = None
                    gc.collect()
                # One producer per topic, kept warm from point to point: a new
                # one would spend its first moments on metadata and its producer id.
                sender = KafkaSender(settings, point.topic)
                sender.warm_up()
            source = DatasetSource(events, point.start, point.count)
            report = replay(
                settings, source, Timing.fixed_rate(point.rate), topic=point.topic, sender=sender
            )
            connection.send(("done", report.to_dict()))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


class LoadGenerator:
    """A child process that replays ladder points on request; use it as a context manager."""

    def __init__(self, settings: Settings, dataset: Path) -> None:
        # "spawn": a fresh interpreter, not a fork of a process holding Kafka client threads.
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_end, settings, dataset), name="streamrec-load", daemon=True
        )
        self._process.start()
        child_end.close()
        self._receive("ready", REPLY_MARGIN_S)  # the generator has its dataset in memory

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def run(self, point: LoadPoint) -> dict[str, Any]:
        """Replay one point; the replay report (``streamrec.tools.replay.ReplayReport.to_dict``)."""
        self._connection.send(point)
        report: dict[str, Any] = self._receive("done", point.duration_s + REPLY_MARGIN_S)
        return report

    def _receive(self, expected: str, timeout_s: float) -> Any:
        if not self._connection.poll(timeout_s):
            raise RuntimeError(f"the load generator did not answer within {timeout_s:.0f} s")
        try:
            kind, payload = self._connection.recv()
        except EOFError:
            raise RuntimeError(
                f"the load generator exited (code {self._process.exitcode})"
            ) from None
        if kind == "error":
            raise RuntimeError(f"the load generator failed:\n{payload}")
        if kind != expected:
            raise RuntimeError(f"the load generator answered {kind!r}, expected {expected!r}")
        return payload

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # the child may be gone already
                self._connection.send(None)
            self._process.join(10.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)
        self._connection.close()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
