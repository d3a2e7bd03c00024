"""`streamrec kafka up|down|status` and `streamrec topics create`."""

from __future__ import annotations

from pathlib import Path

import click

from streamrec.kafka_clients import KafkaConfigError, KafkaUnavailable
from streamrec.settings import Settings
from streamrec.tools.kafka_jars import DIGESTS_FILE
from streamrec.tools.kafka_local import KafkaLauncherError, LocalKafka, record_jar_digests
from streamrec.topics import TopicError, create_topics


def _broker_options(func: click.decorators.FC) -> click.decorators.FC:
    func = click.option(
        "--dir",
        "kafka_dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Broker data, logs and pid file [default: run/kafka in the checkout].",
    )(func)
    func = click.option(
        "--controller-port", type=int, default=None, help="KRaft controller port [default: 9093]."
    )(func)
    func = click.option(
        "--port", type=int, default=None, help="Client (PLAINTEXT) port [default: 9092]."
    )(func)
    return func


def _local_kafka(
    port: int | None, controller_port: int | None, kafka_dir: Path | None
) -> LocalKafka:
    settings = Settings.from_env(
        kafka_port=port, kafka_controller_port=controller_port, kafka_dir=kafka_dir
    )
    return LocalKafka(settings, log=click.echo)


@click.group("kafka")
def kafka_group() -> None:
    """A real single-node Apache Kafka broker on 127.0.0.1 (no Docker needed).

    The broker's jars are resolved from Maven Central on first use and cached
    in ~/.cache/streamrec/kafka-jars; before every start each is checked against
    the sha256 recorded in tools/kafka_jars.sha256. The broker runs with this
    machine's Java 17 in KRaft mode (combined broker and controller).
    """


@kafka_group.command("up")
@_broker_options
def kafka_up(port: int | None, controller_port: int | None, kafka_dir: Path | None) -> None:
    """Start the broker and wait until it serves clients (no-op when it already runs)."""
    try:
        click.echo(_local_kafka(port, controller_port, kafka_dir).up().describe())
    except KafkaLauncherError as err:
        raise click.ClickException(str(err)) from None


@kafka_group.command("down")
@_broker_options
def kafka_down(port: int | None, controller_port: int | None, kafka_dir: Path | None) -> None:
    """Stop the broker cleanly (SIGTERM, then SIGKILL after 30 s)."""
    _local_kafka(port, controller_port, kafka_dir).down()


@kafka_group.command("status")
@_broker_options
def kafka_status(port: int | None, controller_port: int | None, kafka_dir: Path | None) -> None:
    """Say whether the broker runs, where, and where its logs are."""
    status = _local_kafka(port, controller_port, kafka_dir).status()
    click.echo(status.describe())
    if status.running:
        # The local broker's own PLAINTEXT listener: a deployment's client settings
        # (for its cluster) do not apply here.
        from confluent_kafka.admin import AdminClient

        topics = AdminClient({"bootstrap.servers": status.bootstrap}).list_topics(timeout=5).topics
        names = sorted(t for t in topics if not t.startswith("__"))
        click.echo(f"  topics:     {', '.join(names) or '(none)'}")


@kafka_group.command("digests")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DIGESTS_FILE,
    help="The digests file to update [default: tools/kafka_jars.sha256 of this install].",
)
def kafka_digests(output: Path) -> None:
    """Record the sha256 of the broker's jars (of STREAMREC_KAFKA_VERSION), for a new version.

    Maven downloads every jar afresh from Maven Central into an empty local repository,
    checking each against Central's published checksum; their sha256 replace that
    version's lines in the file, which then belongs in a commit. Needs Maven Central.
    """
    settings = Settings.from_env()
    try:
        count = record_jar_digests(settings, output, log=click.echo)
    except KafkaLauncherError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"kafka: recorded {count} jars of Apache Kafka {settings.kafka_version} in {output}")


@click.group("topics")
def topics_group() -> None:
    """The topics streamrec reads and writes."""


@topics_group.command("create")
@click.option("--brokers", default=None, help="Kafka bootstrap servers [default: 127.0.0.1:9092].")
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Partitions of the events and recommendations topics [default: 4]. Events are keyed "
    "by user, so this bounds how many processes can share the load.",
)
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    default=None,
    help="Replicas of every partition [default: 1, for the local broker]. Managed clusters "
    "(Confluent Cloud, MSK, Aiven) refuse 1: use 3.",
)
@click.option(
    "--min-insync-replicas",
    type=click.IntRange(min=1),
    default=None,
    help="min.insync.replicas of every topic: replicas that must hold a record before a write "
    "succeeds [default: 1]; at most the replication factor (2 with a factor of 3).",
)
def topics_create(
    brokers: str | None,
    partitions: int | None,
    replication_factor: int | None,
    min_insync_replicas: int | None,
) -> None:
    """Create the events, recommendations and dead-letter topics (idempotent).

    Topics that exist are left as they are and reported with their shape.
    On a secured cluster, give the client settings first:

    \b
      streamrec --kafka-config client.properties topics create \\
          --replication-factor 3 --min-insync-replicas 2
    """
    settings = Settings.from_env(
        brokers=brokers,
        topic_replication_factor=replication_factor,
        topic_min_insync_replicas=min_insync_replicas,
    )
    try:
        for report in create_topics(settings, partitions):
            click.echo(report.describe())
    except (TopicError, KafkaUnavailable, KafkaConfigError) as err:
        raise click.ClickException(str(err)) from None
