"""What the sink has delivered, told to the source: the resume offsets a snapshot may give.

Output is asynchronous (at-least-once): the sink queues a micro-batch's records
and returns, and the batch after it is read while Kafka acknowledges them.  An
offset may become a resume point only once every output of the events before
it is acknowledged, else a crash would lose those outputs.  So the processor
ends each micro-batch's outputs with an ``OffsetMark`` per events partition;
the sink releases the marks in order, as the outputs queued before them are
delivered, into its worker's ``delivered`` (``flows/worker.py``); and a
partition's reader never snapshots past it.  A worker's source, processor and
sink run on one thread, and each events partition is read by exactly one
worker, so none of this needs a lock.
"""

from __future__ import annotations

from typing import NamedTuple


class OffsetMark(NamedTuple):
    """Follows a micro-batch's outputs: once they are delivered, reading may resume at ``next``."""

    partition: int
    next: int
