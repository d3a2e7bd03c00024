"""What the sessions' changelog costs on the broker: its records are compressed."""

from __future__ import annotations

import random

import pytest

from streamrec.bench.state import full_sessions
from streamrec.kafka_clients import changelog_producer_config, producer_config
from streamrec.settings import Settings
from streamrec.state.changelog import ChangelogWriter
from streamrec.state.session import encode_session
from streamrec.tools.kafka_local import LocalKafka


def test_the_changelog_is_compressed_and_the_answers_are_not() -> None:
    settings = Settings()
    assert changelog_producer_config(settings)["compression.type"] == "zstd"
    assert producer_config(settings)["compression.type"] == "none"  # ~200-byte answers


def test_a_deployments_own_client_settings_still_win_over_the_changelogs() -> None:
    settings = Settings(kafka_options="compression.type=gzip")
    assert changelog_producer_config(settings)["compression.type"] == "gzip"


@pytest.mark.kafka
def test_the_broker_stores_the_changelog_in_a_fraction_of_its_bytes(
    kafka: LocalKafka, kafka_settings: Settings
) -> None:
    writer = ChangelogWriter(kafka_settings, "topic-id")
    sessions = list(full_sessions(500, kafka_settings.session_length, random.Random(3)))
    changes = [(s.user_id.encode(), encode_session(s)) for s in sessions]
    for at in range(0, len(changes), 10):  # ten users a commit
        writer.send(0, changes[at : at + 10], at + 9)
    assert writer.flush() == 0
    produced = sum(writer.produced_bytes.values())
    segments = kafka.data_dir / f"{kafka_settings.sessions_changelog}-0"
    stored = sum(f.stat().st_size for f in segments.glob("*.log"))
    assert 0 < stored < produced / 2
