"""Sessions that survive the disk: the changelog topic, against the real broker and flow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from streamrec.contracts import Event, ForgetRequest
from streamrec.flows.guarantee import AtLeastOnce
from streamrec.flows.stores import PartitionStores
from streamrec.settings import Settings
from streamrec.state.changelog import (
    MARKS_KEY,
    ChangelogTaken,
    ChangelogWriter,
    changelog_records,
    latest_marks,
)
from streamrec.state.keys import CHANGELOG_CONSUMED_TAG
from tests.flow_harness import (
    FlowProcess,
    produce,
    serve_until_answered,
    sessions_applied_once,
    sessions_in,
)

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("no_flow_left_behind")]


def test_every_commit_reaches_the_changelog_ending_with_the_shards_progress(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    events = movielens[:500]
    produce(kafka_settings, events)
    serve_until_answered(kafka_settings, {e.event_id for e in events})
    users = {e.user_id for e in events}
    logged = {
        key.decode()
        for partition in (0, 1)
        for key, value, _ in changelog_records(kafka_settings, partition)
        if key != MARKS_KEY and not key.startswith(CHANGELOG_CONSUMED_TAG) and value is not None
    }
    assert logged == users
    marks = [latest_marks(kafka_settings, partition) for partition in (0, 1)]
    assert all(m is not None and m.applied >= 0 for m in marks)


def test_a_lost_state_directory_is_rebuilt_from_the_changelog_identical(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    first, second = movielens[:1500], movielens[1500:2000]
    produce(kafka_settings, first)
    serve_until_answered(kafka_settings, {e.event_id for e in first})
    before = sessions_in(kafka_settings)

    shutil.rmtree(kafka_settings.state_dir)  # the disk is replaced; the recovery store stays
    produce(kafka_settings, second)
    flow, collector = serve_until_answered(kafka_settings, {e.event_id for e in second})

    assert "rebuilt from" in flow.output() or "rebuilding shard" in flow.output()
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")
    assert before  # the first run left sessions to rebuild
    # Only the second half was answered in the second run (the resume point held).
    assert set(collector.by_event) >= {e.event_id for e in second}


def test_a_forgotten_user_stays_forgotten_after_a_rebuild(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    events = movielens[:300]
    gone = events[0].user_id
    forget = ForgetRequest("forget-1", gone, events[-1].ts)
    after = Event("after-1", "someone-else", "1", "view", events[-1].ts)
    produce(kafka_settings, [*events, forget, after])
    serve_until_answered(kafka_settings, {e.event_id for e in events} | {"after-1"})
    assert gone not in sessions_in(kafka_settings)

    shutil.rmtree(kafka_settings.state_dir)
    shutil.rmtree(kafka_settings.recovery_dir)  # the whole machine is new: read from the start
    later = Event("later-1", "someone-else", "2", "view", events[-1].ts + 1)
    produce(kafka_settings, [later])
    serve_until_answered(kafka_settings, {"later-1"})

    assert gone not in sessions_in(kafka_settings)
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")


def sessions_across(settings: Settings, state_dirs: list[Path]) -> dict[str, dict]:
    """Every session in any of ``state_dirs``; a user in two of them must have one content."""
    found: dict[str, dict] = {}
    for state_dir in state_dirs:
        for user, session in sessions_in(settings.replace(state_dir=state_dir)).items():
            assert found.get(user, session) == session, f"{user} differs between machines"
            found[user] = session
    return found


def test_a_cluster_moved_to_new_machines_keeps_every_session(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    from tests.conftest import free_port
    from tests.flow_harness import RecommendationCollector, stop_all

    events = movielens[:3000]
    produce(kafka_settings, events[:1500])

    def machine(name: str) -> Settings:
        return kafka_settings.replace(
            state_dir=tmp_path / name / "state", recovery_dir=tmp_path / name / "recovery"
        )

    def cluster(names: list[str]) -> list[FlowProcess]:
        addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in names)
        return [
            FlowProcess(machine(name), ["-i", str(i), "-a", addresses]).start()
            for i, name in enumerate(names)
        ]

    collector = RecommendationCollector(kafka_settings)
    try:
        pair = cluster(["a", "b"])
        collector.wait_for({e.event_id for e in events[:750]}, pair)
        pair[1].kill()  # machine b is gone; a's process exits with it (Bytewax's cluster)
        for flow in pair:
            assert flow.process is not None
            flow.process.wait(60)

        produce(kafka_settings, events[1500:])
        alone = cluster(["c"])  # one new machine, empty directories
        collector.wait_for({e.event_id for e in events}, alone)
        stop_all(alone)

        again = cluster(["d", "e"])  # two new machines again
        final = Event("final", events[0].user_id, "1", "view", events[-1].ts)
        produce(kafka_settings, [final])
        collector.wait_for({"final"}, again)
        assert stop_all(again) == [0, 0]
    finally:
        collector.close()

    moved = sessions_across(kafka_settings, [tmp_path / "d" / "state", tmp_path / "e" / "state"])
    assert moved == sessions_applied_once(kafka_settings, tmp_path / "ref")


def test_a_killed_flow_whose_rocksdb_keeps_no_log_rebuilds_and_loses_nothing(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    from tests.flow_harness import RecommendationCollector

    events = movielens[:3000]
    produce(kafka_settings, events[:2000])
    collector = RecommendationCollector(kafka_settings)
    try:
        flow = FlowProcess(kafka_settings).start()
        collector.wait_for({e.event_id for e in events[:1000]}, flow)
        flow.kill()  # the memtables die with it: RocksDB keeps no log beside the changelog
        produce(kafka_settings, events[2000:])
        flow = FlowProcess(kafka_settings).start()
        collector.wait_for({e.event_id for e in events}, flow)
        assert flow.stop() == 0, flow.output()[-2000:]
    finally:
        collector.close()

    assert "lost its latest writes" in flow.output()
    assert sessions_in(kafka_settings) == sessions_applied_once(kafka_settings, tmp_path / "ref")


def machine(settings: Settings, state_dir: Path) -> tuple[ChangelogWriter, PartitionStores]:
    """An at-least-once process with a disk of its own: its changelog writer and its stores."""
    from streamrec.kafka_clients import topic_id

    incarnation = topic_id(settings, settings.events_topic)
    mine = settings.replace(state_dir=state_dir)
    writer = ChangelogWriter(mine, incarnation)
    return writer, PartitionStores(2, AtLeastOnce(mine, writer, incarnation))


def after_batch_on_shard_0(stores: PartitionStores) -> None:
    """What the processor does after each micro-batch's commit, for shard 0."""
    stores.guarantee.after_commit({0: stores.get(0)})


