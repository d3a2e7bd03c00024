"""The seam between the dataflow and its delivery guarantee.

The source, the processor and the shard map call a ``Guarantee`` at the points
where at least once and exactly once differ, without knowing which one it is:

- **opening a shard** (``open_store``): rebuilt from the changelog if needed,
  claimed (at least once) or fenced by the partition's transactional producer
  (exactly once);
- **where reading starts** (``start_offset``) and, per partition read, a
  ``PartitionProgress``: what happens on each poll, whether the reader may
  stop, and the resume offset its snapshots give;
- **the lowest offset a restart may read again** (``replay_floor``), which the
  stores keep what a replay needs for;
- **after each micro-batch** (``after_batch``, ``after_commit``) and **after an
  expiry sweep** (``after_sweep``): where the outputs and the progress go;
- **the sink** the outputs flow into, and **closing** each shard and the whole.

One implementation per guarantee, each in a module of its own:
``flows/guarantee/at_least_once.py`` and ``flows/guarantee/exactly_once.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from bytewax.outputs import DynamicSink

from streamrec.flows.output import SinkItem
from streamrec.flows.worker import WorkerContext, Workers
from streamrec.state.store import SessionStore


class PartitionProgress(ABC):
    """What the reader of one events partition asks its guarantee."""

    @abstractmethod
    def on_poll(self) -> None:
        """Called on every poll of the partition, records or not."""

    @abstractmethod
    def may_stop(self, read_to: int) -> bool:
        """On a stop request, having read up to ``read_to``: whether reading may end now."""

    @abstractmethod
    def snapshot(self, read_to: int) -> int:
        """The resume offset the partition's snapshot gives, having read up to ``read_to``."""


class Guarantee(ABC):
    """How a flow's outputs and progress reach Kafka: one implementation per delivery guarantee."""

    #: The name users choose it by (``--guarantee``).
    name: str
    #: Whether Bytewax's recovery store keeps the resume offsets.
    recovery_store: bool

    @abstractmethod
    def open_store(self, partition: int, shard_count: int) -> SessionStore:
        """The session store of ``partition``, opened (rebuilt if needed) for this guarantee."""

    @abstractmethod
    def start_offset(self, partition: int, resume_state: int | None) -> int:
        """Where reading ``partition`` starts (its shard is open): an offset or OFFSET_BEGINNING.

        ``resume_state``: what the recovery store kept, if it keeps anything.
        """

    @abstractmethod
    def reading(self, partition: int, offset: int, worker: WorkerContext) -> PartitionProgress:
        """The progress of ``partition``, read by ``worker`` from ``offset`` (checked) on."""

    @abstractmethod
    def replay_floor(self, worker: WorkerContext, partition: int, store: SessionStore) -> int:
        """The lowest offset of ``partition`` a restart may read again (NO_REPLAY: none)."""

    @abstractmethod
    def after_batch(
        self, outputs: list[SinkItem], partitions: list[int], last_offsets: dict[int, int]
    ) -> list[SinkItem]:
        """A committed micro-batch's outputs on their way: what the sink gets of them.

        ``partitions``: the events partition of each output record, in order;
        ``last_offsets``: the last offset the micro-batch read of each partition.
        """

    @abstractmethod
    def after_commit(self, stores: Mapping[int, SessionStore]) -> None:
        """After ``stores`` committed a micro-batch's writes, before anything is emitted."""

    @abstractmethod
    def after_sweep(self, store: SessionStore) -> None:
        """After an expiry sweep of ``store`` removed sessions."""

    @abstractmethod
    def sink(self, workers: Workers) -> DynamicSink[SinkItem]:
        """The dataflow's sink for what ``after_batch`` hands on."""

    @abstractmethod
    def close_shard(self, partition: int, store: SessionStore) -> None:
        """At a clean stop, before ``store`` closes: what is pending for it goes out."""

    @abstractmethod
    def close(self) -> None:
        """After every shard closed: the guarantee's own clients."""
