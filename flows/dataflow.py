"""The dataflow: events topic → micro-batches → recommendations and dead letters.

>>> flow = build_dataflow(Settings(), PartitionStores(Settings(), 4), None)  # doctest: +SKIP
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.models import ModelSet, ModelWatcher
from flows.processor import processor_factory
from flows.sink import OutputSink, SinkItem
from flows.source import EventSource
from flows.stores import PartitionStores
from flows.worker import Workers
from streamrec.settings import Settings


def build_dataflow(
    settings: Settings,
    stores: PartitionStores,
    variant: str | None,
    resumable: bool = True,
    model: ModelSet | None = None,
    watcher: ModelWatcher | None = None,
) -> Dataflow:
    """Wire source, per-batch processing and sink; ``variant`` picks the served model.

    ``resumable``: a recovery store keeps the resume offsets (else every run reads
    the topic from its start).  ``model``: already loaded, for the first worker;
    ``watcher``: brings new artifacts without a restart.
    """
    flow = Dataflow("streamrec")
    # Each worker's source, processor and sink share one context (flows/worker.py).
    workers = Workers.of(settings)
    source = EventSource(
        settings, workers, batch=settings.batch_max_events, resumable=resumable, stores=stores
    )
    records = op.input("events", flow, source)
    # flat_map_batch sees the records that arrived together: they are scored
    # as one micro-batch, with no waiting added to fill it.
    outputs = op.flat_map_batch(
        "recommend",
        records,
        processor_factory(settings, stores, variant, workers, model, watcher),
    )
    # Exactly once, each partition's transaction carries the outputs: the sink gets none.
    sink = NoOutput() if stores.exactly_once else OutputSink(settings, workers)
    op.output("kafka-out", outputs, sink)
    return flow


class _Nothing(StatelessSinkPartition[SinkItem]):
    def write_batch(self, items: list[SinkItem]) -> None:
        assert not items, "exactly once, outputs go in the partitions' transactions"


class NoOutput(DynamicSink[SinkItem]):
    """The sink of a flow whose outputs leave otherwise: no producer, no start-up lookups."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Nothing:
        return _Nothing()
