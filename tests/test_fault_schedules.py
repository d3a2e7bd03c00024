"""Randomized fault schedules, in process, checked against the single-pass oracle.

Each schedule draws, from its seed, a contract (window, TTL, consumed types and
cap, cache on or off), a log of interactions, forgets and invalid records for a
few users over one or two partitions, and a run over it: micro-batches of random
sizes that interleave the partitions, records delivered twice, crashes after the
RocksDB write but before the outputs left (the outputs are lost and reading
rewinds), crashes that lose the store's unwritten marks, clean restarts that
resume from any snapshot the recovery store may hold, restarts that read the
whole log again (``--no-recovery``), lost local state (read again from the start),
and sweeps.  Every answer's session and excluded items must equal the oracle's
as of its event, and the final sessions the oracle's.

``STREAMREC_FAULT_SCHEDULES`` sets how many (``make soak``: thousands), and
``STREAMREC_FAULT_SEED`` the first seed; a failure names its seed and prints
the schedule shrunk (steps and records dropped while it still fails), so
``STREAMREC_FAULT_SEED=<seed> STREAMREC_FAULT_SCHEDULES=1`` runs it again.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from streamrec.contracts import Event, ForgetRequest
from streamrec.flows.guarantee import AtLeastOnce
from streamrec.flows.models import ModelSet, load_model_set, parse_variants
from streamrec.flows.stores import PartitionStores
from streamrec.flows.worker import Workers
from streamrec.item_hashes import EMPTY, item_hash
from streamrec.model.serving import Prepared, Recommender
from streamrec.settings import Settings
from streamrec.state.session import NO_REPLAY
from streamrec.state.store import REPLAY_TAIL_WINDOWS
from tests.oracle import Contract, Oracle
from tests.processor_driver import Record, answers_in, as_messages, new_processor

TOPIC = "events"
T0 = 1_700_000_000_000
SCHEDULES = int(os.environ.get("STREAMREC_FAULT_SCHEDULES", "300"))
FIRST_SEED = int(os.environ.get("STREAMREC_FAULT_SEED", "0"))
# Far before every event time: no session counts as expired when read back.
LONG_AGO = -(2**62)


@dataclass
class Schedule:
    """One drawn schedule: its settings, its log, and what happened, for the failure report."""

    seed: int
    contract: Contract
    session_cache_mb: float
    partitions: int
    log: dict[int, list[Record]]
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {self.contract}, cache {self.session_cache_mb} MB, "
            f"{self.partitions} partition(s)"
        ]
        for partition, records in self.log.items():
            for r in records:
                value = r.value_bytes or b""
                lines.append(
                    f"  {partition}@{r.offset_index}: {value[:120].decode(errors='replace')}"
                )
        lines.append("  run: " + " ".join(self.steps))
        return "\n".join(lines)


def draw_schedule(seed: int, items: list[str]) -> Schedule:
    rng = random.Random(seed)
    contract = Contract(
        session_length=rng.choice([1, 2, 3, 5]),
        ttl_ms=rng.choice([2_000, 10_000]),
        consumed_types=frozenset(rng.sample(["rating", "purchase", "click"], rng.randint(0, 2))),
        consumed_cap=rng.choice([2, 3, 100]),
    )
    partitions = rng.choice([1, 2])
    users = [f"u{n}" for n in range(rng.randint(1, 6))]
    home = {user: rng.randrange(partitions) for user in users}
    catalogue = rng.sample(items, 12) + ["unknown-item"]
    # Event times follow one clock for everyone, a little out of order: a user whose times
    # lag the shard's clock by more than the TTL is swept by it, but would continue their
    # session by the gap rule alone (a divergence the harness found, left to the expiry work).
    now = T0
    log: dict[int, list[Record]] = {p: [] for p in range(partitions)}
    for n in range(rng.randint(5, 60)):
        user = rng.choice(users)
        partition = home[user]
        offset = len(log[partition])
        roll = rng.random()
        if roll < 0.06:
            value = ForgetRequest(f"f{n}", user, now).to_json()
        elif roll < 0.10:
            value = rng.choice([b"{not json", b'{"event_id": "x"}', b""])
        else:
            now += rng.choice([0, 100, 500, 1_000, 3_000, 15_000])
            kind = rng.choice(["view", "view", "click", "rating", "purchase"])
            ts = now - rng.choice([0, 0, 0, 300, 800])
            event = Event(f"e{n}", user, rng.choice(catalogue), kind, ts)
            value = event.to_json()
        log[partition].append(Record(TOPIC, partition, offset, user.encode(), value))
    # No cache, about three of these short sessions, all of them.
    return Schedule(seed, contract, rng.choice([0.0, 0.006, 1.0]), partitions, log)


def oracle_of(schedule: Schedule) -> Oracle:
    oracle = Oracle(schedule.contract)
    for partition, records in schedule.log.items():
        for record in records:
            try:
                doc = orjson.loads(record.value_bytes or b"")
                user, kind = doc["user_id"], doc["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                oracle.invalid(partition, record.offset_index)
                continue
            if kind == "forget":
                oracle.forget(partition, record.offset_index, user)
            else:
                oracle.interaction(
                    partition,
                    record.offset_index,
                    doc["event_id"],
                    user,
                    doc["item_id"],
                    kind,
                    doc["ts"],
                )
    return oracle


@dataclass
class Seen:
    """One answer's inputs, as the processor handed them to the model."""

    event_id: str
    user: str
    session: tuple[str, ...]
    excluded: frozenset[int]


