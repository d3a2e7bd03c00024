"""docker-compose.yml runs the broker with the same settings as the local launcher."""

from __future__ import annotations

from pathlib import Path

import yaml

from streamrec.settings import REPO_ROOT, Settings
from streamrec.tools.kafka_local import SINGLE_NODE_PROPERTIES, LocalKafka

COMPOSE = REPO_ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_name(prop: str) -> str:
    return "KAFKA_" + prop.upper().replace(".", "_")


def test_the_compose_broker_uses_the_official_kafka_4_image_in_kraft_mode() -> None:
    kafka = compose()["services"]["kafka"]
    image, version = kafka["image"].split(":")
    assert image == "apache/kafka" and version.startswith("4.")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_the_compose_broker_has_the_launchers_single_node_settings() -> None:
    environment = compose()["services"]["kafka"]["environment"]
    expected = {env_name(k): v for k, v in SINGLE_NODE_PROPERTIES.items()}
    assert {k: environment.get(k) for k in expected} == expected


def test_the_launchers_heap_matches_the_compose_broker(tmp_path: Path) -> None:
    environment = compose()["services"]["kafka"]["environment"]
    assert environment["KAFKA_HEAP_OPTS"] == Settings().kafka_heap
    launcher = LocalKafka(Settings.from_env(kafka_dir=tmp_path)).broker_properties()
    assert launcher["process.roles"] == environment["KAFKA_PROCESS_ROLES"]


def test_the_compose_broker_sets_every_setting_the_launcher_sets(tmp_path: Path) -> None:
    environment = compose()["services"]["kafka"]["environment"]
    launcher = LocalKafka(Settings.from_env(kafka_dir=tmp_path)).broker_properties()
    assert {env_name(k) for k in launcher} - set(environment) == set()


def test_both_brokers_serve_their_clients_plaintext(tmp_path: Path) -> None:
    # The SASL_SSL listener needs certificates and users made for it: the tests make
    # their own, a deployment has its cluster's.  Neither broker ships one by default.
    environment = compose()["services"]["kafka"]["environment"]
    launcher = LocalKafka(Settings.from_env(kafka_dir=tmp_path)).broker_properties()
    for protocol_map in (
        environment["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"],
        launcher["listener.security.protocol.map"],
    ):
        assert {pair.split(":")[1] for pair in protocol_map.split(",")} == {"PLAINTEXT"}


def test_the_flow_services_use_only_known_settings() -> None:
    known = {f"STREAMREC_{name.upper()}" for name in Settings.__dataclass_fields__}
    for name in ("topics-init", "flow"):
        environment = compose()["services"][name]["environment"]
        assert set(environment) <= known, set(environment) - known


def test_every_published_port_listens_on_the_hosts_loopback_only() -> None:
    published = {name: service.get("ports", []) for name, service in compose()["services"].items()}
    assert published["kafka"] and published["flow"]  # the broker's clients, /metrics
    for name, ports in published.items():
        for port in ports:
            # "HOST_IP:HOST_PORT:CONTAINER_PORT"; without HOST_IP Docker binds 0.0.0.0.
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_docker_compose_accepts_the_file() -> None:
    import os
    import shutil
    import subprocess

    import pytest

    client = shutil.which("docker-compose")
    if client is None:
        # `make test` installs the client where it can; CI must not skip this check.
        assert not os.environ.get("CI"), "CI has no docker-compose client (see `make test`)"
        pytest.skip("no docker-compose client on this machine to validate with")
    result = subprocess.run(
        [client, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
