"""The Kafka client settings every streamrec producer, consumer and admin client shares.

The flow, the Kafka floor of the benchmark, ``replay``, ``record``,
``latency`` and ``topics`` all build their clients from these functions, so
"the same client settings" is true by construction and a tuning change is
made once.  A deployment's own librdkafka settings (security, SASL, TLS, any
tuning) come from one place, ``Settings.kafka_config`` (a properties file)
and ``Settings.kafka_options`` (``KEY=VALUE`` lines, e.g. from
``streamrec --kafka-config KEY=VALUE``), and are added to every client after
ours, so they win.  Values are strings: that is what librdkafka takes.

>>> producer_config(Settings(brokers="k:9092"))["acks"]
'all'
>>> consumer_config(Settings(brokers="k:9092"), group="flow")["group.id"]
'flow'
>>> extra = Settings(kafka_options="security.protocol=SASL_SSL\\nssl.ca.location=ca.pem")
>>> consumer_config(extra, group="flow")["security.protocol"]
'SASL_SSL'
>>> is_secret("sasl.password"), is_secret_value("ssl.key.location"), is_secret_value("ssl.key.pem")
(True, False, True)

Secrets come from the properties file only, which should be readable by its
owner alone: inline options travel in the environment of every process a
command starts, and ``--kafka-config KEY=VALUE`` shows in ``ps`` to every user
of the machine.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata

from streamrec.settings import Settings

log = logging.getLogger(__name__)

# How long a caller waits for Kafka metadata before saying the broker is not there.
METADATA_TIMEOUT_S = 5.0


# Names of librdkafka settings whose values are never shown: any name with one of these in it.
_SECRET_MARKERS = ("password", "secret", "jaas", "token", "key.pem", "certificate.pem", "ssl.key")
REDACTED = "***"


def producer_config(settings: Settings) -> dict[str, str]:
    """Producer settings tuned for latency: send at once, never reorder, no compression."""
    return _latency_producer(settings) | extra_client_settings(settings)


def changelog_producer_config(settings: Settings) -> dict[str, str]:
    """The changelog producer's settings: compressed records, in batches that may wait.

    A session record is sent again whole with every event of its user, and no
    one waits for it: its bytes, not its latency, are what count.  Successive
    records of one user differ by an interaction, so a fuller batch compresses
    far better (``streamrec bench changelog``).

    >>> config = changelog_producer_config(Settings())
    >>> config["compression.type"], config["linger.ms"], producer_config(Settings())["linger.ms"]
    ('zstd', '20.0', '1.0')
    """
    batched = {
        "compression.type": settings.changelog_compression,
        "linger.ms": str(settings.changelog_linger_ms),
    }
    return _latency_producer(settings) | batched | extra_client_settings(settings)


def _latency_producer(settings: Settings) -> dict[str, str]:
    return {
        "bootstrap.servers": settings.brokers,
        # librdkafka's default lingers 5 ms to batch; a recommendation is worth
        # more now than in a fuller batch.  Batches still form under load, from
        # the messages that queue while requests are in flight.
        "linger.ms": str(settings.kafka_linger_ms),
        # acks=all with idempotence: no loss and no reordering within a user's
        # partition on retries.  On one broker it costs the same as acks=1 (the
        # leader is the whole ISR); with replicas it adds one replication round
        # trip, which a deployment that cares about its output pays anyway.
        "acks": "all",
        "enable.idempotence": "true",
        # Payloads are ~200 bytes of JSON: compression would cost CPU on two
        # cores and save nothing worth it.
        "compression.type": "none",
        "socket.nagle.disable": "true",
    }


def consumer_config(settings: Settings, group: str) -> dict[str, str]:
    """Consumer settings tuned for latency; offsets are never committed to Kafka.

    streamrec's readers ``assign`` partitions themselves (Bytewax keeps its
    offsets in its recovery store), so ``group`` only names the client in
    broker logs and tools.
    """
    ours = {
        "bootstrap.servers": settings.brokers,
        "group.id": group,
        "enable.auto.commit": "false",
        # The broker answers a fetch as soon as one byte is there; the wait
        # below only bounds an idle fetch, and shorter idle fetches would cost
        # broker CPU that the two cores cannot spare.
        "fetch.min.bytes": "1",
        "fetch.wait.max.ms": "100",
        "socket.nagle.disable": "true",
        # Where a reader's offset is out of range.  The flow checks its resume offsets
        # itself and says what it chose; this covers retention deleting under a reader.
        "auto.offset.reset": "earliest",
    }
    return ours | extra_client_settings(settings)


def admin_client(
    settings: Settings, on_error: Callable[[KafkaError], None] | None = None
) -> AdminClient:
    """A metadata client that leaves failures to its caller's error message.

    ``on_error`` receives the client's own errors (a refused login among
    them) when the client is polled.
    """
    # Without a broker librdkafka logs a refused connection every 50 ms (hundreds of
    # lines before a timeout); the caller's error says it once, with the way out.
    config: dict[str, Any] = {
        "bootstrap.servers": settings.brokers,
        "log_level": 2,
    }
    config.update(extra_client_settings(settings))
    if on_error is not None:
        config["error_cb"] = on_error
    try:
        return AdminClient(config)
    except KafkaException as err:
        # An unknown setting or a bad value: librdkafka names it; the value is masked.
        raise KafkaConfigError(
            redact(f"librdkafka refuses the Kafka client settings: {err.args[0].str()}", settings)
        ) from None


def extra_client_settings(settings: Settings) -> dict[str, str]:
    """The deployment's own librdkafka settings: the properties file, then the inline options.

    Both use the Java properties syntax of Kafka's own ``client.properties``
    (``key=value`` or ``key: value`` lines, ``#`` and ``!`` comments).
    """
    found: dict[str, str] = {}
    if settings.kafka_config:
        path = Path(settings.kafka_config).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise KafkaConfigError(
                f"cannot read the Kafka client settings file {path}: {err.strerror}"
            ) from None
        found.update(parse_properties(text, str(path)))
        if any(is_secret_value(name) for name in found):
            _warn_if_shared(path)
    if settings.kafka_options:
        inline = parse_properties(settings.kafka_options, "kafka options")
        refuse_inline_secrets(inline)
        found.update(inline)
    if "bootstrap.servers" in found:
        # One place for the brokers, the one every message names.
        raise KafkaConfigError(
            "bootstrap.servers is not taken from the Kafka client settings: set the brokers "
            "with STREAMREC_BROKERS or --brokers"
        )
    return found


def parse_properties(text: str, origin: str) -> dict[str, str]:
    """``key=value`` lines as a dict; a line that is no blank, comment or setting is refused."""
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if cut < 0:
            # The line is not shown: it may be a secret with its '=' missing.
            raise KafkaConfigError(
                f"{origin}, line {number}: expected key=value (a librdkafka setting)"
            )
        found[line[:cut].strip()] = line[cut + 1 :].strip()
    return found


def is_secret(name: str) -> bool:
    """Whether the value of librdkafka setting ``name`` must never be printed."""
    return any(marker in name.lower() for marker in _SECRET_MARKERS)


def is_secret_value(name: str) -> bool:
    """Whether setting ``name`` holds a secret itself (not a ``*.location`` file, an ``*.url``)."""
    return is_secret(name) and not name.lower().endswith((".location", ".url"))


def refuse_inline_secrets(inline: Mapping[str, str]) -> None:
    """``KafkaConfigError`` naming the secret settings among ``inline`` options, if any.

    The error says why they may not be given inline and where they go instead;
    it names the settings, never their values.
    """
    names = sorted(name for name in inline if is_secret_value(name))
    if not names:
        return
    raise KafkaConfigError(
        f"{', '.join(names)}: secrets are not taken as inline Kafka options (STREAMREC_KAFKA_"
        "OPTIONS, --kafka-config KEY=VALUE): a command line shows in `ps` to every user, and "
        "the options go into the environment of every process a command starts. Put them in a "
        "properties file readable by you alone (chmod 600) and name it with --kafka-config "
        "FILE or STREAMREC_KAFKA_CONFIG"
    )


@cache  # said once per file, not for every client made from it
def _warn_if_shared(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "WARNING: %s holds Kafka secrets and is open to other users (mode %s): chmod 600 %s",
            path,
            oct(stat.S_IMODE(mode)),
            path,
        )


def redact(text: str, settings: Settings) -> str:
    """``text`` (an error message, a log line) with every secret client setting's value masked."""
    for name, value in extra_client_settings(settings).items():
        if value and is_secret(name):
            text = text.replace(value, REDACTED)
    return text


def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition ids of ``topic``; a clear error when it or the broker is missing."""
    metadata = cluster_metadata(settings, topic)
    found = metadata.topics.get(topic)
    if found is not None and found.error is not None and found.error.code() in NOT_ALLOWED:
        raise not_allowed(
            settings,
            found.error,
            f"describe topic {topic!r}",
            "describe, read and write streamrec's topics",
        )
    if found is None or found.error is not None or not found.partitions:
        raise KafkaUnavailable(
            f"topic {topic!r} does not exist at {settings.brokers}; "
            "`streamrec topics create` creates the topics streamrec uses"
        )
    return sorted(found.partitions)


def topic_id(settings: Settings, topic: str) -> str:
    """The broker's id of ``topic``: a topic deleted and recreated by that name gets a new one."""
    from confluent_kafka import TopicCollection

    admin = admin_client(settings)
    try:
        found = admin.describe_topics(TopicCollection([topic]), request_timeout=METADATA_TIMEOUT_S)
        return str(found[topic].result().topic_id)
    except Exception as err:  # noqa: BLE001 - confluent raises KafkaException or a timeout
        raise KafkaUnavailable(
            redact(f"cannot describe topic {topic!r} at {settings.brokers}: {err}", settings)
        ) from None


def end_offsets(consumer: Consumer, topic: str, partitions: list[int]) -> list[TopicPartition]:
    """The current end (high watermark) of each partition, fixed now rather than resolved later.

    Assigning ``OFFSET_END`` resolves the end on the first fetch, so records
    produced in between would be missed; a reader that must see everything
    from "now" on assigns these explicit offsets instead.
    """
    return [
        TopicPartition(topic, partition, watermark_offsets(consumer, topic, partition)[1])
        for partition in partitions
    ]


def watermark_offsets(
    consumer: Consumer, topic: str, partition: int, patience_s: float = METADATA_TIMEOUT_S
) -> tuple[int, int]:
    """The first and the next offset of ``topic`` ``partition``, retried for ``patience_s``.

    A topic created a moment ago may have no leader yet, and a broker that restarts
    leaves its partitions without one for seconds: both pass, so both are waited out.
    """
    timeout_s = min(METADATA_TIMEOUT_S, patience_s)
    tried = TimeTried(least_s=_RETRY_S, most_s=timeout_s)
    while True:
        began = time.monotonic()
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s
            )
            return int(low), int(high)
        except KafkaException as err:
            code = err.args[0].code() if err.args else None
            if code not in _NOT_READY_YET or tried.failed(began) > patience_s:
                raise KafkaUnavailable(
                    f"cannot read the offsets of {topic!r} partition {partition}: {err}"
                ) from None