class Recording:
    """Wraps a recommender's ``prepare`` to see what every answer was computed from."""

    def __init__(self, recommender: Recommender) -> None:
        self.calls: list[tuple[str, tuple[str, ...], frozenset[int]]] = []
        original = recommender.prepare

        def prepare(
            history: Any, k: int, exclude: np.ndarray = EMPTY, user: str | None = None
        ) -> Prepared:
            self.calls.append((user or "", tuple(history), frozenset(int(h) for h in exclude)))
            return original(history, k, exclude, user)

        recommender.prepare = prepare  # type: ignore[method-assign]


class Run:
    """A processor over a schedule's state directory, started, crashed and restarted at will."""

    def __init__(
        self,
        schedule: Schedule,
        oracle: Oracle,
        settings: Settings,
        models: ModelSet,
        recording: Recording,
    ) -> None:
        self.schedule = schedule
        self.oracle = oracle
        self.settings = settings
        self.models = models
        self.recording = recording
        recording.calls.clear()
        self.position = dict.fromkeys(schedule.log, 0)
        self.furthest = dict.fromkeys(schedule.log, 0)  # the most any run has read
        # The resume point a restart may go back to: the recovery store's snapshot.
        self.snapshot = dict.fromkeys(schedule.log, 0)
        self.answers: list[Seen] = []
        self.read_before: set[str] = set()  # events some earlier batch processed
        self.rereads: set[str] = set()
        # Answers to events read again from before the replay floor need no full tail.
        self.unchecked: set[str] = set()
        self.floor_known = True
        self._start()

    def _start(self) -> None:
        # A process of its own: a worker whose source resumed at the snapshots.
        self.worker = Workers.of(self.settings).current()
        for partition in self.schedule.log:
            floor = self.snapshot[partition] if self.floor_known else NO_REPLAY
            self.worker.replay_floors[partition] = floor
        self.processor, self.stores = new_processor(
            self.settings, self.schedule.partitions, self.models, self.worker
        )

    def batch(self, rng: random.Random, deliver: bool = True, again: int = 0) -> None:
        """Process a micro-batch of up to a few records of each partition, in a random mix."""
        taken: list[Record] = []
        for partition, records in self.schedule.log.items():
            # A record comes again only from a resume point a snapshot recorded.
            start = max(self.position[partition] - again, self.snapshot[partition])
            end = min(start + rng.randint(0, 6), len(records))
            taken += records[start:end]
            self.position[partition] = max(self.position[partition], end)
            self.furthest[partition] = max(self.furthest[partition], end)
        rng.shuffle(taken)
        taken.sort(key=lambda r: (r.partition_index, r.offset_index))  # in order per partition
        mixed = _interleave(taken, rng)
        calls_before = len(self.recording.calls)
        outputs = self.processor.process(as_messages(mixed))
        calls = self.recording.calls[calls_before:]
        answered = answers_in(outputs, self.settings.recommendations_topic)
        assert len(calls) == len(answered), "one model input per answer"
        for answer, (user, session, excluded) in zip(answered, calls, strict=True):
            if answer.event_id in self.read_before:
                self.rereads.add(answer.event_id)
                if not self.floor_known or self.beyond_tail(answer.event_id):
                    self.unchecked.add(answer.event_id)
            self.read_before.add(answer.event_id)
            if deliver:
                self.answers.append(Seen(answer.event_id, user, session, excluded))
        if deliver:
            self.snapshot_to(rng)
        else:
            self.rewind()  # the outputs never left: reading resumes at the snapshot

    def beyond_tail(self, event_id: str) -> bool:
        """Whether the user's interactions since the replay floor outgrow the replay tail
        (``REPLAY_TAIL_WINDOWS`` windows): a replay is then answered from what is left."""
        read = self.oracle.by_event[event_id]
        floor = self.worker.replay_floors.get(read.partition, 0)
        since = sum(
            1
            for (partition, offset), other in self.oracle.reads.items()
            if partition == read.partition
            and floor <= offset < self.furthest[partition]
            and other.user == read.user
            and other.expected is not None
        )
        return since > REPLAY_TAIL_WINDOWS * self.schedule.contract.session_length

    def snapshot_to(self, rng: random.Random) -> None:
        for partition, position in self.position.items():
            if rng.random() < 0.5:
                self.snapshot[partition] = position
                if self.floor_known:  # as the source does once the snapshot is committed
                    self.worker.replay_floors[partition] = position

    def rewind(self, to_start: bool = False) -> None:
        for partition in self.position:
            self.position[partition] = 0 if to_start else self.snapshot[partition]
            if to_start:
                self.snapshot[partition] = 0

    def crash(self) -> None:
        """The process dies: RocksDB keeps what its log has, the store writes nothing more."""
        for store in self.stores._stores.values():
            store._closed = True
            store._db.close()
        self.rewind()
        self._start()

    def restart(self, no_recovery: bool = False, wipe: bool = False) -> None:
        self.stores.close()
        if wipe:
            shutil.rmtree(self.settings.state_dir, ignore_errors=True)
        if no_recovery or wipe:
            # Everything is read again; a replay tail covers only what a snapshot allows.
            self.floor_known = False
            for records in self.schedule.log.values():
                self.unchecked |= {_event_id(r) for r in records} & self.read_before
        self.rewind(to_start=no_recovery or wipe)
        self._start()

    def sweep(self) -> None:
        self.processor._sweep()

    def finish(self) -> None:
        for partition, records in self.schedule.log.items():
            while self.position[partition] < len(records):
                start = self.position[partition]
                batch = records[start : start + 8]
                self.position[partition] = start + len(batch)
                self.processor.process(as_messages(batch))
        self.stores.close()


