"""How fast ``SessionStore.apply`` is on a warm on-disk store, and how big a session is.

The store is filled with full sessions (L interactions each) for ``users`` users,
closed and reopened (so the sessions sit in table files, not only in the
memtable), warmed up with one event per user (which also fills the session
cache, as a running flow's would be), and then ``applies`` events of random
users are applied and timed one by one; then as many again staged and committed
in micro-batches, as the flow applies them; then, reopened with the cache off,
``applies`` more one by one: the cost of a session read from RocksDB.  Not a
test: the figures go to BENCHMARKS.md.  The rated and bought items of the timed
events go to their users' consumed-items records (``streamrec.state.consumed``): their
count and bytes are reported too (``STREAMREC_CONSUMED_CAP=0`` turns them off, to
compare the apply cost without them).
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import click
import orjson
from tqdm import tqdm

from streamrec.contracts import Event
from streamrec.settings import Settings
from streamrec.state.keys import CONSUMED_PREFIX
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import disk_bytes
from streamrec.state.session import Session, decode_session
from streamrec.state.store import SessionStore

START_MS: Final = 1_700_000_000_000
PARTITIONS: Final = 4
ITEMS: Final = 50_000
# One user event every 10 ms of event time over the whole population: a live stream.
STEP_MS: Final = 10
TEMPLATES_PER_PARTITION: Final = 250
# Event types as a shop sees them: mostly views.
TYPE_WEIGHTS: Final = {"view": 70, "click": 15, "add_to_cart": 7, "purchase": 3, "rating": 5}


@dataclass(frozen=True, slots=True)
class StateBenchResult:
    """The figures of one run of the state benchmark."""

    users: int
    session_length: int
    applies: int
    apply_us_p50: float
    apply_us_p90: float
    apply_us_p99: float
    apply_us_mean: float
    cpu_us_per_event: float
    item_ids_us_p50: float
    cache_mb: float
    cache_hit_ratio: float
    batch_size: int
    apply_many_us_per_event_p50: float
    uncached_apply_us_p50: float
    uncached_apply_us_p99: float
    rss_mb: float
    bytes_per_session: float
    disk_bytes_per_session: float
    consumed_records: int
    consumed_bytes_per_record: float
    consumed_items_per_record: float
    fill_s: float
    machine: dict[str, Any]

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)


def run_state_bench(
    users: int = 100_000,
    applies: int = 100_000,
    settings: Settings | None = None,
    state_dir: Path | None = None,
    progress: bool = True,
    seed: int = 7,
) -> StateBenchResult:
    """Fill a store with ``users`` full sessions, then time ``applies`` applies on it."""
    settings = Settings() if settings is None else settings
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-state-") as scratch:
        where = Path(scratch) if state_dir is None else state_dir
        return _bench(where, users, applies, settings, progress, random.Random(seed))


def _bench(
    state_dir: Path,
    users: int,
    applies: int,
    settings: Settings,
    progress: bool,
    rng: random.Random,
) -> StateBenchResult:
    length = settings.session_length
    started = time.perf_counter()
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        filling = tqdm(
            full_sessions(users, length, rng),
            total=users,
            desc="filling the store",
            unit="user",
            disable=not progress,
        )
        store.load(filling)
    fill_s = time.perf_counter() - started
    # Reopening replays the write-ahead log into table files: the sessions are on disk now.
    clock = START_MS + length * 1000
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        stats = store.stats()
        on_disk = disk_bytes(shard_dir(state_dir, 0))
        warmup = _one_event_per_user(users, clock, rng, first_offset=1 << 40)
        for event, partition, offset in tqdm(
            warmup, desc="warming up", unit="event", disable=not progress
        ):
            _ = store.apply(event, partition, offset).session.item_ids  # as the flow reads it
        clock += len(warmup) * STEP_MS
        measured = _events(users, applies, clock, rng, first_offset=1 << 41)
        reads_before = store.counters.cache_hits, store.counters.cache_misses
        latencies_ns, item_ids_ns, cpu_ns = _time_applies(store, measured)
        hits = store.counters.cache_hits - reads_before[0]
        misses = store.counters.cache_misses - reads_before[1]
        clock += len(measured) * STEP_MS
        batch_size = settings.batch_max_events
        batched = _events(users, applies, clock, rng, first_offset=1 << 42)
        clock += len(batched) * STEP_MS
        per_event_ns = []
        for lo in range(0, len(batched), batch_size):
            batch = batched[lo : lo + batch_size]
            t0 = time.perf_counter_ns()
            for event, partition, offset in batch:
                store.stage(event, partition, offset)
            store.commit()
            per_event_ns.append((time.perf_counter_ns() - t0) / len(batch))
        _check_all_new(store)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        consumed_records, consumed_bytes, consumed_items = _consumed_sizes(store)
    with SessionStore.open(state_dir, 0, 1, settings.replace(session_cache_mb=0)) as store:
        uncached = _events(users, applies, clock, rng, first_offset=1 << 43)
        uncached_ns = sorted(_time_applies(store, uncached)[0])
        _check_all_new(store)
    latencies_ns.sort()
    return StateBenchResult(
        users=users,
        session_length=length,
        applies=applies,
        apply_us_p50=_us(_quantile(latencies_ns, 0.50)),
        apply_us_p90=_us(_quantile(latencies_ns, 0.90)),
        apply_us_p99=_us(_quantile(latencies_ns, 0.99)),
        apply_us_mean=_us(statistics.fmean(latencies_ns)),
        # This thread's CPU time per event (apply, item_ids and the timers): on a busy
        # machine, the part of the wall time that is work rather than waiting for a core.
        cpu_us_per_event=_us(cpu_ns / applies),
        item_ids_us_p50=_us(statistics.median(item_ids_ns)),
        cache_mb=settings.session_cache_mb,
        cache_hit_ratio=round(hits / max(hits + misses, 1), 3),
        batch_size=batch_size,
        apply_many_us_per_event_p50=_us(statistics.median(per_event_ns)),
        uncached_apply_us_p50=_us(_quantile(uncached_ns, 0.50)),
        uncached_apply_us_p99=_us(_quantile(uncached_ns, 0.99)),
        rss_mb=round(rss_mb, 1),
        bytes_per_session=round(stats.record_bytes / max(stats.sessions, 1), 1),
        disk_bytes_per_session=round(on_disk / max(stats.sessions, 1), 1),
        consumed_records=consumed_records,
        consumed_bytes_per_record=round(consumed_bytes / max(consumed_records, 1), 1),
        consumed_items_per_record=round(consumed_items / max(consumed_records, 1), 2),
        fill_s=round(fill_s, 1),
        machine=_machine(),
    )


def _time_applies(
    store: SessionStore, records: list[tuple[Event, int, int]]
) -> tuple[list[int], list[int], int]:
    """Nanoseconds of each ``apply``, of reading its ``item_ids``, and this thread's CPU time."""
    latencies_ns = [0] * len(records)
    item_ids_ns = [0] * len(records)
    clock_ns = time.perf_counter_ns
    cpu_started = time.thread_time_ns()
    for i, (event, partition, offset) in enumerate(records):
        t0 = clock_ns()
        result = store.apply(event, partition, offset)
        t1 = clock_ns()
        _ = result.session.item_ids  # what the scorer reads next
        latencies_ns[i] = t1 - t0
        item_ids_ns[i] = clock_ns() - t1
    return latencies_ns, item_ids_ns, time.thread_time_ns() - cpu_started


