"""What leaves the dataflow, and what both delivery guarantees do when Kafka will not take it.

The processor hands out plain ``OutputRecord`` tuples (no wrapper per record);
at least once, each micro-batch's ``OffsetMark`` follows them to the sink
(``flows/guarantee/at_least_once.py``).  Whichever way the records leave (the
asynchronous sink, at least once; a partition's transaction, exactly once), a
record the broker refuses is set aside the same way: a recommendation becomes
a dead letter, and a dead letter the dead-letter topic cannot take whole
becomes a stub naming the payload's size, sha256 and the reason.  Output that
Kafka has not taken for ``BLOCKED_AFTER_S`` is said once in the log
(``flow: output blocked: ...``) and on ``/metrics``, and said again when it moves.

>>> size_limits({"recommendations": 1_048_588, "events.dlq": 1_048_588})
{'message.max.bytes': '1048588', 'batch.size': '1000000'}
>>> stub(("events.dlq", b"u1", b"x" * 2_000_000, None), "too large")[2:]  # doctest: +ELLIPSIS
(None, [('streamrec.stub.reason', b'too large'), ('streamrec.stub.value_size', b'2000000'), ...])
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final, NamedTuple

from confluent_kafka import KafkaError

from streamrec.contracts import (
    OUTPUT_REFUSED,
    STUB_HEADER_KEY_SHA256,
    STUB_HEADER_KEY_SIZE,
    STUB_HEADER_REASON,
    STUB_HEADER_VALUE_SHA256,
    STUB_HEADER_VALUE_SIZE,
    STUB_MAX_KEY_BYTES,
    DeadLetter,
)
from streamrec.flows import metrics
from streamrec.kafka_clients import (
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    KafkaUnavailable,
    max_message_bytes,
    redact,
)
from streamrec.settings import Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
# (topic, key, value, headers): what the flow hands the sink, with no wrapper per record.
OutputRecord = tuple[str, bytes | None, bytes | None, Headers | None]


class OffsetMark(NamedTuple):
    """Follows a micro-batch's outputs: once they are delivered, reading may resume at ``next``."""

    partition: int
    next: int


# What the processor hands the sink: output records, each micro-batch's offset marks after them.
SinkItem = OutputRecord | OffsetMark

# Every wait is this short, so a second SIGTERM (KeyboardInterrupt) is never held up.
POLL_S: Final = 0.5
# A slower delivery is reported as blocked output; shorter stalls are routine (a leader moving).
BLOCKED_AFTER_S: Final = 5.0
# librdkafka's default batch.size: batches fill up to it, and no topic limit is below it by default.
_DEFAULT_BATCH_BYTES: Final = 1_000_000
# The bounds librdkafka accepts for message.max.bytes.
_MESSAGE_MAX_BYTES_RANGE: Final = (1000, 1_000_000_000)

# Refusals of one record: sending it again cannot help, so it is set aside.  Any
# other failure is sent again: nothing is lost to an outage or a misconfiguration,
# which show as blocked output until fixed.
REFUSED: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.POLICY_VIOLATION,
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)


def size_limits(limits: Mapping[str, int]) -> dict[str, str]:
    """librdkafka size settings for output topics that take batches of at most ``limits`` bytes.

    The broker refuses a whole batch over a topic's limit, so batches never
    grow past the smallest limit (a record larger than ``batch.size`` still goes,
    alone); the local check lets through anything the largest limit may take.
    """
    low, high = _MESSAGE_MAX_BYTES_RANGE
    return {
        "message.max.bytes": str(min(max(max(limits.values()), low), high)),
        "batch.size": str(max(1, min(_DEFAULT_BATCH_BYTES, *limits.values()))),
    }


def stub(record: OutputRecord, reason: str) -> OutputRecord:
    """``record`` (a dead letter) without its payload: its size, sha256 and why, in headers."""
    topic, key, value, headers = record
    added: Headers = [(STUB_HEADER_REASON, reason.encode())]
    if value is not None:
        added.append((STUB_HEADER_VALUE_SIZE, str(len(value)).encode()))
        added.append((STUB_HEADER_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()))
    if key is not None and len(key) > STUB_MAX_KEY_BYTES:
        added.append((STUB_HEADER_KEY_SIZE, str(len(key)).encode()))
        added.append((STUB_HEADER_KEY_SHA256, hashlib.sha256(key).hexdigest().encode()))
        key = None
    return (topic, key, None, [*(headers or []), *added])


def is_stub(headers: Headers | None) -> bool:
    return any(name == STUB_HEADER_REASON for name, _ in headers or ())


def set_aside(
    record: OutputRecord,
    error: KafkaError,
    limits: Mapping[str, int],
    dlq_topic: str,
    say: Callable[[str], None],
) -> OutputRecord | None:
    """What replaces a record Kafka refused: a dead letter, a stub, or nothing (said)."""
    topic, key, value, headers = record
    reason = f"{topic} refused the record: {error.str()}"
    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and topic in limits:
        reason += f" (it takes record batches of at most {limits[topic]} bytes)"
    if topic != dlq_topic:
        metrics.OUTPUT_FAILURES.labels(error.name(), "dead_lettered").inc()
        metrics.DEAD_LETTERS.labels(OUTPUT_REFUSED).inc()
        # Never written, so it has no partition or offset of its own.
        letter = DeadLetter(key, value, OUTPUT_REFUSED, reason, topic, -1, -1)
        return (dlq_topic, key, value, letter.headers())
    if not is_stub(headers):
        metrics.OUTPUT_FAILURES.labels(error.name(), "stubbed").inc()
        return stub(record, reason)
    # Even the stub, a few hundred bytes, was refused: the topic's own rules forbid it
    # (e.g. compaction refuses a null key).  Said, counted, and the flow goes on.
    metrics.OUTPUT_FAILURES.labels(error.name(), "dropped").inc()
    say(
        f"ERROR: dropped a dead letter's stub that {topic} refused too "
        f"({error.str()}); its headers: {headers}"
    )
    return None


class BlockedOutput:
    """Says once that output is stuck, and once that it moves again; the gauge follows.

    ``waiting(since, ...)`` is called while output waits (since when it has);
    the first call ``BLOCKED_AFTER_S`` or more after ``since`` says so.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.since: float | None = None  # when the output that is blocked began to wait

    @property
    def blocked(self) -> bool:
        return self.since is not None

    def waiting(self, since: float, describe: Callable[[float], str]) -> None:
        """Output has waited since ``since``; ``describe(waited_s)`` is the line said at first."""
        waited = time.monotonic() - since
        if self.since is None and waited >= BLOCKED_AFTER_S:
            self.since = since
            metrics.OUTPUT_BLOCKED.inc()
            self.say(describe(waited))

    def resumed(self, line: str) -> None:
        """Output moves again: ``line`` is said, ``{blocked_s}`` the seconds it was blocked."""
        if self.since is None:
            return
        self.say(line.format(blocked_s=time.monotonic() - self.since))
        self.since = None
        metrics.OUTPUT_BLOCKED.dec()

    def say(self, line: str) -> None:
        log.warning(redact(line, self._settings))


def output_limits(settings: Settings) -> dict[str, int]:
    """The output topics' record batch limits; Kafka's default where they cannot be read."""
    topics = [settings.recommendations_topic, settings.dlq_topic]
    try:
        return max_message_bytes(settings, topics)
    except KafkaUnavailable as err:
        # Refusals are still handled record by record; only the sizes are guessed.
        log.warning("%s; assuming %d bytes", err, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
        return dict.fromkeys(topics, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
