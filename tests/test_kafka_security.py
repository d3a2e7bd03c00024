"""Secured clusters: every streamrec client speaks SASL_SSL (SCRAM-SHA-512 over TLS).

A broker of this module's own serves a SASL_SSL listener beside PLAINTEXT,
with a CA and a broker certificate made here; the clients are given only the
secured listener's address and a ``client.properties`` file, as a user of a
managed cluster would give them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streamrec.flows.cli import EXIT_CONFIGURATION
from streamrec.kafka_clients import KafkaConfigError, admin_client, extra_client_settings
from streamrec.settings import EXACTLY_ONCE, Settings
from streamrec.tools.kafka_local import LocalKafka, SecuredListener
from tests.conftest import free_port, own_topics_and_state
from tests.flow_harness import FlowProcess

pytestmark = pytest.mark.kafka

USER = "streamrec-app"
# A user the broker knows but lets do nothing, as a managed cluster's ACLs would.
OUTSIDER = "outsider"
# Distinctive, so that finding one in any output means it leaked.
PASSWORD = f"pw-{uuid.uuid4().hex}"
OUTSIDER_PASSWORD = f"pw-{uuid.uuid4().hex}"
# A user the ACLs let use the topics and groups, but no transactional id.
PARTNER = "partner"
PARTNER_PASSWORD = f"pw-{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"
EVENTS = 120


def valid_for_this_test() -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def make_tls(folder: Path) -> tuple[Path, Path]:
    """A CA and a broker certificate for 127.0.0.1 it signed: (broker keystore PEM, CA PEM)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streamrec test CA")])
    ca = (
        valid_for_this_test()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        valid_for_this_test()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Clients check the address they dialled against the certificate's IP SAN.
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    keystore = folder / "broker.pem"
    keystore.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + certificate.public_bytes(pem)
        + ca.public_bytes(pem)
    )
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    return keystore, ca_file


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The broker's keystore and the CA that signed its certificate."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured_kafka(
    tls: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKafka]:
    """A broker with a SASL_SSL listener: USER may do anything, OUTSIDER nothing."""
    keystore, _ = tls
    settings = Settings.from_env(
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        kafka_dir=tmp_path_factory.mktemp("secured-kafka"),
        kafka_heap="-Xms128m -Xmx512m",
    )
    users = {USER: PASSWORD, OUTSIDER: OUTSIDER_PASSWORD, PARTNER: PARTNER_PASSWORD}
    secured = SecuredListener(free_port(), keystore, users, super_users=frozenset({USER}))
    broker = LocalKafka(settings, log=lambda _: None, secured=secured)
    broker.up()
    yield broker
    broker.down()


@pytest.fixture
def client_properties(tls: tuple[Path, Path], tmp_path: Path) -> Path:
    """What a user of a managed cluster writes: protocol, mechanism, login, the CA."""
    path = tmp_path / "client.properties"
    path.write_text(
        "# the cluster's CA signed the broker's certificate\n"
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism=SCRAM-SHA-512\n"
        f"sasl.username={USER}\n"
        f"sasl.password={PASSWORD}\n"
        f"ssl.ca.location={tls[1]}\n"
    )
    path.chmod(0o600)  # it holds a password: readable by its owner alone
    return path


@pytest.fixture
def secured_settings(
    secured_kafka: LocalKafka, client_properties: Path, tmp_path: Path
) -> Settings:
    """Settings that reach the broker through its secured listener only, on fresh topics."""
    assert secured_kafka.secured is not None
    secured = Settings.from_env(
        brokers=secured_kafka.secured.bootstrap, kafka_config=str(client_properties)
    )
    return own_topics_and_state(secured, tmp_path)


