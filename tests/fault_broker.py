"""Randomized fault schedules against the real broker and real `streamrec run` processes.

A schedule is drawn from one seed (``Schedule.draw``): a log of records for a
few users (interactions with popular items of the served model's vocabulary,
forget requests, invalid records), cut into chunks, and a plan that interleaves
producing the chunks with faults: starts, SIGTERM, SIGKILL, SIGSTOP/SIGCONT of a
flow, a frozen broker (SIGSTOP; stopped and started only where a schedule is
drawn with ``broker_restarts``), state and recovery directories wiped before a
restart, restarts with ``--no-recovery``, and takeovers: a second machine, with
its own disk, started while the first is frozen (its replacement fences it
exactly once; at least once the older claim must stop by itself once it
writes), then stopped, and the first machine started again on its own, now
stale, disk.  ``run_schedule`` plays it, reads back the
events topic to learn every record's partition and offset, feeds the oracle
(``tests/oracle.py``) the log in offset order and compares answer by answer,
dead letter by dead letter and session by session (``verdict``).

>>> schedule = Schedule.draw(7, base_ms=1_700_000_000_000, items=[f"i{n}" for n in range(20)])
>>> produced = [s.arg for s in schedule.plan if s.action.startswith("produce")]
>>> schedule.seed, sorted(set(produced)) == list(range(len(schedule.chunks)))
(7, True)
>>> Schedule.draw(7, 1_700_000_000_000, [f"i{n}" for n in range(20)]).plan == schedule.plan
True
"""

from __future__ import annotations

import bisect
import os
import random
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import orjson

from streamrec.contracts import DeadLetter, Event, ForgetRequest, Recommendation
from streamrec.flows.cli import EXIT_STATE_UNUSABLE, EXIT_UNAVAILABLE
from streamrec.item_hashes import item_hash
from streamrec.kafka_clients import topic_partitions
from streamrec.settings import Settings
from streamrec.state.layout import shard_dir
from streamrec.state.store import SessionStore
from streamrec.tools.kafka_local import LocalKafka
from tests.flow_harness import (
    FlowProcess,
    RecommendationCollector,
    TopicReader,
    dead_letters,
    headers_of,
    offset_of,
    partition_of,
    produce,
    value_of,
)
from tests.oracle import Contract, Expected, Oracle

SESSION_TTL_S: Final = 60.0
TTL_MS: Final = int(SESSION_TTL_S * 1000)
# No user's idle gap lies within this of the TTL: a shard's clock moves in whole seconds
# and samples recent users, so a gap that close could expire by it and not by the event.
TTL_MARGIN_MS: Final = 5_000
EXACTLY_ONCE: Final = ("--guarantee", "exactly-once")
# The popular items of the served model: the ones it is likely to recommend back.
ITEM_POOL: Final = 60
# Bounds on each wait of a schedule, so that a stuck flow fails it with the schedule printed.
ANSWER_TIMEOUT_S: Final = 90.0
EXIT_TIMEOUT_S: Final = 60.0
DIVERGENCES_SHOWN: Final = 25
# How likely a chunk is to go to a second machine that takes over from the first.
TAKEOVER_P: Final = 0.25
# How long a superseded process is given to stop by itself (it finds it lost its shards).
RETIRE_S: Final = 8.0
# What a superseded process says when it stops with exit 65: it lost its partitions.
SUPERSEDED: Final = re.compile(r"served by another process|another process took shard")
# What a flow says when it has taken an events partition and is about to read it.
TAKEN: Final = re.compile(r"events partition (\d+) taken (?:at least once|exactly-once)")
# How often a schedule's flows may be started again after exit 69, as a supervisor would.
SUPERVISOR_RESTARTS: Final = 3


def popular_items(model_dir: Path, n: int = ITEM_POOL) -> list[str]:
    """The ``n`` most popular items of the model in ``model_dir``, by their real item ids."""
    vocab: list[str] = orjson.loads((model_dir / "vocab.json").read_bytes())["items"]
    with np.load(model_dir / "candidates.npz") as index:
        popularity = index["popularity"]
    # Model index i is vocabulary entry i - 1 (0 is padding).
    return [vocab[i - 1] for i in np.argsort(-popularity, kind="stable")[:n] if i > 0]


@dataclass(frozen=True)
class Record:
    """One record of a schedule's log: ``kind`` is event, forget or invalid."""

    kind: str
    user: str
    key: bytes
    value: bytes
    event: Event | None = None
    note: str = ""  # an invalid record: what is wrong with it

    def describe(self, base_ms: int) -> str:
        if self.event is not None:
            e = self.event
            return f"{e.event_id} {e.user_id} {e.item_id} {e.type} t+{(e.ts - base_ms) / 1000:.1f}s"
        return f"{self.kind} {self.user}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Step:
    """One step of a plan; ``arg`` is a chunk, a process index, seconds, or a start's flag."""

    action: str
    arg: int | float | str | None = None

    def __str__(self) -> str:
        if self.arg is None or self.arg == "":
            return self.action
        if isinstance(self.arg, float):
            return f"{self.action} {self.arg:.1f}s"
        return f"{self.action} {self.arg}"