def _interleave(records: list[Record], rng: random.Random) -> list[Record]:
    """Records of several partitions mixed at random, each partition's in offset order."""
    queues: dict[int, list[Record]] = {}
    for record in records:
        queues.setdefault(record.partition_index, []).append(record)
    mixed: list[Record] = []
    while queues:
        partition = rng.choice(sorted(queues))
        mixed.append(queues[partition].pop(0))
        if not queues[partition]:
            del queues[partition]
    return mixed


def _event_id(record: Record) -> str:
    try:
        return str(orjson.loads(record.value_bytes or b"").get("event_id", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def hashes(items: tuple[str, ...] | set[str]) -> frozenset[int]:
    return frozenset(item_hash(i) for i in items)


def divergences(schedule: Schedule, run: Run, oracle: Oracle) -> list[str]:
    """Every way the run differs from the oracle; empty when it does not."""
    found = []
    for seen in run.answers:
        want = oracle.by_event[seen.event_id].expected
        assert want is not None
        if seen.event_id in run.unchecked:
            continue
        reread = seen.event_id in run.rereads
        sessions = {want.session}
        if reread and oracle.forgotten_after(seen.event_id):
            sessions.add(())  # erased since: nothing of it may come back
        if seen.session not in sessions:
            found.append(
                f"answer to {seen.event_id} ({seen.user}) saw session {seen.session}, "
                f"the oracle {want.session}"
            )
        exact = hashes(want.consumed)
        if seen.excluded != exact and not (
            reread and seen.excluded <= hashes(oracle.ever_consumed(seen.user))
        ):
            found.append(
                f"answer to {seen.event_id} ({seen.user}) excluded {len(seen.excluded)} items, "
                f"the oracle {sorted(want.consumed)}"
            )
    expected = oracle.sessions()
    reopened = PartitionStores(schedule.partitions, AtLeastOnce(run.settings))
    try:
        stored = {}
        for partition in range(schedule.partitions):
            store = reopened.get(partition)
            for user in store.user_ids():
                session = store.get(user, LONG_AGO)
                assert session is not None
                stored[user] = (tuple(session.item_ids), frozenset(store.consumed(user).tolist()))
    finally:
        reopened.close()
    for user, (items, consumed) in stored.items():
        want = expected.get(user)
        if want is None:
            found.append(f"{user} has session {items}; the oracle has none (erased)")
        elif (items, consumed) != (want.session, hashes(want.consumed)):
            found.append(f"{user}: stored {items} and {len(consumed)} consumed, oracle {want}")
    for user in expected.keys() - stored.keys():
        if not oracle.may_have_expired(user):
            found.append(f"{user}: no session stored; the oracle has {expected[user]}")
    return found


ACTIONS: dict[str, tuple[float, Callable[[Run, random.Random], None]]] = {
    "batch": (0.55, lambda run, rng: run.batch(rng)),
    "again": (0.08, lambda run, rng: run.batch(rng, again=rng.randint(1, 3))),  # delivered twice
    "lost": (0.08, lambda run, rng: run.batch(rng, deliver=False)),  # crash before outputs left
    "crash": (0.08, lambda run, rng: run.crash()),
    "restart": (0.08, lambda run, rng: run.restart()),
    "norecov": (0.03, lambda run, rng: run.restart(no_recovery=True)),
    "wipe": (0.03, lambda run, rng: run.restart(wipe=True)),
    "sweep": (0.07, lambda run, rng: run.sweep()),
}


def draw_steps(seed: int) -> list[tuple[str, int]]:
    """The run: each step's action and the seed of its own choices (so steps can be dropped)."""
    rng = random.Random(seed * 7919 + 1)
    names = list(ACTIONS)
    weights = [ACTIONS[name][0] for name in names]
    return [
        (rng.choices(names, weights)[0], rng.randrange(2**32)) for _ in range(rng.randint(3, 40))
    ]


def play(
    schedule: Schedule,
    steps: list[tuple[str, int]],
    models: ModelSet,
    recording: Recording,
    scratch: Path,
) -> list[str]:
    """Run ``steps`` over ``schedule``'s log; the divergences from the oracle."""
    oracle = oracle_of(schedule)
    contract = schedule.contract
    settings = Settings(
        events_topic=TOPIC,
        changelog=False,
        state_dir=scratch / f"state-{schedule.seed}",
        session_length=contract.session_length,
        session_ttl_s=contract.ttl_ms / 1000,
        consumed_types=",".join(sorted(contract.consumed_types)),
        consumed_cap=contract.consumed_cap,
        session_cache_mb=schedule.session_cache_mb,
    )
    schedule.steps = [name for name, _ in steps]
    run = Run(schedule, oracle, settings, models, recording)
    try:
        for name, step_seed in steps:
            ACTIONS[name][1](run, random.Random(step_seed))
        run.finish()
        return divergences(schedule, run, oracle)
    finally:
        shutil.rmtree(settings.state_dir, ignore_errors=True)


def shrink(
    schedule: Schedule,
    steps: list[tuple[str, int]],
    still_fails: Callable[[Schedule, list[tuple[str, int]]], bool],
) -> tuple[Schedule, list[tuple[str, int]]]:
    """A smaller schedule that still fails: steps, then log records, dropped one at a time
    while the failure stays (each record's offset renumbered in its partition)."""
    changed = True
    while changed:
        changed = False
        for at in reversed(range(len(steps))):
            fewer = steps[:at] + steps[at + 1 :]
            if still_fails(schedule, fewer):
                steps, changed = fewer, True
        for partition in list(schedule.log):
            for at in reversed(range(len(schedule.log[partition]))):
                log = dict(schedule.log)
                kept = log[partition][:at] + log[partition][at + 1 :]
                log[partition] = [
                    Record(r.topic_name, partition, offset, r.key_bytes, r.value_bytes)
                    for offset, r in enumerate(kept)
                ]
                smaller = Schedule(
                    schedule.seed,
                    schedule.contract,
                    schedule.session_cache_mb,
                    schedule.partitions,
                    log,
                )
                if still_fails(smaller, steps):
                    schedule, changed = smaller, True
    return schedule, steps


def run_schedule(
    seed: int, models: ModelSet, recording: Recording, items: list[str], scratch: Path
) -> Schedule:
    schedule = draw_schedule(seed, items)
    steps = draw_steps(seed)
    problems = play(schedule, steps, models, recording, scratch)
    if problems:

        def still_fails(candidate: Schedule, candidate_steps: list[tuple[str, int]]) -> bool:
            return bool(play(candidate, candidate_steps, models, recording, scratch))

        small, small_steps = shrink(schedule, steps, still_fails)
        problems = play(small, small_steps, models, recording, scratch)
        pytest.fail(
            f"divergences (schedule shrunk from {sum(map(len, schedule.log.values()))} "
            f"records and {len(steps)} steps):\n  "
            + "\n  ".join(problems[:10])
            + f"\n{small.describe()}\n  steps: {small_steps}"
        )
    return schedule


@pytest.fixture(scope="module")
def models() -> Iterator[ModelSet]:
    settings = Settings()
    yield load_model_set(settings.model_dir, parse_variants(None), settings)


@pytest.fixture(scope="module")
def recording(models: ModelSet) -> Recording:
    return Recording(models.recommenders[0])


@pytest.fixture(scope="module")
def items(models: ModelSet) -> list[str]:
    return list(models.recommenders[0].vocab.items[:200])


@pytest.mark.parametrize("block", range(10))
def test_random_schedules_of_faults_agree_with_the_oracle(
    block: int, models: ModelSet, recording: Recording, items: list[str], tmp_path: Path
) -> None:
    for seed in range(FIRST_SEED + block, FIRST_SEED + SCHEDULES, 10):
        run_schedule(seed, models, recording, items, tmp_path)
