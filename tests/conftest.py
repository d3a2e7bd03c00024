"""Shared fixtures: a real Kafka broker for the session, fresh topics per test."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamrec.contracts import Event
from streamrec.datasets import load_events
from streamrec.settings import Settings
from streamrec.tools.kafka_local import LocalKafka
from streamrec.topics import create_topics, delete_topics, wanted_topics
from tests.flow_harness import FlowProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """One real broker for the whole test session, on free ports, torn down at the end."""
    settings = Settings.from_env(
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        kafka_dir=tmp_path_factory.mktemp("kafka"),
    )
    broker = LocalKafka(settings, log=lambda _: None)
    broker.up()
    yield broker
    broker.down()


@pytest.fixture
def kafka_settings(kafka: LocalKafka, tmp_path: Path) -> Iterator[Settings]:
    """Settings pointing at the test broker, with this test's own fresh topics and state."""
    settings = own_topics_and_state(kafka.settings.replace(brokers=kafka.bootstrap), tmp_path)
    create_topics(settings)
    yield settings
    delete_topics(settings, list(wanted_topics(settings)))


def own_topics_and_state(settings: Settings, tmp_path: Path) -> Settings:
    """``settings`` with a test's own topics (two partitions), state and recovery directories."""
    suffix = uuid.uuid4().hex[:8]
    return settings.replace(
        events_topic=f"events-{suffix}",
        recommendations_topic=f"recommendations-{suffix}",
        dlq_topic=f"events.dlq-{suffix}",
        events_partitions=2,
        state_dir=tmp_path / "state",
        recovery_dir=tmp_path / "recovery",
        metrics_port=0,
    )


@pytest.fixture(scope="session")
def movielens() -> list[Event]:
    """The MovieLens ratings as events, in time order."""
    return load_events(Settings().data_dir)


@pytest.fixture
def no_flow_left_behind() -> Iterator[None]:
    """Kill every flow a test started and left running (after a failure)."""
    yield
    FlowProcess.kill_all()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB filesystem of its own (tmpfs, mounted as root) that a test can fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> None:
    with (directory / "filler").open("wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass
