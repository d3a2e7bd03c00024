"""Drive the real flow (`streamrec run` in a child process) against the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from streamrec.contracts import DeadLetter, Event, ForgetRequest, Recommendation, parse_message
from streamrec.flows.shutdown import STARTING
from streamrec.kafka_clients import (
    consumer_config,
    end_offsets,
    producer_config,
    topic_partitions,
)
from streamrec.settings import Settings
from streamrec.state.store import SessionStore


# A consumed message (never an error event) always has these; the client's types allow None.
def partition_of(message: Message) -> int:
    partition = message.partition()
    assert partition is not None
    return partition


def offset_of(message: Message) -> int:
    offset = message.offset()
    assert offset is not None
    return offset


def value_of(message: Message) -> bytes:
    value = message.value()
    assert isinstance(value, bytes)
    return value


def headers_of(message: Message) -> list[tuple[str, str | bytes | None]]:
    headers = message.headers()
    assert not isinstance(headers, dict)
    return headers or []


class FlowProcess:
    """One `streamrec run` process: stopped with SIGTERM, or killed with SIGKILL (a crash)."""

    started: list[FlowProcess] = []  # noqa: RUF012 - every one, so a failed test leaves none

    def __init__(self, settings: Settings, args: Sequence[str] = (), log: Path | None = None):
        self.settings = settings
        self.args = list(args)
        self.log = log or settings.state_dir.parent / f"flow-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> FlowProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env()}
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamrec", "run", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        FlowProcess.started.append(self)
        return self

    @classmethod
    def kill_all(cls) -> None:
        """Kill every flow still running (after a failed test)."""
        for flow in cls.started:
            if flow.alive():
                flow.kill()
        cls.started.clear()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def started_handling_signals(self, timeout_s: float = 30.0) -> bool:
        """Wait for the flow's first line: from then on SIGTERM is a clean stop, not a death."""
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(self._log_start)
                if STARTING.encode() in log.read():
                    return True
            time.sleep(0.02)
        return False

    def ask_to_stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, once the flow handles it (a stop, not a death)."""
        assert self.process is not None
        self.started_handling_signals(timeout_s)
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.ask_to_stop(timeout_s)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def stop_all(flows: Sequence[FlowProcess], timeout_s: float = 30.0) -> list[int]:
    """Stop every process of a cluster: one cannot finish while the others still run."""
    for flow in flows:
        flow.ask_to_stop(timeout_s)
    return [flow.process.wait(timeout_s) for flow in flows if flow.process is not None]


def produce(
    settings: Settings, records: Iterable[Event | ForgetRequest | tuple[bytes | None, bytes | None]]
) -> None:
    """Send events (keyed by user) or raw (key, value) pairs, in order, and wait for the acks."""
    # Idempotence keeps each partition in send order even when a fresh topic's
    # first requests are retried; the expected sessions assume that order.
    producer = Producer(producer_config(settings))
    for record in records:
        if isinstance(record, tuple):
            key, value = record
        else:
            key, value = record.key, record.to_json()
        producer.produce(settings.events_topic, value, key)
        producer.poll(0)
    assert producer.flush(30) == 0


class TopicReader:
    """Reads a whole topic from the beginning, remembering where it got to."""

    def __init__(self, settings: Settings, topic: str, committed_only: bool = False) -> None:
        # The shared settings, so that a test reads through a secured listener too.
        config = consumer_config(settings, group="tests")
        if committed_only:  # what a downstream consumer of exactly-once output sees
            config["isolation.level"] = "read_committed"
        self.consumer = Consumer(config)
        self.consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in topic_partitions(settings, topic)]
        )

    def read_to_end(self, settings: Settings, topic: str, timeout_s: float = 60.0) -> list[Message]:
        """Every record up to each partition's end as it is now; fails if it cannot get them."""
        ends = {
            tp.partition: tp.offset
            for tp in end_offsets(self.consumer, topic, topic_partitions(settings, topic))
        }
        next_offset = dict.fromkeys(ends, 0)
        found: list[Message] = []
        deadline = time.monotonic() + timeout_s
        # An empty poll proves nothing: partitions are fetched one by one.
        while any(next_offset[p] < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {topic} up to {next_offset}, not to its end {ends}")
            for m in self.consumer.consume(500, 0.2):
                if m.error() is None:
                    found.append(m)
                    next_offset[partition_of(m)] = offset_of(m) + 1
        return found

    def read(self, timeout_s: float = 1.0) -> list[Message]:
        found: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = self.consumer.consume(500, 0.2)
            found.extend(m for m in batch if m.error() is None)
            if not batch and found:
                break
        return found

    def close(self) -> None:
        self.consumer.close()


class RecommendationCollector:
    """Every recommendation so far, by event id (a replay may deliver one twice)."""

    def __init__(self, settings: Settings, committed_only: bool = False) -> None:
        self.reader = TopicReader(settings, settings.recommendations_topic, committed_only)
        self.by_event: dict[str, list[Recommendation]] = {}

    def poll(self, timeout_s: float = 0.5) -> int:
        for message in self.reader.read(timeout_s):
            rec = Recommendation.from_json(value_of(message))
            self.by_event.setdefault(rec.event_id, []).append(rec)
        return len(self.by_event)

    def wait_for(
        self,
        event_ids: set[str],
        flow: FlowProcess | Sequence[FlowProcess],
        timeout_s: float = 120.0,
    ) -> None:
        flows = [flow] if isinstance(flow, FlowProcess) else list(flow)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if event_ids <= self.by_event.keys():
                return
            for f in flows:
                if not f.alive():
                    raise AssertionError(f"the flow exited early:\n{f.output()[-4000:]}")
        missing = len(event_ids - self.by_event.keys())
        raise AssertionError(
            f"{missing} events without a recommendation after {timeout_s} s:\n"
            + "\n".join(f.output()[-3000:] for f in flows)
        )

    def close(self) -> None:
        self.reader.close()


def serve_until_answered(
    settings: Settings, event_ids: set[str], timeout_s: float = 120.0
) -> tuple[FlowProcess, RecommendationCollector]:
    """Run a flow until each of ``event_ids`` has a recommendation, then stop it: exit 0."""
    flow = FlowProcess(settings).start()
    collector = RecommendationCollector(settings)
    try:
        collector.wait_for(event_ids, flow, timeout_s)
    finally:
        collector.close()
        assert flow.stop() == 0, flow.output()[-2000:]
    return flow, collector


def dead_letters(
    settings: Settings, expected: int, timeout_s: float = 60.0, committed_only: bool = False
) -> list[DeadLetter]:
    reader = TopicReader(settings, settings.dlq_topic, committed_only)
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + timeout_s
    while len(letters) < expected and time.monotonic() < deadline:
        letters.extend(
            DeadLetter.from_record(m.key(), m.value(), headers_of(m)) for m in reader.read(0.5)
        )
    reader.close()
    return letters


def sessions_applied_once(settings: Settings, scratch: Path) -> dict[str, dict]:
    """The sessions that applying every record of the events topic exactly once produces."""
    partitions = topic_partitions(settings, settings.events_topic)
    reader = TopicReader(settings, settings.events_topic)
    records = reader.read_to_end(settings, settings.events_topic)
    reader.close()
    reference = settings.replace(state_dir=scratch)
    stores = {p: SessionStore.open(scratch, p, len(partitions), reference) for p in partitions}
    try:
        for m in sorted(records, key=lambda m: (partition_of(m), offset_of(m))):
            try:
                parsed = parse_message(m.value(), m.key(), settings.max_event_bytes)
            except ValueError:
                continue
            store = stores[partition_of(m)]
            if isinstance(parsed, ForgetRequest):
                store.forget(parsed.user_id, partition_of(m), offset_of(m))
            else:
                store.apply(parsed, partition_of(m), offset_of(m))
        return stored_sessions(stores.values())
    finally:
        for store in stores.values():
            store.close()


def sessions_in(settings: Settings) -> dict[str, dict]:
    """Every session the flow left in its state directory (the flow must be stopped)."""
    partitions = topic_partitions(settings, settings.events_topic)
    stores = [
        SessionStore.open(settings.state_dir, p, len(partitions), settings) for p in partitions
    ]
    try:
        return stored_sessions(stores)
    finally:
        for store in stores:
            store.close()


def stored_sessions(stores: Iterable[SessionStore]) -> dict[str, dict]:
    # Sessions expired by the latest event time of all are left out: the sweep removes
    # them at wall-clock moments that differ from run to run, and a shard's clock (the
    # median of its recent users, sampled at each commit) depends on the batches, while
    # what is expired by that latest time does not.  No clock runs past it.
    sessions = [
        (store.ttl_ms, session)
        for store in stores
        for user in store.user_ids()
        if (session := store.get(user, now_ms=-(2**62))) is not None
    ]
    now = max((session.last_seen_ms for _, session in sessions), default=0)
    return {
        session.user_id: session.to_dict()
        for ttl_ms, session in sessions
        if not session.is_expired(now, ttl_ms)
    }


def set_topic_config(settings: Settings, topic: str, name: str, value: str) -> None:
    """Set one config of ``topic`` and wait until the broker describes the new value."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    from streamrec.kafka_clients import admin_client

    admin = admin_client(settings)
    entry = ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result()
    deadline = time.monotonic() + 30
    described = ConfigResource(ResourceType.TOPIC, topic)
    while admin.describe_configs([described])[described].result()[name].value != value:
        assert time.monotonic() < deadline, f"{topic}: {name} is not {value} after 30 s"
        time.sleep(0.1)