def _consumed_sizes(store: SessionStore) -> tuple[int, int, int]:
    """Consumed-items records, their bytes (key and value) and their items, by a scan."""
    records = size = items = 0
    for user in store.user_ids():
        consumed = store.consumed(user)
        if len(consumed):
            records += 1
            items += len(consumed)
            # The key, an 8-byte header, 8 bytes an item.
            size += len(CONSUMED_PREFIX) + len(user.encode()) + 8 + consumed.nbytes
    return records, size, items


def _check_all_new(store: SessionStore) -> None:
    if store.counters.duplicates or store.counters.restarted:
        raise RuntimeError(f"the benchmark's events must all be new: {store.counters}")


def full_sessions(users: int, length: int, rng: random.Random) -> Iterator[Session]:
    """``users`` sessions of ``length`` interactions each, realistic in size and content."""
    # Records do not hold the user id, so users can share a few hundred built sessions.
    templates = [
        [_full_session(length, partition, rng) for _ in range(TEMPLATES_PER_PARTITION)]
        for partition in range(PARTITIONS)
    ]
    for user in range(users):
        template = rng.choice(templates[user % PARTITIONS])
        yield decode_session(_user_id(user), template.record)


def _full_session(length: int, partition: int, rng: random.Random) -> Session:
    types = list(TYPE_WEIGHTS)
    session = Session.empty("template")
    for n, kind in enumerate(rng.choices(types, list(TYPE_WEIGHTS.values()), k=length)):
        value = float(rng.randint(1, 10)) / 2 if kind == "rating" else None
        event = Event(f"f{n}", "template", _item(rng), kind, START_MS + n * 1000, value)
        session = session.with_event(event, partition, n, length)
    return session


