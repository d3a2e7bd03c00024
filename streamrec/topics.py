"""The topics of the design (events, recommendations, dead letters, changelog), made idempotently.

Topic names come from ``Settings``; this module only decides their shapes:
the events and recommendations topics share one partition count (both are
keyed by user), the dead-letter topic needs one partition.  Every topic gets
the replication factor and ``min.insync.replicas`` of the settings: 1 and 1
suit the local broker, a managed cluster wants more (and refuses 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.kafka_clients import admin_client, cluster_metadata
from streamrec.settings import Settings


class TopicError(RuntimeError):
    """A topic could not be created, or exists with a shape the flow cannot use."""


@dataclass(frozen=True, slots=True)
class TopicReport:
    name: str
    partitions: int
    created: bool
    replication_factor: int = 1

    def describe(self) -> str:
        verb = "created" if self.created else "exists"
        return (
            f"{self.name}: {verb}, {self.partitions} partition(s), "
            f"replication factor {self.replication_factor}"
        )


def wanted_topics(settings: Settings, partitions: int | None = None) -> dict[str, int]:
    """Topic name → partition count the system expects."""
    n = partitions or settings.events_partitions
    if n < 1:
        raise TopicError(f"a topic needs at least one partition, got {n}")
    topics = {
        settings.events_topic: n,
        settings.recommendations_topic: n,
        settings.dlq_topic: 1,
    }
    if settings.changelog:
        # One changelog partition per events partition: shard p's changes go to partition p.
        topics[settings.sessions_changelog] = n
    return topics


def topic_config(settings: Settings, name: str) -> dict[str, str]:
    """The settings a new topic gets, beyond its partition count and replication."""
    config = {"min.insync.replicas": str(settings.topic_min_insync_replicas)}
    if settings.changelog and name == settings.sessions_changelog:
        # Only the latest record of each user is needed to rebuild a shard.
        config["cleanup.policy"] = "compact"
    return config


def create_topics(
    settings: Settings, partitions: int | None = None, timeout_s: float = 30.0
) -> list[TopicReport]:
    """Create the missing topics; existing ones are left as they are and reported.

    Raises ``KafkaUnavailable`` (``KafkaRefused`` for a refused
    login) when the cluster cannot be reached, ``TopicError`` when it refuses
    a topic.
    """
    replication, min_insync = replication_of(settings)
    wanted = wanted_topics(settings, partitions)
    # Reachability and credentials first, as quickly as every other command finds them.
    metadata = cluster_metadata(settings)
    existing = metadata.topics
    admin = admin_client(settings)
    missing = [
        NewTopic(
            name,
            num_partitions=count,
            replication_factor=replication,
            config=topic_config(settings, name),
        )
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
                if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    refusal = _refused(name, err.args[0], settings, len(metadata.brokers), wanted)
                    raise TopicError(refusal) from None
        existing = _wait_until_listed(admin, list(wanted), timeout_s)
    return [
        TopicReport(
            name,
            len(existing[name].partitions),
            name in created,
            len(next(iter(existing[name].partitions.values())).replicas),
        )
        for name in wanted
    ]


def replication_of(settings: Settings) -> tuple[int, int]:
    """The (replication factor, min.insync.replicas) new topics get; refused when impossible."""
    factor, min_insync = settings.topic_replication_factor, settings.topic_min_insync_replicas
    if factor < 1:
        raise TopicError(f"a topic needs a replication factor of at least 1, got {factor}")
    if not 1 <= min_insync <= factor:
        # More would make every acks=all write fail with NOT_ENOUGH_REPLICAS.
        raise TopicError(
            f"min.insync.replicas must lie between 1 and the replication factor ({factor}), "
            f"got {min_insync}"
        )
    return factor, min_insync


def _refused(
    name: str, error: KafkaError, settings: Settings, brokers: int, wanted: dict[str, int]
) -> str:
    said = f"the cluster refused to create topic {name!r}: {error.str().rstrip('.')}"
    factor, min_insync = settings.topic_replication_factor, settings.topic_min_insync_replicas
    code = error.code()
    if code == KafkaError.INVALID_REPLICATION_FACTOR:
        return (
            f"{said}. Replication factor {factor} was asked of a cluster of {brokers} "
            "broker(s); choose one it allows with --replication-factor "
            "(STREAMREC_TOPIC_REPLICATION_FACTOR)"
        )
    if code in (KafkaError.POLICY_VIOLATION, KafkaError.INVALID_CONFIG):
        return (
            f"{said}. Asked: replication factor {factor}, min.insync.replicas {min_insync}; "
            "managed clusters usually require --replication-factor 3 and accept "
            "--min-insync-replicas 2 (STREAMREC_TOPIC_REPLICATION_FACTOR, "
            "STREAMREC_TOPIC_MIN_INSYNC_REPLICAS)"
        )
    if code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
        shapes = ", ".join(f"{topic} ({count} partition(s))" for topic, count in wanted.items())
        return (
            f"{said}. These credentials may not create topics: ask for that right, or have "
            f"them created by the cluster's own means: {shapes}"
        )
    return said


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
    """Delete topics and wait until they are gone (tests and benchmarks start from fresh ones)."""
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
    # Deletion completes in the background: a topic created again before it is gone would be
    # reported as existing, then vanish.
    deadline = time.monotonic() + timeout_s
    while any(n in admin.list_topics(timeout=timeout_s).topics for n in doomed):
        if time.monotonic() > deadline:
            raise TopicError(f"topics {doomed} were deleted but are still listed")
        time.sleep(0.2)