@dataclass
class Schedule:
    """A seed's log and fault plan, and the settings its flows run with."""

    seed: int
    base_ms: int
    processes: int
    exactly_once: bool
    session_length: int
    consumed_cap: int
    transaction_interval_ms: float
    users: list[str]
    chunks: list[list[Record]]
    plan: list[Step]

    @classmethod
    def draw(
        cls,
        seed: int,
        base_ms: int,
        items: Sequence[str],
        processes: int = 1,
        broker_restarts: bool = False,
        takeover: bool = False,
        exactly_once: bool | None = None,
    ) -> Schedule:
        """The schedule of ``seed``: the same log and plan every time (times from ``base_ms``).

        ``takeover``: a second machine takes over at the first chance (one process
        only); ``exactly_once``: this guarantee rather than one drawn.
        """
        rng = random.Random(seed)
        drawn = rng.random() < 0.35
        exactly_once = drawn if exactly_once is None else exactly_once
        users = [f"u{seed}-{n}" for n in range(rng.randint(5, 30))]
        pool = rng.sample(list(items), min(len(items), rng.randint(10, 30)))
        records = _draw_log(rng, base_ms, users, pool, rng.randint(60, 200))
        cuts = sorted(rng.sample(range(1, len(records)), rng.randint(2, 5)))
        chunks = [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True)]
        plan = _draw_plan(rng, len(chunks), processes, exactly_once, broker_restarts, takeover)
        return cls(
            seed=seed,
            base_ms=base_ms,
            processes=processes,
            exactly_once=exactly_once,
            session_length=rng.choice([3, 5, 8, 50]),
            consumed_cap=rng.choice([2, 3, 5000]),
            # Long enough, now and then, for a frozen flow to hold a batch it has not committed.
            transaction_interval_ms=rng.choice([0.0, 100.0, 2000.0, 2000.0]),
            users=users,
            chunks=chunks,
            plan=plan,
        )

    def settings(self, settings: Settings) -> Settings:
        return settings.replace(
            session_ttl_s=SESSION_TTL_S,
            session_length=self.session_length,
            consumed_cap=self.consumed_cap,
            transaction_interval_ms=self.transaction_interval_ms,
        )

    def contract(self, settings: Settings) -> Contract:
        types = frozenset(t.strip() for t in settings.consumed_types.split(",") if t.strip())
        return Contract(self.session_length, TTL_MS, types, self.consumed_cap)

    def describe(self) -> str:
        guarantee = "exactly-once" if self.exactly_once else "at-least-once"
        records = sum(len(c) for c in self.chunks)
        sizes = ", ".join(str(len(c)) for c in self.chunks)
        return (
            f"seed {self.seed}: {self.processes} process(es), {guarantee}, "
            f"L={self.session_length}, consumed cap {self.consumed_cap}, "
            f"transaction interval {self.transaction_interval_ms:g} ms, {len(self.users)} users, "
            f"{records} records in {len(self.chunks)} chunks ({sizes})\n"
            f"plan: {' · '.join(map(str, self.plan))}"
        )


def _draw_log(
    rng: random.Random, base_ms: int, users: list[str], pool: list[str], n: int
) -> list[Record]:
    now = base_ms
    last_seen: dict[str, int] = {}
    records: list[Record] = []
    forgotten: str | None = None
    for k in range(n):
        # Mostly a few hundred ms apart; now and then everyone idles past the TTL.
        now += rng.randint(0, 400) if rng.random() > 0.04 else rng.randint(2, 6) * TTL_MS
        # A forget is often followed by its user's next events: what a replay must not erase.
        user = forgotten if forgotten and rng.random() < 0.6 else rng.choice(users)
        forgotten = None
        gap = now - last_seen.get(user, now)
        if TTL_MS - TTL_MARGIN_MS < gap <= TTL_MS + TTL_MARGIN_MS:
            now = last_seen[user] + TTL_MS + TTL_MARGIN_MS + 1
        roll = rng.random()
        if roll < 0.06:
            forget = ForgetRequest(f"f{k}", user, now)
            records.append(Record("forget", user, forget.key, forget.to_json()))
            forgotten = user
        elif roll < 0.11:
            records.append(_invalid(rng, k, user, users, pool, now))
        else:
            kind = rng.choices(["view", "click", "rating", "purchase"], [5, 3, 2, 1])[0]
            event = Event(f"e{k}", user, rng.choice(pool), kind, now)
            records.append(Record("event", user, event.key, event.to_json(), event))
            last_seen[user] = now
    return records


