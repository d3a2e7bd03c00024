"""Recommendations and dead letters out of the dataflow.

The sink produces every record of a batch, then flushes: when ``write_batch``
returns, the batch is on the broker, so an epoch that Bytewax has snapshotted
never has outputs still in flight (at-least-once output).
"""

from __future__ import annotations

from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from streamrec.kafka_clients import producer_config
from streamrec.settings import Settings

# (topic, key, value, headers): what the flow hands the sink, with no wrapper per record.
OutputRecord = tuple[str, bytes | None, bytes | None, list[tuple[str, str | bytes | None]] | None]


class _BatchWriter(StatelessSinkPartition[OutputRecord]):
    def __init__(self, producer: Producer) -> None:
        self._producer = producer

    def write_batch(self, items: list[OutputRecord]) -> None:
        produce = self._producer.produce
        for topic, key, value, headers in items:
            try:
                produce(topic, value, key, headers=headers)
            except BufferError:
                # The local queue is full: let deliveries drain, then retry once.
                self._producer.flush(5)
                produce(topic, value, key, headers=headers)
        remaining = self._producer.flush(30)
        if remaining:
            raise RuntimeError(
                f"{remaining} output records were not delivered within 30 s; "
                "is the broker reachable?"
            )

    def close(self) -> None:
        self._producer.flush(30)


class OutputSink(DynamicSink[OutputRecord]):
    """Recommendations and dead letters, each record naming its topic; one producer per worker."""

    def __init__(self, settings: Settings) -> None:
        self._config: dict[str, Any] = producer_config(settings)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _BatchWriter:
        return _BatchWriter(Producer(self._config))