def _events(
    users: int,
    count: int,
    start_ms: int,
    rng: random.Random,
    first_offset: int,
    user_order: list[int] | None = None,
) -> list[tuple[Event, int, int]]:
    """``count`` events of random users (or of ``user_order``'s), each new to its partition."""
    types = list(TYPE_WEIGHTS)
    kinds = rng.choices(types, list(TYPE_WEIGHTS.values()), k=count)
    events = []
    for i, kind in enumerate(kinds):
        user = rng.randrange(users) if user_order is None else user_order[i]
        value = float(rng.randint(1, 10)) / 2 if kind == "rating" else None
        event = Event(f"b{i}", _user_id(user), _item(rng), kind, start_ms + i * STEP_MS, value)
        # Offsets only grow, so every event is new to its user's partition.
        events.append((event, user % PARTITIONS, first_offset + i))
    return events


def _one_event_per_user(
    users: int, start_ms: int, rng: random.Random, first_offset: int
) -> list[tuple[Event, int, int]]:
    order = list(range(users))
    rng.shuffle(order)
    return _events(users, users, start_ms, rng, first_offset, order)


def _user_id(user: int) -> str:
    return f"user-{user}"


def _item(rng: random.Random) -> str:
    # Skewed popularity, as in real catalogues: low ids are drawn far more often.
    return str(int(ITEMS ** rng.random()))


def _quantile(sorted_values: list[int], q: float) -> float:
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def _us(ns: float) -> float:
    return round(ns / 1000, 2)


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "rocksdict": version("rocksdict"),
    }


@click.command("state")
@click.option(
    "--users",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Users in the store, each with a full session.",
)
@click.option(
    "--applies",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Events applied and timed, one by one, after a warm-up.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the figures to this JSON file.",
)
def bench_state(users: int, applies: int, json_path: Path | None) -> None:
    """Time SessionStore.apply on a warm on-disk store.

    Fills a scratch RocksDB (removed afterwards) with --users full sessions of L
    interactions, reopens it, warms it up with one event per user (filling the
    session cache, STREAMREC_SESSION_CACHE sessions), then reports the median and
    tail microseconds per apply: one by one, then staged and committed in
    micro-batches as the flow does, then one by one with the cache off (every
    session read from RocksDB); and the bytes per session.  Quote medians on a
    shared machine.
    """
    result = run_state_bench(users=users, applies=applies, settings=Settings.from_env())
    click.echo(
        f"apply: median {result.apply_us_p50} us, p90 {result.apply_us_p90} us, "
        f"p99 {result.apply_us_p99} us, mean {result.apply_us_mean} us over "
        f"{result.applies:,} events"
    )
    click.echo(
        f"session cache of {result.cache_mb:g} MB: {result.cache_hit_ratio:.1%} of "
        f"the reads above served from memory; peak RSS {result.rss_mb} MB"
    )
    click.echo(
        f"staged and committed in batches of {result.batch_size}: median "
        f"{result.apply_many_us_per_event_p50} us per event"
    )
    click.echo(
        f"apply with the cache off (read from RocksDB): median {result.uncached_apply_us_p50} us, "
        f"p99 {result.uncached_apply_us_p99} us"
    )
    click.echo(
        f"reading item_ids afterwards: median {result.item_ids_us_p50} us; CPU time per event "
        f"(both, and the timers): {result.cpu_us_per_event} us; load average "
        f"{result.machine['load_average_1m']} on {result.machine['cpus']} CPUs"
    )
    click.echo(
        f"session of {result.session_length} interactions: {result.bytes_per_session} bytes "
        f"encoded, {result.disk_bytes_per_session} bytes on disk; {result.users:,} users, "
        f"filled in {result.fill_s} s"
    )
    click.echo(
        f"consumed items (STREAMREC_CONSUMED_TYPES): {result.consumed_records:,} users hold a "
        f"record, {result.consumed_items_per_record} items and "
        f"{result.consumed_bytes_per_record} bytes each on average"
    )
    if json_path is not None:
        json_path.write_bytes(result.to_json())
        click.echo(f"figures written to {json_path}")
