"""What one Bytewax worker's source, processor and sink share, and how each finds it.

A worker reads its events partitions, processes their micro-batches and writes
their outputs on one thread, and each events partition is read by exactly one
worker, so the three parts of a worker share plain objects without a lock:

- the **pacer**: how busy the worker is (the processor reports its work, the
  source asks whether records should wait for a fuller batch);
- **delivered**: per events partition, the offset before which every event has
  its outputs in Kafka (the sink releases it as Kafka acknowledges, the source's
  snapshots never resume past it; ``flows/guarantee/at_least_once.py``);
- **replay floors**: per events partition, the lowest offset a crash could make
  this process read again (the source's snapshots set them, the processor's
  stores keep what a replay from there needs);
- the sink's **take_reports**, which the source calls to release marks now.

The parts that are the worker's own (its consumer, its processor) are kept by
their makers, per context.

Bytewax hands the three no handle in common: a source partition is built with
no worker index, and ``flat_map_batch`` takes one function for every worker.
What they do share is the OS thread the worker runs on, so ``Workers``, made
once per dataflow and passed to each part, finds a worker's context by that
thread's id; this is the only such lookup.  (Not a ``threading.local``: in
cluster mode Bytewax runs workers on threads Python did not start, whose thread
state, and so every thread-local, is made anew for each call.)

>>> workers = Workers(fill=16, linger_s=0.003)
>>> worker = workers.current()
>>> worker is workers.current(), worker.delivered_through(0, read_to=120)
(True, 120)
>>> worker.delivered[0] = 100  # outputs of offsets 100 and on are still in flight
>>> worker.delivered_through(0, read_to=120)
100
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from streamrec.flows.pacing import Pacer
from streamrec.settings import Settings


def _no_reports() -> None:
    """A worker without a sink of its own (exactly once) has no reports to take."""


@dataclass(eq=False)  # compared and hashed by identity: one per worker
class WorkerContext:
    """One worker's shared objects."""

    pacer: Pacer
    delivered: dict[int, int] = field(default_factory=dict)
    replay_floors: dict[int, int] = field(default_factory=dict)
    take_reports: Callable[[], None] = _no_reports

    def delivered_through(self, partition: int, read_to: int) -> int:
        """The resume offset a snapshot of ``partition`` may give, having read up to ``read_to``."""
        delivered = self.delivered.get(partition)
        return read_to if delivered is None else min(read_to, delivered)


class Workers:
    """The contexts of one dataflow's workers, each found from its worker's own thread."""

    def __init__(self, fill: int, linger_s: float) -> None:
        self._fill = fill
        self._linger_s = linger_s
        self._contexts: dict[int, WorkerContext] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, settings: Settings) -> Workers:
        return cls(settings.batch_fill, settings.batch_linger_ms / 1000.0)

    def current(self) -> WorkerContext:
        """The context of the worker running on the calling thread, made on first use."""
        thread = threading.get_ident()
        context = self._contexts.get(thread)
        if context is None:
            with self._lock:
                context = self._contexts.get(thread)
                if context is None:
                    context = WorkerContext(Pacer(self._fill, self._linger_s))
                    self._contexts[thread] = context
        return context

    def __len__(self) -> int:
        return len(self._contexts)
