"""Exactly-once output: `streamrec run --guarantee exactly-once` against the real broker.

A downstream consumer reading ``read_committed`` must see each event's
recommendation, and each bad record's dead letter, exactly once, however often
the flow dies; the sessions must equal one pass over the events.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from streamrec.contracts import Event, ForgetRequest
from streamrec.flows.guarantee import ExactlyOnce
from streamrec.flows.stores import PartitionStores
from streamrec.settings import Settings
from tests.flow_harness import (
    FlowProcess,
    RecommendationCollector,
    dead_letters,
    produce,
    sessions_applied_once,
    sessions_in,
)

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("no_flow_left_behind")]

EXACTLY_ONCE = ["--guarantee", "exactly-once"]


def answer_counts(collector: RecommendationCollector) -> Counter[int]:
    """How many events were answered once, twice, ... (1 is the only right answer)."""
    return Counter(len(answers) for answers in collector.by_event.values())


def test_sigkilled_ten_times_under_load_every_event_is_answered_exactly_once(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    events = movielens[:4000]
    bad = [(e.key, b"{not json") for e in events[::400]]  # ten dead letters among them
    stream: list[Event | tuple[bytes | None, bytes | None]] = list(events)
    for i, record in enumerate(bad):
        stream.insert(400 * i + 7, record)
    # Sent over about a minute: the kills, one every 4 to 8 s, land while events arrive.
    producing = threading.Thread(target=lambda: _produce_slowly(kafka_settings, stream, 70.0))
    collector = RecommendationCollector(kafka_settings, committed_only=True)
    rng = random.Random(7)
    answered_at_kill: list[int] = []
    try:
        producing.start()
        while len(answered_at_kill) < 10:
            flow = FlowProcess(kafka_settings, EXACTLY_ONCE).start()
            deadline = time.monotonic() + rng.uniform(4.0, 8.0)
            while time.monotonic() < deadline:
                collector.poll(0.2)
                assert flow.alive(), flow.output()[-3000:]
            flow.kill()  # SIGKILL: mid-batch, mid-transaction, wherever it was
            answered_at_kill.append(len(collector.by_event))
        producing.join()
        # Most kills came while events were still arriving and being answered.
        assert sum(0 < n < len(events) for n in answered_at_kill) >= 5, answered_at_kill
        flow = FlowProcess(kafka_settings, EXACTLY_ONCE).start()
        collector.wait_for({e.event_id for e in events}, flow, timeout_s=180)
        collector.poll(2.0)  # anything more would be a duplicate
        assert flow.stop() == 0, flow.output()[-2000:]
    finally:
        collector.close()

    assert answer_counts(collector) == {1: len(events)}
    letters = dead_letters(kafka_settings, len(bad) + 1, timeout_s=5, committed_only=True)
    assert Counter(Counter(letter.offset for letter in letters).values()) == {1: len(bad)}
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")


def _produce_slowly(
    settings: Settings, stream: list[Event | tuple[bytes | None, bytes | None]], rate: float
) -> None:
    step = 50
    for start in range(0, len(stream), step):
        produce(settings, stream[start : start + step])
        time.sleep(step / rate)


@pytest.mark.parametrize("interval_ms", [100.0, 0.0])  # time-sliced, and one per micro-batch
def test_a_lost_state_directory_is_restored_and_nothing_is_answered_twice(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path, interval_ms: float
) -> None:
    kafka_settings = kafka_settings.replace(transaction_interval_ms=interval_ms)
    first, second = movielens[:1500], movielens[1500:2000]
    gone = first[0].user_id
    produce(kafka_settings, [*first, ForgetRequest("forget-1", gone, first[-1].ts)])
    collector = RecommendationCollector(kafka_settings, committed_only=True)
    try:
        flow = FlowProcess(kafka_settings, EXACTLY_ONCE).start()
        collector.wait_for({e.event_id for e in first}, flow)
        assert flow.stop() == 0, flow.output()[-2000:]

        shutil.rmtree(kafka_settings.state_dir)  # a new disk, or another machine
        produce(kafka_settings, second)
        flow = FlowProcess(kafka_settings, EXACTLY_ONCE).start()
        collector.wait_for({e.event_id for e in second}, flow)
        collector.poll(2.0)
        assert flow.stop() == 0, flow.output()[-2000:]
    finally:
        collector.close()

    assert "rebuilding shard" in flow.output()
    assert answer_counts(collector) == {1: len(first) + len(second)}
    restored = sessions_in(kafka_settings)
    assert gone not in restored  # the erasure's tombstone came back with the rest
    assert restored == sessions_applied_once(kafka_settings, tmp_path / "ref")


def test_a_second_process_taking_the_partitions_fences_the_first(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    events = movielens[:200]
    produce(kafka_settings, events[:100])
    collector = RecommendationCollector(kafka_settings, committed_only=True)
    try:
        old = FlowProcess(kafka_settings, EXACTLY_ONCE).start()
        collector.wait_for({e.event_id for e in events[:100]}, old)
        # A second process with a disk of its own, as a restarted machine would be.
        elsewhere = kafka_settings.replace(state_dir=tmp_path / "other" / "state")
        new = FlowProcess(elsewhere, EXACTLY_ONCE).start()
        # Its transactions fence old's as it takes each partition, before its shard is rebuilt.
        deadline = time.monotonic() + 60
        while not all(f"partition {p} taken exactly-once" in new.output() for p in (0, 1)):
            assert time.monotonic() < deadline and new.alive(), new.output()[-2000:]
            time.sleep(0.2)
        produce(kafka_settings, events[100:])
        collector.wait_for({e.event_id for e in events}, new)
        assert old.process is not None
        assert old.process.wait(60) == 65, old.output()[-3000:]
        assert new.stop() == 0, new.output()[-2000:]
    finally:
        collector.close()
    assert "served by another process" in old.output()
    assert answer_counts(collector) == {1: len(events)}


def test_exactly_once_without_the_changelog_is_refused_before_it_reads(
    kafka_settings: Settings,
) -> None:
    flow = FlowProcess(kafka_settings, [*EXACTLY_ONCE, "--no-changelog"]).start()
    assert flow.process is not None
    assert flow.process.wait(60) == 2
    assert "drop --no-changelog" in flow.output()


def test_a_fenced_owners_uncommitted_batch_is_never_taken_for_the_new_owners_commit(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # Defect found by review: versions were a bare count, so A's uncommitted "version 1",
    # stamped at a clean close after B fenced it, matched B's committed "version 1" and A's
    # stale store was kept when the partition came back to A's machine.
    from streamrec.kafka_clients import topic_id

    settings = kafka_settings.replace(guarantee="exactly-once", transaction_interval_ms=60_000.0)
    incarnation = topic_id(settings, settings.events_topic)
    machine_a = settings.replace(state_dir=tmp_path / "a")
    machine_b = settings.replace(state_dir=tmp_path / "b")
    first, first_guarantee = exactly_once_shards(machine_a, incarnation)
    first.get(0).apply(Event("e1", "u1", "from-a", "view", 1_700_000_000_000), 0, 0)
    first_guarantee.transactions[0].add([], next_offset=1)  # open, not yet due
    second, second_guarantee = exactly_once_shards(machine_b, incarnation)
    second.get(0).apply(Event("e1", "u1", "from-b", "view", 1_700_000_000_000), 0, 0)
    second_guarantee.transactions[0].add([], next_offset=1)
    second_guarantee.transactions[0].commit()
    second.close()
    first.close()  # fenced: its batch never committed
    again, again_guarantee = exactly_once_shards(machine_a, incarnation)
    try:
        session = again.get(0).get("u1")
        assert session is not None and session.item_ids == ["from-b"]
    finally:
        again.close()


def test_a_crash_before_the_first_commit_is_not_taken_for_a_lost_changelog(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # Found by the broker fault schedules (seed 1916): a flow killed before its first
    # transaction of a partition committed left that shard stamped "version 1" beside a
    # changelog with no marks, and every later start refused it (exit 65) as a changelog
    # deleted since.  One uncommitted batch ahead is a crash; only more is a lost changelog.
    from streamrec.kafka_clients import topic_id

    settings = kafka_settings.replace(
        guarantee="exactly-once", transaction_interval_ms=60_000.0, state_dir=tmp_path / "a"
    )
    incarnation = topic_id(settings, settings.events_topic)
    first, first_guarantee = exactly_once_shards(settings, incarnation)
    first.get(1).apply(Event("e1", "u1", "i1", "view", 1_700_000_000_000), 1, 0)
    first_guarantee.transactions[1].add([], next_offset=1)  # open, not yet due
    for store in first._stores.values():  # killed: RocksDB keeps what it wrote, no commit
        store._closed = True
        store._db.close()
    again, again_guarantee = exactly_once_shards(settings, incarnation)
    try:
        assert again.get(1).get("u1") is None  # nothing committed: read again from the start
        assert 1 not in again_guarantee.resume_at
    finally:
        again.close()


def test_a_shard_committed_twice_beside_a_recreated_changelog_is_refused(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # The other side of the rule above: a store more than one version ahead of a changelog
    # without marks holds commits the changelog lost; it stops, and says how to start afresh.
    from streamrec.kafka_clients import topic_id
    from streamrec.state.changelog import ChangelogError
    from streamrec.topics import create_topics, delete_topics

    settings = kafka_settings.replace(
        guarantee="exactly-once", transaction_interval_ms=0.0, state_dir=tmp_path / "a"
    )
    incarnation = topic_id(settings, settings.events_topic)
    first, first_guarantee = exactly_once_shards(settings, incarnation)
    for offset in range(2):  # versions 1 and 2, committed
        first.get(1).apply(Event(f"e{offset}", "u1", "i1", "view", 1_700_000_000_000), 1, offset)
        first_guarantee.transactions[1].add([], next_offset=offset + 1)
        first_guarantee.transactions[1].commit()
    first.close()
    delete_topics(settings, [settings.sessions_changelog])
    create_topics(settings, partitions=2)
    again, again_guarantee = exactly_once_shards(settings, incarnation)
    try:
        with pytest.raises(ChangelogError, match="deleted or recreated since"):
            again.get(1)
    finally:
        again.close()


def exactly_once_shards(
    settings: Settings, incarnation: str
) -> tuple[PartitionStores, ExactlyOnce]:
    """The two shards of a process serving exactly once, and its guarantee (the transactions)."""
    guarantee = ExactlyOnce(settings, incarnation)
    return PartitionStores(2, guarantee), guarantee
