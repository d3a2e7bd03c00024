"""Randomized fault schedules on the real broker, judged by the oracle (issue 19).

Each test plays one schedule drawn from its seed (``tests/fault_broker.py``):
a log of interactions, forgets and invalid records for a few users, produced in
chunks between starts, SIGTERMs, SIGKILLs, frozen flows, a frozen broker, wiped
state and recovery directories and ``--no-recovery`` restarts; then compares
every answer, dead letter and stored session with the oracle fed the same log.

STREAMREC_BROKER_SCHEDULES (default 3, about 25 s each) schedules on one
process, from seed STREAMREC_BROKER_SEED (default 1900) on;
STREAMREC_BROKER_TAKEOVERS (default 1) more per guarantee, with the seeds after
those, in which a second machine takes over while the first is frozen and the
first comes back to its own stale disk (the fault defects 3 and 4 lived in);
STREAMREC_BROKER_CLUSTER_SCHEDULES (default 0; the soak sets it) more on a
two-process Bytewax cluster, with the seeds after those;
STREAMREC_BROKER_RESTARTS=1 (the soak) adds stops and starts of the broker.  A
failure prints its seed, its schedule and the variables that play it alone.
"""

from __future__ import annotations

import os
import time

import pytest

from streamrec.settings import Settings
from streamrec.tools.kafka_local import LocalKafka
from tests.fault_broker import (
    Schedule,
    ScheduleFailed,
    popular_items,
    report,
    run_schedule,
    summary,
    verdict,
)

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("no_flow_left_behind")]

BASE_SEED = int(os.environ.get("STREAMREC_BROKER_SEED", "1900"))
SCHEDULES = int(os.environ.get("STREAMREC_BROKER_SCHEDULES", "3"))
TAKEOVERS = int(os.environ.get("STREAMREC_BROKER_TAKEOVERS", "1"))
TAKEOVER_SEED = BASE_SEED + SCHEDULES
CLUSTER_SEED = TAKEOVER_SEED + TAKEOVERS
CLUSTER_SCHEDULES = int(os.environ.get("STREAMREC_BROKER_CLUSTER_SCHEDULES", "0"))
# Stopping and starting the session's shared broker: the soak's (a broker that does not come
# back fails every later test); the default schedules only freeze it (SIGSTOP) for seconds.
BROKER_RESTARTS = os.environ.get("STREAMREC_BROKER_RESTARTS", "0") == "1"
# Event times six hours in the past: valid, and far from the flow's wall-clock checks.
HOURS_AGO_MS = 6 * 3600 * 1000


def play(
    seed: int,
    processes: int,
    kafka: LocalKafka,
    settings: Settings,
    hint: str,
    exactly_once: bool | None = None,
) -> None:
    base_ms = int(time.time() * 1000) - HOURS_AGO_MS
    items = popular_items(settings.model_dir)
    takeover = exactly_once is not None
    schedule = Schedule.draw(
        seed, base_ms, items, processes, BROKER_RESTARTS, takeover, exactly_once
    )
    if BROKER_RESTARTS:
        hint += " STREAMREC_BROKER_RESTARTS=1"
    try:
        played = run_schedule(schedule, settings, kafka)
    except ScheduleFailed as err:
        pytest.fail(f"{err}\nplay it alone with {hint}", pytrace=False)
    divergences = verdict(played, settings)
    print(summary(played, divergences))
    assert not divergences, report(played, divergences, hint)


@pytest.mark.parametrize("seed", range(BASE_SEED, BASE_SEED + SCHEDULES))
def test_one_process_under_random_faults_matches_the_oracle(
    seed: int, kafka: LocalKafka, kafka_settings: Settings
) -> None:
    hint = f"STREAMREC_BROKER_SEED={seed} STREAMREC_BROKER_SCHEDULES=1 -k one_process"
    play(seed, 1, kafka, kafka_settings, hint)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
@pytest.mark.parametrize("seed", range(TAKEOVER_SEED, TAKEOVER_SEED + TAKEOVERS))
def test_a_machine_taken_over_and_moved_back_matches_the_oracle(
    seed: int, exactly_once: bool, kafka: LocalKafka, kafka_settings: Settings
) -> None:
    guarantee = "exactly" if exactly_once else "least"
    hint = (
        f"STREAMREC_BROKER_SEED={seed} STREAMREC_BROKER_SCHEDULES=0 STREAMREC_BROKER_TAKEOVERS=1"
        f" -k 'taken_over and {guarantee}'"
    )
    play(seed, 1, kafka, kafka_settings, hint, exactly_once)


@pytest.mark.parametrize("seed", range(CLUSTER_SEED, CLUSTER_SEED + CLUSTER_SCHEDULES))
def test_a_two_process_cluster_under_random_faults_matches_the_oracle(
    seed: int, kafka: LocalKafka, kafka_settings: Settings
) -> None:
    hint = (
        f"STREAMREC_BROKER_SEED={seed} STREAMREC_BROKER_SCHEDULES=0 "
        "STREAMREC_BROKER_TAKEOVERS=0 STREAMREC_BROKER_CLUSTER_SCHEDULES=1"
    )
    play(seed, 2, kafka, kafka_settings, hint)
