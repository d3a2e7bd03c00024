"""A real single-node Apache Kafka broker on this machine, without Docker.

``LocalKafka`` resolves the broker's jars from Maven Central once (cached
outside the checkout, each jar checked against the sha256 digests recorded in
tools/kafka_jars.sha256 before every start), formats KRaft storage, and runs one combined
broker+controller on 127.0.0.1 with the machine's Java 17.  It owns the
broker's process: ``up`` is idempotent, ``down`` leaves nothing behind.
Clients use its PLAINTEXT listener; with a ``SecuredListener`` it also
serves SASL_SSL (SCRAM-SHA-512 over TLS), as managed clusters do, so that
the secured client path can be tested end to end.

>>> kafka = LocalKafka(Settings())          # doctest: +SKIP
>>> kafka.up(); kafka.status().running      # doctest: +SKIP
True
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from streamrec.settings import Settings
from streamrec.tools.kafka_jars import (
    DIGESTS_FILE,
    expected_digests,
    jar_digests,
    mismatches,
    record_digests,
)

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
NODE_ID = 1
# Shared by the local launcher and docker-compose.yml (tests/test_compose.py checks).
SINGLE_NODE_PROPERTIES: dict[str, str] = {
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "default.replication.factor": "1",
    "group.initial.rebalance.delay.ms": "0",
    # Topics are created on purpose (`streamrec topics create`), never by a typo.
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    # Two cores are shared with the dataflow: few broker threads.
    "num.network.threads": "2",
    "num.io.threads": "4",
    "log.retention.hours": "168",
}


# The secured listener's name is its protocol: clients name it in security.protocol.
SASL_SSL = "SASL_SSL"
SCRAM_MECHANISM = "SCRAM-SHA-512"
# Kafka's own default; stored with each credential, so a client needs no setting for it.
SCRAM_ITERATIONS = 8192


@dataclass(frozen=True, slots=True)
class SecuredListener:
    """A SASL_SSL listener beside PLAINTEXT: SCRAM-SHA-512 logins over TLS.

    ``keystore`` is a PEM file holding the broker's private key (PKCS#8, not
    encrypted) and its certificate chain; the certificate must name 127.0.0.1
    (an IP SAN), which clients verify.  ``users`` (name -> password) get SCRAM
    credentials when the storage is formatted, that is at the broker's first
    start: a broker's users are fixed then.  With ``super_users`` the broker
    checks ACLs, as managed clusters do: those users may do anything, the
    others nothing (no ACLs are made); without, every user may do anything.
    """

    port: int
    keystore: Path
    users: Mapping[str, str] = field(default_factory=dict)
    super_users: frozenset[str] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class KafkaLauncherError(RuntimeError):
    """The local broker could not be prepared, started or stopped; the message says what to do."""


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    controller_port: int
    data_dir: Path
    log_file: Path
    secured_bootstrap: str | None = None

    def describe(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "not running"
        secured = (
            f"  sasl_ssl:   {self.secured_bootstrap} ({SCRAM_MECHANISM})\n"
            if self.secured_bootstrap
            else ""
        )
        return (
            f"kafka: {state}\n"
            f"  bootstrap:  {self.bootstrap}\n"
            f"{secured}"
            f"  controller: 127.0.0.1:{self.controller_port}\n"
            f"  data:       {self.data_dir}\n"
            f"  log:        {self.log_file}"
        )


class LocalKafka:
    """Prepares, starts, inspects and stops the broker whose files are in ``settings.kafka_dir``."""

    def __init__(
        self,
        settings: Settings,
        log: Callable[[str], None] = print,
        secured: SecuredListener | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self.secured = secured
        self.home = settings.kafka_dir
        self.data_dir = self.home / "data"
        self.logs_dir = self.home / "logs"
        self.pid_file = self.home / "broker.pid"
        self.properties_file = self.home / "server.properties"
        self.log4j_file = self.home / "log4j2.properties"
        self.stdout_file = self.logs_dir / "stdout.log"
        self.log_file = self.logs_dir / "server.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.settings.kafka_port}"

    def status(self) -> BrokerStatus:
        pid = self._running_pid()
        return BrokerStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.bootstrap,
            controller_port=self.settings.kafka_controller_port,
            data_dir=self.data_dir,
            log_file=self.log_file,
            secured_bootstrap=self.secured.bootstrap if self.secured else None,
        )

    def up(self) -> BrokerStatus:
        """Start the broker and wait until it serves requests; a no-op when it already runs."""
        if (pid := self._running_pid()) is not None:
            self.log(f"kafka: already running (pid {pid}) at {self.bootstrap}")
            return self.status()
        java = find_java()
        ports = [self.settings.kafka_port, self.settings.kafka_controller_port]
        if self.secured is not None:
            _check_scram_users(self.secured.users)
            ports.append(self.secured.port)
        for port in ports:
            if _port_in_use(port):
                raise KafkaLauncherError(
                    f"port {port} on 127.0.0.1 is already taken by another process; stop it or "
                    "choose other ports (STREAMREC_KAFKA_PORT / STREAMREC_KAFKA_CONTROLLER_PORT "
                    "or --port / --controller-port)"
                )
        jars = ensure_jars(self.settings, self.log)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(java, jars)
        self.log(f"kafka: starting {self.settings.kafka_version} at {self.bootstrap}")
        with self.stdout_file.open("ab") as out:
            process = subprocess.Popen(
                [
                    java,
                    *self.settings.kafka_heap.split(),
                    "-XX:+UseG1GC",
                    "-XX:MaxGCPauseMillis=20",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={self.log4j_file}",
                    f"-Dkafka.logs.dir={self.logs_dir}",
                    "-cp",
                    str(jars / "*"),
                    MAIN_CLASS,
                    str(self.properties_file),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI; `down` signals its process group
            )
        self.pid_file.write_text(str(process.pid))
        self._wait_until_serving(process)
        self.log(f"kafka: up (pid {process.pid}), logs in {self.log_file}")
        return self.status()

    def down(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker: SIGTERM, wait for a clean shutdown, then SIGKILL. True if one ran."""
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            self.log("kafka: not running")
            return False
        self.log(f"kafka: stopping pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout_s):
            self.log(f"kafka: no clean shutdown within {timeout_s:.0f} s, killing")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait_gone(pid, 10.0)
        self.pid_file.unlink(missing_ok=True)
        self.log("kafka: stopped")
        return True

    def kill(self) -> bool:
        """SIGKILL the broker, as a crash would (tests of outages): no clean shutdown."""
        pid = self._running_pid()
        if pid is None:
            return False
        self.log(f"kafka: killing pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)
        self.pid_file.unlink(missing_ok=True)
        return True

    def _running_pid(self) -> int | None:
        """The pid in our pid file if that process is alive and is our broker (not a reused pid)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            cmdline = process.cmdline()
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        if MAIN_CLASS in cmdline and str(self.properties_file) in cmdline:
            return pid
        return None

    def broker_properties(self) -> dict[str, str]:
        """The broker's server.properties; docker-compose.yml sets the same (a test checks)."""
        s = self.settings
        plaintext = f"PLAINTEXT://127.0.0.1:{s.kafka_port}"
        controller = f"CONTROLLER://127.0.0.1:{s.kafka_controller_port}"
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{s.kafka_controller_port}",
            "listeners": f"{plaintext},{controller}",
            "advertised.listeners": plaintext,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # One node: every internal topic must fit a replication factor of 1.
            **SINGLE_NODE_PROPERTIES,
        }
        if self.secured is not None:
            properties |= _secured_listener_properties(self.secured, properties)
        return properties

    def _write_config(self) -> None:
        self.properties_file.write_text(
            "".join(f"{k}={v}\n" for k, v in self.broker_properties().items())
        )
        self.log4j_file.write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = RollingFile",
                    "appender.file.name = file",
                    f"appender.file.fileName = {self.log_file}",
                    f"appender.file.filePattern = {self.log_file}.%i",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "appender.file.policies.type = Policies",
                    "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
                    "appender.file.policies.size.size = 50MB",
                    "appender.file.strategy.type = DefaultRolloverStrategy",
                    "appender.file.strategy.max = 3",
                    "rootLogger.level = INFO",
                    "rootLogger.appenderRef.file.ref = file",
                    "",
                ]
            )
        )

    def _format_storage(self, java: str, jars: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        classpath = str(jars / "*")
        cluster_id = (
            _run([java, "-cp", classpath, STORAGE_TOOL, "random-uuid"], "generate a cluster id")
            .strip()
            .splitlines()[-1]
        )
        # SCRAM users live in the cluster metadata, so they are written with it.
        users = self.secured.users if self.secured is not None else {}
        scram = [arg for user in users.items() for arg in ("--add-scram", _scram_credential(*user))]
        _run(
            [
                java,
                "-cp",
                classpath,
                STORAGE_TOOL,
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.properties_file),
                "--ignore-formatted",
                *scram,
            ],
            "format KRaft storage",
        )

    def _wait_until_serving(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.settings.kafka_start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise KafkaLauncherError(
                    f"the broker exited with code {process.returncode} while starting.\n"
                    f"--- last lines of {self.log_file} ---\n{self._log_tail()}"
                )
            if broker_answers(self.bootstrap):
                return
            time.sleep(0.3)
        self.down()
        raise KafkaLauncherError(
            f"the broker did not answer on {self.bootstrap} within "
            f"{self.settings.kafka_start_timeout_s:.0f} s; it was stopped.\n"
            f"--- last lines of {self.log_file} ---\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 30) -> str:
        chunks = []
        for path in (self.stdout_file, self.log_file):
            if path.exists():
                chunks.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(chunks) or "(no log written)"


def _secured_listener_properties(secured: SecuredListener, plain: dict[str, str]) -> dict[str, str]:
    # Only client connections are secured; the controller and the broker itself keep
    # PLAINTEXT on 127.0.0.1, so no inter-broker credentials are needed.
    address = f"{SASL_SSL}://{secured.bootstrap}"
    prefix = f"listener.name.{SASL_SSL.lower()}."
    mechanism = SCRAM_MECHANISM.lower()
    return {
        "listeners": f"{plain['listeners']},{address}",
        "advertised.listeners": f"{plain['advertised.listeners']},{address}",
        "listener.security.protocol.map": (
            f"{plain['listener.security.protocol.map']},{SASL_SSL}:{SASL_SSL}"
        ),
        f"{prefix}sasl.enabled.mechanisms": SCRAM_MECHANISM,
        # The server side of SCRAM needs a login module but no credentials of its own.
        f"{prefix}{mechanism}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        f"{prefix}ssl.keystore.type": "PEM",
        f"{prefix}ssl.keystore.location": str(secured.keystore),
    } | _authorizer_properties(secured.super_users)


def _authorizer_properties(super_users: frozenset[str] | None) -> dict[str, str]:
    if super_users is None:
        return {}
    # ANONYMOUS is whoever comes over PLAINTEXT: the controller, the broker itself and
    # local tools keep every right; SCRAM users have those of their ACLs.
    principals = ["User:ANONYMOUS", *(f"User:{user}" for user in sorted(super_users))]
    return {
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": ";".join(principals),
    }


def _check_scram_users(users: Mapping[str, str]) -> None:
    # The storage tool parses name=... inside [..., ...]: these characters would break it.
    for name, password in users.items():
        if not name or any(c in name for c in '=,[]" '):
            raise KafkaLauncherError(
                f'SCRAM user name {name!r} must be non-empty, without spaces or any of =,[]"'
            )
        if not password:
            raise KafkaLauncherError(f"SCRAM user {name!r} needs a non-empty password")


def _scram_credential(name: str, password: str) -> str:
    """A ``--add-scram`` value that carries the salted password, never the password itself.

    What the broker stores is derived from the salted password alone (RFC 5802), so
    the password does not appear in the storage tool's command line, where ``ps``
    would show it.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
    return (
        f"{SCRAM_MECHANISM}=[name={name},iterations={SCRAM_ITERATIONS},"
        f'salt="{base64.b64encode(salt).decode()}",'
        f'saltedpassword="{base64.b64encode(salted).decode()}"]'
    )


def find_java() -> str:
    """The ``java`` to run the broker with (``JAVA_HOME`` first); Kafka 4 needs 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not candidate or not Path(candidate).exists():
        raise KafkaLauncherError(
            "Java was not found: install a JDK 17+ "
            "(e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
        )
    version_text = subprocess.run(
        [candidate, "-version"], capture_output=True, text=True, check=False
    ).stderr
    match = re.search(r'version "(\d+)', version_text)
    if match is None or int(match.group(1)) < 17:
        raise KafkaLauncherError(
            f"Kafka 4 needs Java 17 or newer; {candidate} reports: {version_text.strip()[:200]}"
        )
    return candidate


def ensure_jars(settings: Settings, log: Callable[[str], None] = print) -> Path:
    """The folder of the broker's jars, each checked against its recorded sha256.

    Resolved with Maven on first use and cached after; the cache is checked again before
    every use (hashing its ~45 MB costs a small part of the broker's start), and a folder
    that fails the check is not used.  A Kafka version whose digests were not recorded is
    refused unless ``settings.kafka_jars_unverified`` accepts it unchecked.
    """
    target = settings.kafka_jars_dir / f"kafka-{settings.kafka_version}"
    expected = expected_digests(target.name)
    if not expected:
        _accept_unverified(settings, log)
    if (target / ".complete").exists():
        _check_jars(
            target,
            expected,
            f"If nobody changed them on purpose, remove {target}: the jars are resolved again "
            "from Maven Central at the next start",
        )
        return target
    log(f"kafka: resolving Apache Kafka {settings.kafka_version} jars with Maven (once) ...")
    settings.kafka_jars_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.kafka_jars_dir) as work:
        staging = resolve_jars(settings, Path(work))
        _check_jars(
            staging,
            expected,
            "Nothing was cached. Maven copied them from its local repository (~/.m2), which "
            "may hold altered copies: check or remove the jars named there",
        )
        (staging / ".complete").write_text(settings.kafka_version)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def resolve_jars(settings: Settings, work: Path, maven_repo: Path | None = None) -> Path:
    """Resolve the broker's jars with Maven into ``work``/jars and return that folder.

    ``--strict-checksums`` fails the resolution when a download does not match the checksum
    Maven Central publishes beside it (Maven only warns by default).  ``maven_repo`` is a
    local repository to resolve into instead of ~/.m2 (a fresh one downloads every jar).
    """
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaLauncherError(
            "Maven (`mvn`) was not found; it resolves the Kafka broker's jars from Maven Central. "
            "Install it (e.g. `apt-get install maven`)"
        )
    pom = work / "pom.xml"
    pom.write_text(_broker_pom(settings.kafka_version, settings.log4j_version))
    staging = work / "jars"
    repository = [f"-Dmaven.repo.local={maven_repo}"] if maven_repo is not None else []
    result = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            "--strict-checksums",
            *repository,
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise KafkaLauncherError(
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{settings.kafka_version} "
            f"(is Maven Central reachable? is the version right?)\n{tail}"
        )
    return staging


def record_jar_digests(
    settings: Settings, digests_file: Path = DIGESTS_FILE, log: Callable[[str], None] = print
) -> int:
    """Record the sha256 of ``settings.kafka_version``'s jars, downloaded afresh; the count.

    Maven resolves into an empty local repository, so every jar comes from Maven Central
    and is checked against Central's published checksum (``--strict-checksums``); neither
    ~/.m2 nor the jars cache is trusted.
    """
    log(f"kafka: downloading Apache Kafka {settings.kafka_version} jars afresh from Maven ...")
    with tempfile.TemporaryDirectory() as work:
        jars = resolve_jars(settings, Path(work), maven_repo=Path(work) / "repository")
        folder = jars.rename(Path(work) / f"kafka-{settings.kafka_version}")
        return record_digests(folder, digests_file)


def _accept_unverified(settings: Settings, log: Callable[[str], None]) -> None:
    # The broker runs whatever the jars hold, with this user's rights: without recorded
    # digests only Maven's download checks stand behind them, so that takes a decision.
    where = f"{DIGESTS_FILE.name} has no digests for Apache Kafka {settings.kafka_version}"
    if not settings.kafka_jars_unverified:
        raise KafkaLauncherError(
            f"{where}: its jars cannot be verified, so they are not used. Record them from a "
            "checkout with `streamrec kafka digests` (and commit the file), or set "
            "STREAMREC_KAFKA_JARS_UNVERIFIED=1 to run them unverified"
        )
    log(f"kafka: WARNING: {where}; running its jars UNVERIFIED (kafka_jars_unverified is set)")


def _check_jars(folder: Path, expected: dict[str, str], remedy: str) -> None:
    if not expected:
        return
    problems = mismatches(jar_digests(folder), expected)
    if problems:
        listed = "\n".join(f"  {line}" for line in problems)
        raise KafkaLauncherError(
            f"the broker jars in {folder} do not match {DIGESTS_FILE.name}; they are not "
            f"used:\n{listed}\n{remedy}"
        )


def _broker_pom(kafka_version: str, log4j_version: str) -> str:
    # The broker POM brings raft, metadata, storage, coordinators and Scala; the
    # logging runtime is ours to add.  The SLF4J 1.7 binding (log4j-slf4j-impl)
    # matches the slf4j-api the broker is built against; the SLF4J 2 one logs nothing.
    deps = [
        ("org.apache.kafka", "kafka_2.13", kafka_version),
        ("org.apache.logging.log4j", "log4j-core", log4j_version),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", log4j_version),
    ]
    body = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>streamrec</groupId><artifactId>local-kafka</artifactId><version>1</version>"
        f"<packaging>pom</packaging><dependencies>{body}</dependencies></project>"
    )


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KafkaLauncherError(f"could not {what}:\n{(result.stdout + result.stderr)[-2000:]}")
    return result.stdout


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def broker_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """Whether a Kafka broker at ``bootstrap`` (its first address) answers metadata requests."""
    # A closed port is checked first: a client would log a refused connection every 50 ms.
    # An open port is not enough: the broker must have joined the KRaft quorum.
    from confluent_kafka.admin import AdminClient

    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    if not _port_in_use(int(port), host):
        return False
    try:
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
        return False
    return bool(metadata.brokers)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True