def _invalid(
    rng: random.Random, k: int, user: str, users: list[str], pool: list[str], now: int
) -> Record:
    doc = {"event_id": f"x{k}", "user_id": user, "item_id": rng.choice(pool), "type": "view"}
    note = rng.choice(["malformed", "unknown type", "no item", "key mismatch", "seconds"])
    if note == "malformed":
        value = b'{"event_id": "x%d", not json' % k
    else:
        if note == "unknown type":
            doc["type"] = "teleport"
        elif note == "no item":
            del doc["item_id"]
        elif note == "key mismatch":
            doc["user_id"] = rng.choice([u for u in users if u != user] or ["someone-else"])
        value = orjson.dumps({**doc, "ts": now // 1000 if note == "seconds" else now})
    return Record("invalid", user, user.encode(), value, note=note)


def _draw_plan(
    rng: random.Random,
    chunks: int,
    processes: int,
    exactly_once: bool,
    broker_restarts: bool,
    takeover: bool = False,
) -> list[Step]:
    plan: list[Step] = []
    running = False
    rival = False
    taken_over = False

    def start() -> None:
        nonlocal running
        plan.append(Step("start", "--no-recovery" if rng.random() < 0.3 else ""))
        running = True

    def move_back() -> None:
        # The rival leaves and the first machine comes back to its own, stale, disk.
        nonlocal running, rival
        # Retired at once (SIGTERM before SIGCONT: it wakes to stop) or after a moment awake.
        leave = [Step("rival-stop"), Step("retire", rng.choice(["at once", "awake"]))]
        plan.extend(leave if rng.random() < 0.5 else leave[::-1])
        running = rival = False

    for chunk in range(chunks):
        if rival and rng.random() < 0.5:  # the first machine is back at once
            move_back()
        elif rival:  # the next chunk goes to whoever is live, then the first machine is back
            plan += [Step("produce", chunk), Step("answered")]
            move_back()
            continue
        forced = takeover and not taken_over and processes == 1 and chunk > 0
        if forced and not running:
            start()
        if running and processes == 1 and (forced or rng.random() < TAKEOVER_P):
            taken_over = True
            plan.append(Step("serving"))  # a flow frozen while it starts holds nothing yet
            if rng.random() < 0.5:  # frozen idle: it wakes to the chunk its rival answered
                plan += [Step("freeze", 0), Step("produce", chunk)]
            else:  # frozen mid-chunk, the batch of its head not yet committed
                plan += [
                    Step("produce-head", chunk),
                    Step("sleep", round(rng.uniform(0.2, 1.0), 1)),
                ]
                plan += [Step("freeze", 0), Step("produce-tail", chunk)]
            plan += [
                Step("sleep", round(rng.uniform(0.0, 1.5), 1)),
                Step("rival"),
                Step("answered"),
            ]
            if rng.random() < 0.6:
                plan.append(Step("thaw", 0))  # both live: the older claim must notice
            rival = True
            continue
        delivery = rng.choices(["live", "down", "frozen"], [5, 3 if not running else 0, 2])[0]
        if delivery == "down":
            plan.append(Step("produce", chunk))
            start()
        elif delivery == "frozen" and running:
            frozen = rng.randrange(processes)
            plan += [Step("freeze", frozen), Step("produce", chunk)]
            plan += [Step("sleep", round(rng.uniform(1.0, 4.0), 1)), Step("thaw", frozen)]
        else:
            if not running:
                start()
            plan.append(Step("produce", chunk))
        # The fault lands mid-work, or once everything so far was answered.
        if rng.random() < 0.6:
            plan.append(Step("sleep", round(rng.uniform(0.0, 1.5), 1)))
        else:
            plan.append(Step("answered"))
        faults = ["none", "term", "kill", "broker-freeze", "broker-restart"]
        fault = rng.choices(faults, [2, 3, 4, 1, 1 if broker_restarts else 0])[0]
        if fault.startswith("broker-"):
            plan.append(Step(fault, round(rng.uniform(2.0, 5.0), 1)))
        elif fault in ("term", "kill"):
            plan.append(Step(fault, rng.randrange(processes) if fault == "kill" else None))
            running = False
            if rng.random() < 0.3:
                plan.append(Step("wipe-state", rng.randrange(processes)))
            if rng.random() < 0.25 and not exactly_once:
                plan.append(Step("wipe-recovery", rng.randrange(processes)))
    if rival:
        move_back()
    if not running:
        start()
    plan.append(Step("finish"))
    return plan


class ScheduleFailed(AssertionError):
    """A schedule that could not be played to its end (a flow died, stalled or would not stop)."""


class Machines:
    """A schedule's flow processes: one, or a Bytewax cluster of two, each with its own disk.

    Killing one process of a cluster takes the others down with it (Bytewax's
    cluster does not survive a death): ``kill`` waits for them to exit.  A
    ``rival`` is a second single process on a disk of its own, started while the
    first serves the same partitions; from then on the first is superseded: it
    may stop by itself, with exit 65 and a line that says it lost its shards.
    """

    def __init__(self, settings: Settings, processes: int, args: Sequence[str]) -> None:
        root = settings.state_dir.parent
        self.settings = [
            settings
            if processes == 1
            else settings.replace(
                state_dir=root / f"m{i}" / "state", recovery_dir=root / f"m{i}" / "recovery"
            )
            for i in range(processes)
        ]
        self.args = list(args)
        self.flows: list[FlowProcess] = []
        self.problems: list[str] = []  # stops that were not clean, said in the verdict
        self.starts: list[float] = []  # wall-clock ms of each start: which run answered
        root_rival = root / "rival"
        self.rival_settings = settings.replace(
            state_dir=root_rival / "state", recovery_dir=root_rival / "recovery"
        )
        self.rival: FlowProcess | None = None
        self.superseded = False
        self.stopped_by_themselves = 0  # superseded processes that found out and stopped
        self.restarted = 0  # starts again after exit 69, as a supervisor does
        self._no_recovery = False

    def start(self, no_recovery: bool) -> None:
        from tests.conftest import free_port

        self.starts.append(time.time() * 1000)
        self._no_recovery = no_recovery
        extra = ["--no-recovery"] if no_recovery else []
        cluster: list[str] = []
        if len(self.settings) > 1:
            addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in self.settings)
            cluster = ["-a", addresses]
        self.flows = [
            FlowProcess(
                s, [*self.args, *extra, *(["-i", str(i), *cluster] if cluster else [])]
            ).start()
            for i, s in enumerate(self.settings)
        ]

    def running(self) -> bool:
        return bool(self.flows)

    def check_alive(self) -> None:
        named = [(f"process {i}", flow) for i, flow in enumerate(self.flows)]
        if self.rival is not None:
            named.append(("the rival", self.rival))
        for name, flow in named:
            if flow.alive():
                continue
            assert flow.process is not None
            superseded = self.superseded and flow is not self.rival
            if superseded and (_stopped_as_superseded(flow) or _kafka_away_at_start(flow)):
                continue
            if _kafka_away_at_start(flow) and self.restarted < SUPERVISOR_RESTARTS:
                # The broker did not answer in time at start (frozen, restarting): exit 69
                # says "restart later", and a supervisor does.
                self.restarted += 1
                if flow is self.rival:
                    self.rival = FlowProcess(self.rival_settings, self.args).start()
                else:
                    for other in self.flows:  # a cluster cannot go on without one of its own
                        if other.alive():
                            other.kill()
                    self.start(self._no_recovery)
                return
            raise ScheduleFailed(
                f"{name} exited by itself with {flow.process.returncode}:\n" + log_excerpt(flow)
            )

    def wait_serving(self, partitions: int) -> None:
        """Until the processes have taken every events partition: opened its shard, and
        said where they read it from (a flow frozen before that holds nothing yet)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            taken = {int(p) for f in self.flows for p in TAKEN.findall(f.output())}
            if taken >= set(range(partitions)):
                return
            if time.monotonic() > deadline:
                raise ScheduleFailed(
                    f"not serving after {ANSWER_TIMEOUT_S:.0f} s:\n{self.outputs()}"
                )
            self.check_alive()
            time.sleep(0.1)

    def start_rival(self) -> None:
        """A second process on a disk of its own, serving the same partitions as the first."""
        assert len(self.flows) == 1, "a rival stands beside a single process"
        self.starts.append(time.time() * 1000)
        self.rival = FlowProcess(self.rival_settings, self.args).start()
        self.superseded = True

    def stop_rival(self) -> None:
        assert self.rival is not None and self.rival.process is not None
        self.rival.ask_to_stop()
        code = self._wait_exit(self.rival, "the rival")
        if code != 0:
            self.problems.append(f"the rival exited {code} on SIGTERM:\n{log_excerpt(self.rival)}")
        self.rival = None

    def retire(self, at_once: bool) -> None:
        """The superseded process: thawed, given a moment to find out, then asked to stop;
        ``at_once``: asked first, so that it wakes to stop (with what it held when frozen).

        Stopping by itself it must say why (exit 65, its shards taken); asked, it
        may still find out while it closes, or stop cleanly: anything else is a problem.
        """
        for flow in self.flows:
            assert flow.process is not None
            if at_once and flow.alive() and flow.started_handling_signals(0):
                flow.process.send_signal(signal.SIGTERM)
            flow.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + (0 if at_once else RETIRE_S)
        while any(f.alive() for f in self.flows) and time.monotonic() < deadline:
            time.sleep(0.1)
        for i, flow in enumerate(self.flows):
            if flow.alive():
                if not at_once:
                    # Awake this long with records to read, it must have found out.
                    self.problems.append(
                        f"superseded process {i} still served {RETIRE_S:.0f} s after it woke "
                        f"(another process took its partitions):\n{log_excerpt(flow)}"
                    )
                    flow.ask_to_stop()
                code = self._wait_exit(flow, f"superseded process {i}")
            else:
                assert flow.process is not None
                code = flow.process.returncode
            if _stopped_as_superseded(flow):
                self.stopped_by_themselves += 1
            elif code != 0 and not _kafka_away_at_start(flow):
                self.problems.append(f"superseded process {i} exited {code}:\n{log_excerpt(flow)}")
        self.flows = []
        self.superseded = False

    @staticmethod
    def _wait_exit(flow: FlowProcess, name: str) -> int:
        assert flow.process is not None
        try:
            return flow.process.wait(EXIT_TIMEOUT_S)
        except Exception as err:
            flow.kill()
            raise ScheduleFailed(
                f"{name} did not stop within {EXIT_TIMEOUT_S:.0f} s of SIGTERM:\n"
                + flow.output()[-3000:]
            ) from err

    def stop(self) -> None:
        """SIGTERM every process; each must exit 0 (everything in flight finished)."""
        for flow in self.flows:
            flow.ask_to_stop()
        for i, flow in enumerate(self.flows):
            code = self._wait_exit(flow, f"process {i}")
            if code != 0:
                self.problems.append(f"process {i} exited {code} on SIGTERM:\n{log_excerpt(flow)}")
        self.flows = []

    def kill(self, index: int) -> None:
        """SIGKILL process ``index``; the rest of a cluster exits by itself (else is killed)."""
        self.flows[index].kill()
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for flow in self.flows:
            while flow.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if flow.alive():
                flow.kill()
        self.flows = []

    def signal(self, index: int, signum: int) -> None:
        process = self.flows[index].process
        assert process is not None
        process.send_signal(signum)

    def thaw_all(self) -> None:
        for flow in self.flows:
            if flow.alive() and flow.process is not None:
                flow.process.send_signal(signal.SIGCONT)

    def everyone(self) -> list[FlowProcess]:
        return [*self.flows, *([self.rival] if self.rival is not None else [])]

    def wipe_state(self, index: int) -> None:
        shutil.rmtree(self.settings[index].state_dir, ignore_errors=True)

    def wipe_recovery(self, index: int) -> None:
        shutil.rmtree(self.settings[index].recovery_dir, ignore_errors=True)

    def outputs(self) -> str:
        return "\n".join(log_excerpt(f) for f in self.everyone())


def _kafka_away_at_start(flow: FlowProcess) -> bool:
    """Whether ``flow`` stopped with exit 69: Kafka did not answer while it started."""
    assert flow.process is not None
    return flow.process.returncode == EXIT_UNAVAILABLE


def _stopped_as_superseded(flow: FlowProcess) -> bool:
    """Whether ``flow`` stopped because another process took its partitions, and said so."""
    assert flow.process is not None
    code = flow.process.returncode
    return code == EXIT_STATE_UNUSABLE and SUPERSEDED.search(flow.output()) is not None


# librdkafka's own log lines and the frames of a Rust backtrace: noise around the one error.
_NOISE: Final = re.compile(r"^(%\d|kafka (INFO|WARNING|ERROR): FAIL|\s+\d+: |\s+at |  File |    )")


def log_excerpt(flow: FlowProcess, lines: int = 40) -> str:
    """The last ``lines`` lines of a flow's log that say something (the error, not the noise)."""
    said = [line for line in flow.output().splitlines() if not _NOISE.match(line)]
    return "\n".join(line[:500] for line in said[-lines:])


@dataclass
class Played:
    """What a schedule's run left: the log as read back, answers, dead letters, sessions."""

    schedule: Schedule
    log: list[tuple[int, int, Record]]  # (partition, offset, record), in offset order
    answers: dict[str, list[Recommendation]]
    letters: list[DeadLetter]
    sessions: dict[str, tuple[list[str], list[int]]]  # user: (window item ids, consumed hashes)
    state_problems: list[str]
    problems: list[str]
    seconds: float
    sentinels: list[Record] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    stopped_by_themselves: int = 0  # superseded processes that found out they were
    restarted: int = 0  # starts again after exit 69 (Kafka away at start), as a supervisor's

    def run_of(self, answer: Recommendation) -> int:
        """Which run (1: the first start) sent ``answer``, by the time the flow received it."""
        return bisect.bisect_right(self.starts, answer.received_ms)


def run_schedule(schedule: Schedule, settings: Settings, kafka: LocalKafka) -> Played:
    """Play ``schedule`` against the real broker and flows; stop cleanly; gather what they left."""
    started = time.monotonic()
    settings = schedule.settings(settings)
    machines = Machines(settings, schedule.processes, EXACTLY_ONCE if schedule.exactly_once else ())
    collector = RecommendationCollector(settings, committed_only=schedule.exactly_once)
    produced: list[Record] = []
    at = "finish"
    try:
        for n, step in enumerate(schedule.plan):
            at = f"step {n} ({step})"
            if machines.running():
                machines.check_alive()
            _play(step, schedule, machines, collector, kafka, produced, settings)
        at = "finish"
        sentinels = _finish(schedule, settings, machines, collector, produced)
        machines.stop()
        collector.poll(2.0)  # anything more is a duplicate
    except ScheduleFailed as err:
        raise ScheduleFailed(f"{schedule.describe()}\nat {at}: {err}") from None
    finally:
        machines.thaw_all()
        for flow in machines.everyone():
            if flow.alive():
                flow.kill()
        collector.close()
    log = _read_back(settings, [*produced, *sentinels])
    letters = _dead_letters(settings, schedule, sum(r.kind == "invalid" for r in produced))
    sessions, state_problems = _stored(machines.settings, {r.user for r in produced})
    return Played(
        schedule,
        log,
        collector.by_event,
        letters,
        sessions,
        state_problems,
        machines.problems,
        time.monotonic() - started,
        sentinels,
        machines.starts,
        machines.stopped_by_themselves,
        machines.restarted,
    )


def _play(
    step: Step,
    schedule: Schedule,
    machines: Machines,
    collector: RecommendationCollector,
    kafka: LocalKafka,
    produced: list[Record],
    settings: Settings,
) -> None:
    action, arg = step.action, step.arg
    if action == "start":
        machines.start(no_recovery=arg == "--no-recovery")
    elif action in ("produce", "produce-head", "produce-tail"):
        assert isinstance(arg, int)
        chunk = schedule.chunks[arg]
        half = max(1, len(chunk) // 2)
        if action == "produce-head":
            chunk = chunk[:half]
        elif action == "produce-tail":
            chunk = chunk[half:]
        produce(settings, [(r.key, r.value) for r in chunk])
        produced.extend(chunk)
    elif action == "sleep":
        assert isinstance(arg, float)
        deadline = time.monotonic() + arg
        while time.monotonic() < deadline:
            if machines.running():
                machines.check_alive()
            collector.poll(min(0.2, max(deadline - time.monotonic(), 0.01)))
    elif action == "answered":
        _wait_answered(collector, machines, {r.event.event_id for r in produced if r.event})
    elif action == "term":
        machines.stop()
    elif action == "kill":
        assert isinstance(arg, int)
        machines.kill(arg)
    elif action == "freeze":
        assert isinstance(arg, int)
        machines.signal(arg, signal.SIGSTOP)
    elif action == "thaw":
        assert isinstance(arg, int)
        machines.signal(arg, signal.SIGCONT)
    elif action == "broker-freeze":
        assert isinstance(arg, float)
        _freeze_broker(kafka, arg)
    elif action == "broker-restart":
        assert isinstance(arg, float)
        _restart_broker(kafka, arg)
    elif action == "serving":
        machines.wait_serving(len(topic_partitions(settings, settings.events_topic)))
    elif action == "rival":
        machines.start_rival()
    elif action == "rival-stop":
        machines.stop_rival()
    elif action == "retire":
        machines.retire(at_once=arg == "at once")
    elif action == "wipe-state":
        assert isinstance(arg, int)
        machines.wipe_state(arg)
    elif action == "wipe-recovery":
        assert isinstance(arg, int)
        machines.wipe_recovery(arg)
    elif action != "finish":
        raise ValueError(f"unknown step {step}")


def _freeze_broker(kafka: LocalKafka, seconds: float) -> None:
    # A stall, not a restart: the session's broker serves every other test too, and a
    # stopped JVM keeps its ports and files (a restart is left to a broker of a test's own).
    pid = kafka.status().pid
    assert pid is not None, "the test broker is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _restart_broker(kafka: LocalKafka, seconds: float) -> None:
    # The session's broker, stopped cleanly and started again on its ports and files; the
    # soak only (STREAMREC_BROKER_RESTARTS): a broker that failed to come back would fail
    # every later test of the session.
    kafka.down()
    try:
        time.sleep(seconds)
    finally:
        kafka.up()


def _wait_answered(
    collector: RecommendationCollector, machines: Machines, event_ids: set[str]
) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while not event_ids <= collector.by_event.keys():
        if time.monotonic() > deadline:
            missing = sorted(event_ids - collector.by_event.keys())
            raise ScheduleFailed(
                f"{len(missing)} events without an answer after {ANSWER_TIMEOUT_S:.0f} s "
                f"(first: {missing[:10]}):\n{machines.outputs()}"
            )
        machines.check_alive()
        collector.poll(0.3)


def _finish(
    schedule: Schedule,
    settings: Settings,
    machines: Machines,
    collector: RecommendationCollector,
    produced: list[Record],
) -> list[Record]:
    """Wait until the last run has read every partition to its end, and everything is answered.

    Events of fresh users, produced after the last start, until every partition
    that holds records has one: their answers can only come from the last run,
    after it read all that came before them (a partition is read in order).
    """
    sentinels: list[Record] = []
    last_ts = max((r.event.ts for r in produced if r.event), default=schedule.base_ms)
    used = set(_read_back_partitions(settings, produced).values())
    names = random.Random(schedule.seed)
    for k in range(40):
        user = f"end{schedule.seed}-{names.getrandbits(32):08x}"
        event = Event(f"end{k}", user, "1", "view", last_ts + k + 1)
        sentinel = Record("event", user, event.key, event.to_json(), event)
        produce(settings, [(sentinel.key, sentinel.value)])
        sentinels.append(sentinel)
        where = _read_back_partitions(settings, sentinels)
        if set(where.values()) >= used:
            break
    else:
        raise ScheduleFailed(f"40 sentinel users did not cover partitions {sorted(used)}")
    wanted = {r.event.event_id for r in [*produced, *sentinels] if r.event}
    _wait_answered(collector, machines, wanted)
    return sentinels


def _read_back_partitions(settings: Settings, records: list[Record]) -> dict[bytes, int]:
    return {r.value: p for p, _, r in _read_back(settings, records)}


def _read_back(settings: Settings, records: list[Record]) -> list[tuple[int, int, Record]]:
    """Where each of ``records`` landed, read back from the events topic, in offset order."""
    by_value = {r.value: r for r in records}
    reader = TopicReader(settings, settings.events_topic)
    try:
        messages = reader.read_to_end(settings, settings.events_topic)
    finally:
        reader.close()
    found = [
        (partition_of(m), offset_of(m), by_value[value_of(m)])
        for m in messages
        if value_of(m) in by_value
    ]
    return sorted(found, key=lambda f: (f[0], f[1]))


def _dead_letters(settings: Settings, schedule: Schedule, invalid: int) -> list[DeadLetter]:
    if schedule.exactly_once:
        # read_committed never reaches the end offset (a commit marker sits there): read
        # one more than expected for a while, to catch a duplicate.
        return dead_letters(settings, invalid + 1, timeout_s=3.0, committed_only=True)
    reader = TopicReader(settings, settings.dlq_topic)
    try:
        messages = reader.read_to_end(settings, settings.dlq_topic)
    finally:
        reader.close()
    return [DeadLetter.from_record(m.key(), m.value(), headers_of(m)) for m in messages]


def _stored(
    machines: Sequence[Settings], users: set[str]
) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """Every stored session (expired ones too), as window and consumed hashes; and what is
    wrong with the stores themselves (consumed items without a session, differing copies)."""
    sessions: dict[str, tuple[list[str], list[int]]] = {}
    problems: list[str] = []
    for settings in machines:
        partitions = topic_partitions(settings, settings.events_topic)
        for p in partitions:
            if not shard_dir(settings.state_dir, p).exists():
                continue
            with SessionStore.open(settings.state_dir, p, len(partitions), settings) as store:
                stored = set(store.user_ids())
                for user in stored:
                    session = store.get(user, now_ms=-(2**62))
                    assert session is not None
                    found = (list(session.item_ids), [int(h) for h in store.consumed(user)])
                    if sessions.setdefault(user, found) != found:
                        problems.append(f"session {user}: two copies differ: {found}")
                problems += [
                    f"consumed items of {user} without a session in shard {p}"
                    for user in sorted(users - stored)
                    if len(store.consumed(user))
                ]
    return sessions, problems


def verdict(played: Played, settings: Settings) -> list[str]:
    """Every way the run differs from the oracle fed the same log; empty when it matches."""
    schedule = played.schedule
    oracle = Oracle(schedule.contract(schedule.settings(settings)))
    expected: dict[str, Expected] = {}
    invalid: set[tuple[int, int]] = set()
    for partition, offset, record in played.log:
        if record.event is not None:
            e = record.event
            expected[e.event_id] = oracle.interaction(
                partition, offset, e.event_id, e.user_id, e.item_id, e.type, e.ts
            )
        elif record.kind == "forget":
            oracle.forget(partition, offset, record.user)
        else:
            invalid.add((partition, offset))
            oracle.invalid(partition, offset)
    found: list[str] = [f"flow: {problem}" for problem in played.problems]
    found += _answer_divergences(played, expected, oracle)
    events_topic = schedule.settings(settings).events_topic
    found += [
        f"dead letter from {d.topic!r}: {d.code}" for d in played.letters if d.topic != events_topic
    ]
    letters = Counter((d.partition, d.offset) for d in played.letters if d.topic == events_topic)
    found += [f"lost dead letter: record {p}@{o}" for p, o in sorted(invalid - letters.keys())]
    found += [
        f"dead letter for a valid record {p}@{o}" for p, o in sorted(letters.keys() - invalid)
    ]
    if schedule.exactly_once:
        found += [
            f"dead letter {p}@{o} written {n} times" for (p, o), n in letters.items() if n > 1
        ]
    found += _session_divergences(played, oracle)
    return found


def _answer_divergences(played: Played, expected: dict[str, Expected], oracle: Oracle) -> list[str]:
    found: list[str] = []
    for event_id in sorted(expected.keys() - played.answers.keys(), key=_numeric):
        found.append(f"lost: {event_id} has no answer")
    for event_id in sorted(played.answers.keys() - expected.keys()):
        found.append(f"unexpected answer for {event_id!r}")
    for event_id, answers in sorted(played.answers.items(), key=lambda a: _numeric(a[0])):
        want = expected.get(event_id)
        if want is None:
            continue
        if played.schedule.exactly_once and len(answers) > 1:
            found.append(f"duplicated: {event_id} answered {len(answers)} times")
        user = oracle.by_event[event_id].user
        if answers[0].user_id != user:
            found.append(f"{event_id}: answered for {answers[0].user_id}, not {user}")
        seen = set(want.session) | set(want.consumed)
        bad = [i.item_id for i in answers[0].items if i.item_id in seen]
        if bad:
            found.append(
                f"{event_id} ({user}): first answer (of {len(answers)}, from run "
                f"{played.run_of(answers[0])}) recommends {bad}, which the user had "
                f"(window {list(want.session)}, consumed {list(want.consumed)})"
            )
    return found


def _session_divergences(played: Played, oracle: Oracle) -> list[str]:
    found: list[str] = []
    final = oracle.sessions()
    users = {r.user for _, _, r in played.log} | played.sessions.keys()
    for user in sorted(users):
        stored = played.sessions.get(user)
        want = final.get(user)
        if want is None:
            if stored is not None:
                found.append(
                    f"session {user}: erased by the log, but stored with window {stored[0]}"
                )
            continue
        want_hashes = [item_hash(i) for i in want.consumed]
        if stored is None:
            if not oracle.may_have_expired(user):
                found.append(
                    f"session {user}: missing, expected window {list(want.session)}, "
                    f"consumed {list(want.consumed)}"
                )
            continue
        window, consumed = stored
        if window != list(want.session):
            found.append(f"session {user}: window {window}, expected {list(want.session)}")
        if consumed != want_hashes:
            names = {
                item_hash(i): i for _, _, r in played.log if r.event for i in [r.event.item_id]
            }
            found.append(
                f"session {user}: consumed {[names.get(h, h) for h in consumed]}, "
                f"expected {list(want.consumed)}"
            )
    return found + played.state_problems


def _numeric(event_id: str) -> tuple[str, int]:
    head = event_id.rstrip("0123456789")
    tail = event_id[len(head) :]
    return head, int(tail) if tail else -1


def summary(played: Played, divergences: list[str]) -> str:
    """One line: what the schedule was and how much of it was compared."""
    schedule = played.schedule
    answers = sum(len(a) for a in played.answers.values())
    kinds = Counter(r.kind for _, _, r in played.log)
    return (
        f"seed {schedule.seed}: {kinds['event'] - len(played.sentinels)} events "
        f"(+{len(played.sentinels)} at the end), {kinds['forget']} forgets, "
        f"{kinds['invalid']} invalid; {sum(s.action in ('start',) for s in schedule.plan)} "
        f"starts, {sum(s.action == 'rival' for s in schedule.plan)} takeovers "
        f"({played.stopped_by_themselves} superseded stopped by themselves), "
        f"{played.restarted} restarts after exit 69; "
        f"{answers} answers to {len(played.answers)} events, "
        f"{len(played.letters)} dead letters, {len(played.sessions)} sessions stored; "
        f"{played.seconds:.1f} s; {len(divergences)} divergences"
    )


def report(played: Played, divergences: list[str], env_hint: str) -> str:
    """The seed, the schedule (faults and records, compact) and the first divergences."""
    schedule = played.schedule
    lines = [
        f"{schedule.describe()}",
        f"{len(divergences)} divergences from the oracle; play it alone with {env_hint}",
        "(runs are numbered by the plan's starts)",
        *(f"  {d}" for d in divergences[:DIVERGENCES_SHOWN]),
    ]
    if len(divergences) > DIVERGENCES_SHOWN:
        lines.append(f"  ... and {len(divergences) - DIVERGENCES_SHOWN} more")
    lines.append("log (partition@offset record), in offset order:")
    lines += [f"  {p}@{o} {r.describe(schedule.base_ms)}" for p, o, r in played.log]
    return "\n".join(lines)