class TimeTried:
    """How long a retry loop has spent trying, not how long has passed.

    A process paused meanwhile (SIGSTOP, a suspended VM) wakes with its clock
    far on: the request it had out counts as one, at most ``most_s``, so it still
    tries before it gives up.  A try that failed at once is padded to ``least_s``
    by waiting, so that a refused connection is not retried in a tight loop.

    >>> tried = TimeTried(least_s=0.0, most_s=5.0)
    >>> tried.failed(began=time.monotonic() - 60.0)  # out for a minute, paused
    5.0
    """

    def __init__(self, least_s: float, most_s: float) -> None:
        self._least_s = least_s
        self._most_s = most_s
        self.spent_s = 0.0

    def failed(self, began: float) -> float:
        """Count a try begun at ``began`` (monotonic) that failed; the time spent so far."""
        took = time.monotonic() - began
        if took < self._least_s:
            time.sleep(self._least_s - took)
            took = self._least_s
        self.spent_s += min(took, self._most_s)
        return self.spent_s


_RETRY_S = 0.1

_NOT_READY_YET = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
}


class KafkaConfigError(ValueError):
    """The deployment's Kafka client settings cannot be read; the message shows no secret."""


class KafkaUnavailable(RuntimeError):
    """The broker or a topic a tool needs is not there; the message says how to get it."""


