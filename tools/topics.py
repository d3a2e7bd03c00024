"""The topics of the design (`events`, `recommendations`, `events.dlq`), created idempotently.

Topic names come from ``Settings``; this module only decides their shapes:
the events and recommendations topics share one partition count (both are
keyed by user), the dead-letter topic needs one partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.kafka_clients import METADATA_TIMEOUT_S, admin_client
from streamrec.settings import Settings


class TopicError(RuntimeError):
    """A topic could not be created, or exists with a shape the flow cannot use."""


@dataclass(frozen=True, slots=True)
class TopicReport:
    name: str
    partitions: int
    created: bool

    def describe(self) -> str:
        verb = "created" if self.created else "exists"
        return f"{self.name}: {verb}, {self.partitions} partition(s)"


def wanted_topics(settings: Settings, partitions: int | None = None) -> dict[str, int]:
    """Topic name → partition count the system expects."""
    n = partitions or settings.events_partitions
    if n < 1:
        raise TopicError(f"a topic needs at least one partition, got {n}")
    return {
        settings.events_topic: n,
        settings.recommendations_topic: n,
        settings.dlq_topic: 1,
    }


def create_topics(
    settings: Settings, partitions: int | None = None, timeout_s: float = 30.0
) -> list[TopicReport]:
    """Create the missing topics; existing ones are left as they are and reported."""
    admin = admin_client(settings)
    try:
        # Reachability first, as quickly as every other command finds a missing broker.
        existing = admin.list_topics(timeout=min(timeout_s, METADATA_TIMEOUT_S)).topics
    except KafkaException as err:
        raise TopicError(
            f"cannot reach Kafka at {settings.brokers}: {err}. Is it running? "
            "(`streamrec kafka up` starts a local broker)"
        ) from None
    wanted = wanted_topics(settings, partitions)
    missing = [
        NewTopic(name, num_partitions=count, replication_factor=1)
        for name, count in wanted.items()
        if name not in existing
    ]
    created: set[str] = set()
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
            try:
                future.result()
                created.add(name)
            except KafkaException as err:
                # Another client may have created it between our listing and our request.
                if "TOPIC_ALREADY_EXISTS" not in str(err):
                    raise TopicError(f"could not create topic {name!r}: {err}") from None
        existing = _wait_until_listed(admin, list(wanted), timeout_s)
    return [TopicReport(name, len(existing[name].partitions), name in created) for name in wanted]


def _wait_until_listed(admin: AdminClient, names: list[str], timeout_s: float) -> dict[str, Any]:
    # A created topic reaches the metadata a moment after its creation is acknowledged.
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        if all(n in topics and topics[n].partitions for n in names):
            return dict(topics)
        if time.monotonic() > deadline:
            missing = [n for n in names if n not in topics]
            raise TopicError(f"topics {missing} were created but the broker does not list them")
        time.sleep(0.1)


def delete_topics(settings: Settings, names: list[str], timeout_s: float = 30.0) -> None:
    """Delete topics (tests and benchmarks start from fresh ones)."""
    admin = admin_client(settings)
    present = admin.list_topics(timeout=timeout_s).topics
    doomed = [n for n in names if n in present]
    if not doomed:
        return
    for name, future in admin.delete_topics(doomed, operation_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as err:
            raise TopicError(f"could not delete topic {name!r}: {err}") from None
