"""What the sink has delivered, told to the source: the resume offsets a snapshot may give.

Output is asynchronous (at-least-once): the sink queues a micro-batch's records
and returns, and the batch after it is read while Kafka acknowledges them.  An
offset may become a resume point only once every output of the events before
it is acknowledged, else a crash would lose those outputs.  So the processor
ends each micro-batch's outputs with an ``OffsetMark`` per events partition;
the sink releases the marks in order, as the outputs queued before them are
delivered, into ``DELIVERED``; and a partition's reader never snapshots past
it.  A worker's source, processor and sink run on one thread, and each events
partition is read by exactly one worker, so none of this needs a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple


class OffsetMark(NamedTuple):
    """Follows a micro-batch's outputs: once they are delivered, reading may resume at ``next``."""

    partition: int
    next: int


# Per events partition: every event before this offset has its outputs in Kafka.
DELIVERED: dict[int, int] = {}

# Per worker thread: its sink's way to take the delivery reports that have arrived.
_REPORT_TAKERS: dict[int, Callable[[], None]] = {}


def on_this_thread(take_reports: Callable[[], None]) -> None:
    """Register the sink of the worker running on this thread."""
    _REPORT_TAKERS[threading.get_ident()] = take_reports


def take_reports() -> None:
    """Let this worker's sink take its delivery reports now, which may release marks."""
    taker = _REPORT_TAKERS.get(threading.get_ident())
    if taker is not None:
        taker()


def delivered_through(partition: int, read_to: int) -> int:
    """The resume offset a snapshot of ``partition`` may give, having read up to ``read_to``."""
    delivered = DELIVERED.get(partition)
    return read_to if delivered is None else min(read_to, delivered)
