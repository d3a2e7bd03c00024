"""The local broker is a real Apache Kafka: typed events survive a round trip through it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psutil
import pytest
from confluent_kafka import Consumer, Producer

from streamrec.contracts import Event, parse_event
from streamrec.kafka_clients import admin_client, consumer_config, producer_config
from streamrec.settings import Settings
from streamrec.tools.kafka_local import (
    MAIN_CLASS,
    KafkaLauncherError,
    LocalKafka,
    SecuredListener,
    _scram_credential,
    ensure_jars,
)
from streamrec.topics import TopicError, create_topics, wanted_topics
from tests.conftest import free_port
from tests.flow_harness import partition_of

pytestmark = pytest.mark.kafka


def our_brokers(kafka_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if MAIN_CLASS in cmdline and any(str(kafka_dir) in part for part in cmdline):
            found.append(process)
    return found


def test_typed_events_round_trip_through_the_broker_keyed_by_user(
    kafka_settings: Settings,
) -> None:
    sent = [Event(f"e{i}", f"u{i % 5}", f"i{i}", "view", 1_700_000_000_000 + i) for i in range(50)]
    producer = Producer(producer_config(kafka_settings))
    for event in sent:
        producer.produce(kafka_settings.events_topic, event.to_json(), key=event.key)
    assert producer.flush(10) == 0

    consumer = Consumer(consumer_config(kafka_settings, group="round-trip"))
    consumer.subscribe([kafka_settings.events_topic])
    received: list[Event] = []
    partitions_of_user: dict[str, set[int]] = {}
    deadline = time.monotonic() + 30
    while len(received) < len(sent) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        event = parse_event(message.value(), message.key())
        received.append(event)
        partitions_of_user.setdefault(event.user_id, set()).add(partition_of(message))
    consumer.close()

    assert sorted(received, key=lambda e: e.event_id) == sorted(sent, key=lambda e: e.event_id)
    # Keyed by user: each user's events sit in one partition, hence stay in order.
    assert all(len(p) == 1 for p in partitions_of_user.values())
    for user in partitions_of_user:
        mine = [e.ts for e in received if e.user_id == user]
        assert mine == sorted(mine)


def test_creating_topics_twice_is_harmless(kafka_settings: Settings) -> None:
    again = create_topics(kafka_settings)
    assert [r.created for r in again] == [False] * len(again)
    assert {r.name: r.partitions for r in again} == wanted_topics(kafka_settings)


def test_new_topics_carry_min_insync_replicas_as_their_own_setting(
    kafka_settings: Settings,
) -> None:
    from confluent_kafka.admin import ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, kafka_settings.events_topic)
    admin = admin_client(kafka_settings)  # kept: the answer needs the client alive
    described = admin.describe_configs([resource])[resource].result()
    entry = described["min.insync.replicas"]
    assert (entry.value, entry.is_default) == (str(kafka_settings.topic_min_insync_replicas), False)
    reports = create_topics(kafka_settings)
    assert {r.replication_factor for r in reports} == {kafka_settings.topic_replication_factor}


def test_a_replication_factor_beyond_the_cluster_is_refused_naming_the_option(
    kafka_settings: Settings,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    replicated = kafka_settings.replace(
        events_topic=f"events-{suffix}",
        recommendations_topic=f"recommendations-{suffix}",
        dlq_topic=f"events.dlq-{suffix}",
        topic_replication_factor=3,
    )
    with pytest.raises(TopicError, match=r"factor 3 was asked of a cluster of 1 broker.*--replic"):
        create_topics(replicated)


def test_min_insync_replicas_above_the_factor_is_refused_before_asking_the_cluster() -> None:
    # No broker listens on port 1: the refusal comes before any request.
    settings = Settings(brokers="127.0.0.1:1", topic_min_insync_replicas=2)
    with pytest.raises(TopicError, match=r"min.insync.replicas .* replication factor \(1\)"):
        create_topics(settings)


def test_the_secured_listener_is_added_beside_plaintext_only_when_asked(tmp_path: Path) -> None:
    settings = Settings.from_env(kafka_port=9092, kafka_controller_port=9093, kafka_dir=tmp_path)
    password = f"pw-{uuid.uuid4().hex}"
    secured = SecuredListener(9094, tmp_path / "broker.pem", {"app": password})

    plain = LocalKafka(settings).broker_properties()
    both = LocalKafka(settings, secured=secured).broker_properties()

    assert "SASL_SSL" not in "".join(plain.values())
    assert both["listeners"] == plain["listeners"] + ",SASL_SSL://127.0.0.1:9094"
    assert both["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092,SASL_SSL://127.0.0.1:9094"
    # The broker and its controller keep talking PLAINTEXT: no credentials of their own.
    assert both["inter.broker.listener.name"] == "PLAINTEXT"
    assert both["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert password not in "".join(both.values())


def test_a_scram_user_is_formatted_from_its_salted_password_never_the_password() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    credential = _scram_credential("app", password)
    assert credential.startswith("SCRAM-SHA-512=[name=app,iterations=")
    assert password not in credential
    # A fresh salt each time: two brokers never store the same credential.
    assert credential != _scram_credential("app", password)


def test_up_twice_is_harmless_and_down_leaves_no_broker_behind(tmp_path: Path) -> None:
    settings = Settings.from_env(
        kafka_port=free_port(), kafka_controller_port=free_port(), kafka_dir=tmp_path / "k"
    )
    broker = LocalKafka(settings, log=lambda _: None)
    first = broker.up()
    second = broker.up()
    assert first.running and second.running and first.pid == second.pid
    assert len(our_brokers(settings.kafka_dir)) == 1

    assert broker.down() is True
    assert our_brokers(settings.kafka_dir) == []
    assert not broker.status().running
    assert broker.down() is False


def test_a_taken_port_is_reported_before_starting(kafka: LocalKafka, tmp_path: Path) -> None:
    settings = Settings.from_env(
        kafka_port=kafka.settings.kafka_port,
        kafka_controller_port=free_port(),
        kafka_dir=tmp_path / "other",
    )
    with pytest.raises(KafkaLauncherError, match=f"port {kafka.settings.kafka_port}"):
        LocalKafka(settings, log=lambda _: None).up()


def test_a_missing_maven_is_reported_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrec.tools import kafka_local

    monkeypatch.setattr(kafka_local.shutil, "which", lambda _: None)
    settings = Settings.from_env(kafka_jars_dir=tmp_path / "empty-cache")
    with pytest.raises(KafkaLauncherError, match="Maven"):
        kafka_local.ensure_jars(settings, log=lambda _: None)


def test_an_unknown_kafka_version_fails_with_mavens_reason(tmp_path: Path) -> None:
    # Unverified jars are allowed here, or the version would be refused before Maven runs.
    settings = Settings.from_env(
        kafka_jars_dir=tmp_path / "cache", kafka_version="0.0.0-nope", kafka_jars_unverified=True
    )
    with pytest.raises(KafkaLauncherError, match="could not resolve"):
        ensure_jars(settings, log=lambda _: None)