# What a topic takes when neither it nor the broker says otherwise (Kafka's message.max.bytes).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


def max_message_bytes(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Each topic's effective ``max.message.bytes``: its own setting, else the broker's default.

    The largest record batch the broker appends to the topic, framing included.
    """
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = admin_client(settings)
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]
    found: dict[str, int] = {}
    try:
        for resource, future in admin.describe_configs(
            resources, request_timeout=METADATA_TIMEOUT_S
        ).items():
            found[resource.name] = int(future.result()["max.message.bytes"].value)
    except (KafkaException, KeyError, ValueError) as err:
        raise KafkaUnavailable(
            redact(
                f"cannot read max.message.bytes of {topics} at {settings.brokers}: {err}", settings
            )
        ) from None
    return found


# How long one metadata request may wait before the client's errors are looked at.
_METADATA_POLL_S = 0.25

# A login or TLS handshake the cluster refused: waiting longer cannot help.
_REFUSED = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._SSL,
}
# What the cluster's ACLs do not let this client do: waiting cannot help either.
NOT_ALLOWED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)


class KafkaRefused(KafkaUnavailable):
    """The cluster refused this client: its login, its TLS handshake or its rights (ACLs).

    Retrying cannot help, so a flow stops for a person (exit 78); the message
    says which, and what to check.
    """


def not_allowed(settings: Settings, error: KafkaError, what: str, needs: str) -> KafkaRefused:
    """The error for an ACL that does not let this client do ``what``; ``needs``: the rights."""
    return KafkaRefused(
        redact(
            f"not allowed to {what} at {settings.brokers} ({error.name()}): the cluster's ACLs "
            f"must let {_principal(settings)} {needs}",
            settings,
        )
    )


def cluster_metadata(settings: Settings, topic: str | None = None) -> ClusterMetadata:
    """The cluster's metadata (of ``topic`` alone, if given); a refused login fails at once.

    librdkafka treats a refused login like a lost connection and retries, so a
    wrong password would look like a broker that is not there, after the whole
    timeout.  The client's error callback tells the two apart; it is served
    between short metadata requests, so a refusal ends the wait within a
    second of the broker saying it.
    """
    refused: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in _REFUSED:
            refused.append(error)

    admin = admin_client(settings, on_error)
    tried = TimeTried(least_s=_METADATA_POLL_S, most_s=2 * _METADATA_POLL_S)
    while True:
        began = time.monotonic()
        try:
            return admin.list_topics(topic=topic, timeout=_METADATA_POLL_S)
        except KafkaException as err:
            admin.poll(0)  # runs on_error for what happened meanwhile
            spent_s = tried.failed(began)
            failure: KafkaUnavailable
            if refused:
                failure = KafkaRefused(_refusal(settings, refused[0]))
            elif spent_s >= METADATA_TIMEOUT_S:
                failure = KafkaUnavailable(
                    redact(
                        f"cannot reach Kafka at {settings.brokers}: {err}. Is it running? "
                        "(`streamrec kafka up` starts a local broker)",
                        settings,
                    )
                )
            else:
                continue
            del admin  # closes the client now, not when the traceback goes
            raise failure from None


def _refusal(settings: Settings, error: KafkaError) -> str:
    where = "STREAMREC_KAFKA_CONFIG / STREAMREC_KAFKA_OPTIONS / --kafka-config"
    if error.code() == KafkaError._SSL:
        what = (
            f"TLS handshake with Kafka at {settings.brokers} failed: {error.str()}. Check "
            f"ssl.ca.location (the CA that signed the brokers' certificates) in {where}"
        )
    else:
        what = (
            f"authentication failed at {settings.brokers} for {_principal(settings)}: "
            f"{error.str()}. Check sasl.username, sasl.password and sasl.mechanism in {where}"
        )
    return redact(what, settings)


def _principal(settings: Settings) -> str:
    user = extra_client_settings(settings).get("sasl.username")
    return f"user {user!r}" if user else "this client"
