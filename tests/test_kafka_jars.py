"""The broker runs only jars whose sha256 matches tools/kafka_jars.sha256.

Each test works on its own copy of the jars cache (never on the shared one, never with a
download): the copy is what a user's ~/.cache/streamrec would hold.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamrec.settings import Settings
from streamrec.tools import kafka_local
from streamrec.tools.kafka_jars import (
    expected_digests,
    jar_digests,
    parse_digests,
    record_digests,
)
from streamrec.tools.kafka_local import KafkaLauncherError, ensure_jars
from tests.conftest import free_port

VERSION = Settings().kafka_version


@pytest.fixture(scope="module")
def cached_jars() -> Path:
    """The shared cache's jars of the pinned Kafka (resolved once if this machine has none)."""
    return ensure_jars(Settings(), log=lambda _: None)


@pytest.fixture
def jars_dir(cached_jars: Path, tmp_path: Path) -> Path:
    """A kafka_jars_dir holding a copy of the cache's folder for the pinned version."""
    shutil.copytree(cached_jars, tmp_path / "cache" / cached_jars.name)
    return tmp_path / "cache"


def flip_a_byte(jar: Path) -> None:
    """Change one byte in the middle of ``jar``, keeping its size."""
    data = bytearray(jar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    jar.write_bytes(bytes(data))


def test_the_recorded_digests_cover_the_pinned_broker_and_its_logging() -> None:
    expected = expected_digests(f"kafka-{VERSION}")
    log4j = Settings().log4j_version
    for jar in (f"kafka_2.13-{VERSION}.jar", f"kafka-clients-{VERSION}.jar"):
        assert jar in expected
    for jar in (f"log4j-core-{log4j}.jar", f"log4j-slf4j-impl-{log4j}.jar"):
        assert jar in expected


def test_an_intact_copy_of_the_cache_is_used(jars_dir: Path) -> None:
    settings = Settings.from_env(kafka_jars_dir=jars_dir)
    assert ensure_jars(settings, log=lambda _: None) == jars_dir / f"kafka-{VERSION}"


def test_kafka_up_refuses_a_cache_with_one_byte_changed_and_names_the_jar(
    jars_dir: Path, tmp_path: Path
) -> None:
    jar = jars_dir / f"kafka-{VERSION}" / f"kafka-clients-{VERSION}.jar"
    flip_a_byte(jar)
    broker_dir = tmp_path / "kafka"
    done = subprocess.run(
        [sys.executable, "-m", "streamrec", "kafka", "up", "--dir", str(broker_dir)]
        + ["--port", str(free_port()), "--controller-port", str(free_port())],
        env={**os.environ, "STREAMREC_KAFKA_JARS_DIR": str(jars_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"{jar.name}: sha256 " in done.stderr
    assert "not used" in done.stderr
    # Refused before anything ran: no broker, no formatted storage.
    assert not (broker_dir / "broker.pid").exists()
    assert not (broker_dir / "data" / "meta.properties").exists()


def test_a_missing_and_an_added_jar_are_both_named(jars_dir: Path) -> None:
    folder = jars_dir / f"kafka-{VERSION}"
    (folder / f"kafka-raft-{VERSION}.jar").unlink()
    (folder / "extra-1.0.jar").write_bytes(b"PK\x03\x04")
    settings = Settings.from_env(kafka_jars_dir=jars_dir)
    with pytest.raises(KafkaLauncherError) as refused:
        ensure_jars(settings, log=lambda _: None)
    assert f"kafka-raft-{VERSION}.jar: missing" in str(refused.value)
    assert "extra-1.0.jar: not in the recorded set" in str(refused.value)


def test_jars_resolved_with_a_wrong_digest_are_not_cached(
    cached_jars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Maven copies from ~/.m2, which it does not check again: an altered copy there.
    def resolve_altered(settings: Settings, work: Path) -> Path:
        staging = shutil.copytree(cached_jars, work / "jars")
        flip_a_byte(staging / f"kafka_2.13-{VERSION}.jar")
        return staging

    monkeypatch.setattr(kafka_local, "resolve_jars", resolve_altered)
    settings = Settings.from_env(kafka_jars_dir=tmp_path / "cache")
    with pytest.raises(KafkaLauncherError, match=f"kafka_2.13-{VERSION}.jar: sha256"):
        ensure_jars(settings, log=lambda _: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_version_without_recorded_digests_is_refused_before_maven_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_maven(_: str) -> None:
        raise AssertionError("Maven must not be asked for unverifiable jars")

    monkeypatch.setattr(kafka_local.shutil, "which", no_maven)
    settings = Settings.from_env(kafka_jars_dir=tmp_path / "cache", kafka_version="9.9.9")
    with pytest.raises(KafkaLauncherError, match="STREAMREC_KAFKA_JARS_UNVERIFIED=1"):
        ensure_jars(settings, log=lambda _: None)


def test_a_version_without_digests_runs_unverified_only_when_allowed_and_says_so(
    cached_jars: Path, tmp_path: Path
) -> None:
    shutil.copytree(cached_jars, tmp_path / "cache" / "kafka-9.9.9")
    settings = Settings.from_env(
        kafka_jars_dir=tmp_path / "cache", kafka_version="9.9.9", kafka_jars_unverified=True
    )
    said: list[str] = []
    assert ensure_jars(settings, log=said.append) == tmp_path / "cache" / "kafka-9.9.9"
    assert any("UNVERIFIED" in line for line in said)


def test_recording_a_set_keeps_the_others_and_reads_back_as_written(
    cached_jars: Path, tmp_path: Path
) -> None:
    digests_file = tmp_path / "kafka_jars.sha256"
    other = tmp_path / "kafka-0.1"
    other.mkdir()
    (other / "a-1.jar").write_bytes(b"a")
    record_digests(other, digests_file)
    assert record_digests(cached_jars, digests_file) == len(list(cached_jars.glob("*.jar")))
    sets = parse_digests(digests_file.read_text().splitlines())
    assert sets == {other.name: jar_digests(other), cached_jars.name: jar_digests(cached_jars)}