def test_at_least_once_a_second_process_on_the_same_shard_stops_the_older_claim(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # Defect found by review: two processes with their own --state-dir serving the same
    # partitions both wrote its changelog, and nothing noticed.
    def process(name: str) -> tuple[ChangelogWriter, PartitionStores]:
        return machine(kafka_settings, tmp_path / name)

    def view(user: str, item: str, offset: int) -> Event:
        return Event(f"e{offset}-{item}", user, item, "view", 1_700_000_000_000 + offset)

    older_writer, older = process("older")
    older.get(0).apply(view("u1", "a1", 0), 0, 0)
    older_writer.flush()
    newer_writer, newer = process("newer")  # rebuilt, and claims the shard a generation later
    newer.get(0).apply(view("u1", "b1", 1), 0, 1)
    newer_writer.flush()
    older.get(0).apply(view("u1", "a2", 1), 0, 1)  # lands after the newer one's records
    older_writer.flush()
    with pytest.raises(ChangelogTaken, match="another process took shard 0"):
        after_batch_on_shard_0(older)
    newer.get(0).apply(view("u2", "b2", 2), 0, 2)  # finds the older one's records before it
    newer_writer.flush()
    after_batch_on_shard_0(newer)  # the newer claim writes its own records of them again
    newer_writer.flush()
    older.close()
    newer.close()
    _, rebuilt = process("rebuilt")
    try:
        session = rebuilt.get(0).get("u1")
        assert session is not None and session.item_ids == ["a1", "b1"]
    finally:
        rebuilt.close()


def test_at_least_once_an_older_claim_that_wrote_nothing_yet_still_finds_the_newer_one(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # Found by the broker fault schedules: a flow restarted with --no-recovery, with nothing
    # new to write, was frozen; a second machine took its shards; woken, the first wrote
    # and served on, because a hole before its own first record was no hole it could see.
    older_writer, older = machine(kafka_settings, tmp_path / "older")
    older.get(0)  # opened and claimed; nothing written
    newer_writer, newer = machine(kafka_settings, tmp_path / "newer")
    newer.get(0)
    claim = latest_marks(kafka_settings, 0)
    assert claim is not None and claim.generation == 2 and claim.writer == newer_writer.writer
    older.get(0).apply(Event("e0", "u1", "a1", "view", 1_700_000_000_000), 0, 0)
    older_writer.flush()
    with pytest.raises(ChangelogTaken, match="another process took shard 0"):
        after_batch_on_shard_0(older)
    older.close()
    newer.close()
