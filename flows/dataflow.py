"""The dataflow: events topic → micro-batches → recommendations and dead letters.

>>> stores = PartitionStores(4, AtLeastOnce(Settings()))  # doctest: +SKIP
>>> flow = build_dataflow(Settings(), stores, None)  # doctest: +SKIP
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from streamrec.flows.models import ModelSet, ModelWatcher
from streamrec.flows.processor import processor_factory
from streamrec.flows.source import EventSource
from streamrec.flows.stores import PartitionStores
from streamrec.flows.worker import Workers
from streamrec.settings import Settings


def build_dataflow(
    settings: Settings,
    stores: PartitionStores,
    variant: str | None,
    model: ModelSet | None = None,
    watcher: ModelWatcher | None = None,
) -> Dataflow:
    """Wire source, per-batch processing and sink; ``variant`` picks the served model.

    ``stores``: the shards, opened and finished by their delivery guarantee,
    which also decides where reading resumes and which sink the outputs take.
    ``model``: already loaded, for the first worker; ``watcher``: brings new
    artifacts without a restart.
    """
    flow = Dataflow("streamrec")
    # Each worker's source, processor and sink share one context (flows/worker.py).
    workers = Workers.of(settings)
    source = EventSource(settings, workers, batch=settings.batch_max_events, stores=stores)
    records = op.input("events", flow, source)
    # flat_map_batch sees the records that arrived together: they are scored
    # as one micro-batch, with no waiting added to fill it.
    outputs = op.flat_map_batch(
        "recommend",
        records,
        processor_factory(settings, stores, variant, workers, model, watcher),
    )
    op.output("kafka-out", outputs, stores.guarantee.sink(workers))
    return flow