def streamrec(
    settings: Settings, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """A `streamrec` command in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "streamrec", *args],
        env={**os.environ, **settings.to_env()},
        cwd=cwd,
        capture_output=True,
        text=True,
        # A guard against a hang, not a measurement.
        timeout=300,
    )


def with_login(settings: Settings, tmp_path: Path, **login: str) -> Settings:
    """``settings`` whose properties file gives this ``sasl.username``/``sasl.password``."""
    path = tmp_path / f"client-{uuid.uuid4().hex}.properties"
    lines = Path(settings.kafka_config).read_text().splitlines()
    lines += [f"{name.replace('_', '.')}={value}" for name, value in login.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return settings.replace(kafka_config=str(path))


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        for secret in (PASSWORD, OUTSIDER_PASSWORD, PARTNER_PASSWORD, WRONG_PASSWORD):
            assert secret not in output


def test_topics_flow_replay_and_latency_work_through_the_sasl_ssl_listener(
    secured_settings: Settings, client_properties: Path, tmp_path: Path
) -> None:
    # The properties file named on the command line, as the README shows it.
    created = streamrec(
        secured_settings.replace(kafka_config=""),
        "--kafka-config",
        str(client_properties),
        "topics",
        "create",
    )
    assert created.returncode == 0, created.stderr
    assert f"{secured_settings.events_topic}: created, 2 partition(s)" in created.stdout

    flow = FlowProcess(secured_settings, log=tmp_path / "flow.log").start()
    latency: subprocess.Popen[str] | None = None
    try:
        figures = tmp_path / "latency.json"
        latency = subprocess.Popen(
            [sys.executable, "-m", "streamrec", "latency", "--count", str(EVENTS)]
            + ["--json", str(figures)],
            env={**os.environ, **secured_settings.to_env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert latency.stdout is not None
        # It says when it listens: events sent from then on are measured.
        heard = ""
        while "listening" not in heard:
            line = latency.stdout.readline()
            assert line, heard  # it ended without listening
            heard += line

        replayed = streamrec(
            secured_settings, "replay", "--count", str(EVENTS), "--rate", "200", "--no-progress"
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr

        rest, _ = latency.communicate(timeout=300)
        assert latency.returncode == 0, heard + rest + flow.output()[-3000:]
        assert orjson.loads(figures.read_bytes())["matched"] == EVENTS
        assert flow.stop() == 0, flow.output()[-3000:]
    finally:
        if latency is not None and latency.poll() is None:
            latency.kill()
            latency.wait()
        FlowProcess.kill_all()
    assert_no_secret(created.stdout + created.stderr, heard + rest, flow.output())
    assert_no_secret(replayed.stdout + replayed.stderr)


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        (["topics", "create"], 1),
        (["run"], EXIT_CONFIGURATION),
        (["replay", "--count", "1", "--no-progress"], 1),
        (["latency", "--count", "1"], 1),
        (["record", "--count", "1", "--out", "unused.jsonl", "--no-progress"], 1),
    ],
)
def test_a_wrong_password_fails_at_once_saying_authentication_failed(
    secured_settings: Settings, command: Sequence[str], exit_code: int, tmp_path: Path
) -> None:
    # A later line of the properties file wins, so this password is the one tried.
    wrong = with_login(secured_settings, tmp_path, sasl_password=WRONG_PASSWORD)
    done = streamrec(wrong, *command, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == exit_code, output
    # Said as what it is, after the broker refused the login: not a broker that is not there.
    assert "authentication failed" in output, output
    assert "cannot reach Kafka" not in output
    assert_no_secret(output)


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["topics", "create"], "may not create topics"),
        (["replay", "--count", "1", "--no-progress"], "not allowed to describe topic"),
        (["run"], "not allowed to describe topic"),
    ],
)
def test_a_user_without_rights_is_told_so_not_that_a_topic_is_missing(
    secured_settings: Settings, command: Sequence[str], said: str, tmp_path: Path
) -> None:
    outsider = with_login(
        secured_settings, tmp_path, sasl_username=OUTSIDER, sasl_password=OUTSIDER_PASSWORD
    )
    done = streamrec(outsider, *command)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and said in output, output
    if command == ["run"]:
        assert done.returncode == EXIT_CONFIGURATION  # a person must grant the rights
    assert "does not exist" not in output
    assert_no_secret(output)


def grant_topics_and_groups(settings: Settings, user: str) -> None:
    """ACLs that let ``user`` do anything with every topic and consumer group, nothing more."""
    admin = admin_client(settings)
    bindings = [
        AclBinding(
            kind,
            "*",
            ResourcePatternType.LITERAL,
            f"User:{user}",
            "*",
            AclOperation.ALL,
            AclPermissionType.ALLOW,
        )
        for kind in (ResourceType.TOPIC, ResourceType.GROUP)
    ]
    for future in admin.create_acls(bindings).values():
        future.result()


def test_exactly_once_without_rights_to_its_transactional_ids_stops_for_a_person(
    secured_settings: Settings, tmp_path: Path
) -> None:
    assert streamrec(secured_settings, "topics", "create").returncode == 0
    grant_topics_and_groups(secured_settings, PARTNER)
    partner = with_login(
        secured_settings, tmp_path, sasl_username=PARTNER, sasl_password=PARTNER_PASSWORD
    ).replace(guarantee=EXACTLY_ONCE)
    done = streamrec(partner, "run")
    output = done.stdout + done.stderr
    # Not exit 1 and a restart for ever: the ACLs must change first.
    assert done.returncode == EXIT_CONFIGURATION, output[-3000:]
    assert "not allowed to use transactional id" in output, output[-3000:]
    assert_no_secret(output)


def test_a_broker_certificate_from_another_ca_is_refused_naming_ssl_ca_location(
    secured_settings: Settings, tmp_path: Path
) -> None:
    _, other_ca = make_tls(tmp_path)
    done = streamrec(
        secured_settings, "--kafka-config", f"ssl.ca.location={other_ca}", "topics", "create"
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "TLS handshake" in output and "ssl.ca.location" in output, output
    assert_no_secret(output)


@pytest.mark.parametrize(
    "command",
    [["config"], ["--help"], ["run", "--help"], ["topics", "create", "--help"]],
)
def test_settings_and_help_never_show_the_password(
    secured_settings: Settings, command: Sequence[str], tmp_path: Path
) -> None:
    wrong = with_login(secured_settings, tmp_path, sasl_password=WRONG_PASSWORD)
    done = streamrec(wrong, *command)
    assert done.returncode == 0, done.stderr
    assert_no_secret(done.stdout + done.stderr)


@pytest.mark.parametrize("setting", ["sasl.password", "ssl.key.password", "sasl.jaas.config"])
def test_a_secret_on_the_command_line_is_refused_pointing_to_the_file(setting: str) -> None:
    # Anyone on the machine reads a command line (ps, /proc/*/cmdline); it is refused
    # before any client is made, and the value is not repeated.
    done = streamrec(Settings(), "--kafka-config", f"{setting}={WRONG_PASSWORD}", "config")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert setting in output and "properties file readable by you alone" in output
    assert_no_secret(output)


def test_a_secret_in_the_inline_options_is_refused_as_the_command_line_is() -> None:
    # They go into the environment of every process a command starts (a flow, a benchmark).
    settings = Settings(kafka_options=f"security.protocol=SASL_SSL\nsasl.password={PASSWORD}")
    with pytest.raises(KafkaConfigError, match="sasl.password: secrets are not taken") as err:
        extra_client_settings(settings)
    assert PASSWORD not in str(err.value)


def test_a_file_path_and_a_url_inline_are_no_secrets() -> None:
    inline = "ssl.key.location=/etc/k.pem\nsasl.oauthbearer.token.endpoint.url=https://idp/t"
    assert extra_client_settings(Settings(kafka_options=inline))["ssl.key.location"] == "/etc/k.pem"


def test_a_properties_file_with_secrets_open_to_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "client.properties"
    path.write_text(f"sasl.password={PASSWORD}\n")
    path.chmod(0o644)
    extra_client_settings(Settings(kafka_config=str(path)))
    assert "open to other users (mode 0o644): chmod 600" in caplog.text
    assert PASSWORD not in caplog.text
