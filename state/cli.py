"""The command line of session state: ``streamrec state show|stats|reset``, ``bench state``.

``state_group`` and ``bench_state`` are mounted by ``streamrec.cli``; the work
itself lives in ``state.view`` and ``state.bench``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click
import orjson

from state.bench import run_state_bench
from state.errors import StateError
from state.rocks import ShardStats
from state.view import open_state_view
from streamrec.settings import Settings

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="State directory of the flow (default: STREAMREC_STATE_DIR, else run/state).",
)


@click.group("state")
def state_group() -> None:
    """Look into the per-user session state: one RocksDB per shard.

    Shard i holds the users of partition i of the events topic.  `show` and
    `stats` open the shard DBs read-only, so they work while the flow runs
    (they see the state as of the moment they start).
    """


@state_group.command("reset")
@state_dir_option
@click.option(
    "--recovery-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Bytewax recovery store of the flow (default: STREAMREC_RECOVERY_DIR, else run/recovery).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset(state_dir: Path | None, recovery_dir: Path | None, yes: bool) -> None:
    """Delete the session state and the recovery store: the next run starts afresh.

    For state that no longer fits its events topic (deleted and recreated, or
    recreated with another partition count).  Stop the flow first.  The next
    run reads the events topic from its start and rebuilds the sessions.
    """
    settings = Settings.from_env(state_dir=state_dir, recovery_dir=recovery_dir)
    targets = [d for d in (settings.state_dir, settings.recovery_dir) if d.exists()]
    if not targets:
        click.echo("nothing to reset: neither directory exists")
        return
    if not yes:
        click.confirm(f"delete {' and '.join(map(str, targets))}?", abort=True)
    for directory in targets:
        shutil.rmtree(directory)
        click.echo(f"deleted {directory}")


@state_group.command("show")
@click.argument("user_id")
@state_dir_option
@click.option(
    "--now-ms",
    type=int,
    default=None,
    help="Judge expiry at this event time, epoch ms (default: the latest event time applied).",
)
@click.option("--include-expired", is_flag=True, help="Print the session even if it expired.")
def show(user_id: str, state_dir: Path | None, now_ms: int | None, include_expired: bool) -> None:
    """Print one user's session as JSON.

    USER_ID's last interactions (oldest first), counters by event type, first and
    last event time, and the source partition and offset of the last event applied.
    Exits with status 1 if the user has no session, or only an expired one (which
    the flow treats as absent until the sweep removes it).
    """
    settings = Settings.from_env(state_dir=state_dir)
    with _state_errors(), open_state_view(settings.state_dir, settings) as view:
        found = view.find(user_id, now_ms)
        searched = len(view.shards)
    if found is None:
        raise click.ClickException(
            f"no session for user {user_id!r} in {settings.state_dir} ({searched} shard DBs "
            "searched). Check the user id and --state-dir."
        )
    session = found.session
    if found.expired and not include_expired:
        raise click.ClickException(
            f"the session of user {user_id!r} has expired: its last event was at "
            f"{_when(session.last_seen_ms)}, more than the TTL "
            f"({settings.session_ttl_s:g} s) before the store's latest event. The flow treats it "
            "as absent; --include-expired prints it anyway."
        )
    with _state_errors():
        document = {"shard": found.shard_index, "expired": found.expired, **session.to_dict()}
    click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


@state_group.command("stats")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(state_dir: Path | None, as_json: bool) -> None:
    """Print keys, expired sessions and bytes per shard DB.

    Keys are sessions, one per user; expired ones await the sweep.  Record bytes
    are the keys and encoded sessions; disk bytes are the DB's files (tables,
    write-ahead log, manifest).  Counting is a full scan.
    """
    settings = Settings.from_env(state_dir=state_dir)
    with _state_errors(), open_state_view(settings.state_dir, settings) as view:
        shards = view.stats()
        layout = view.layout
        clock_ms = view.clock_ms
        missing = view.missing_shards
    if as_json:
        document = {
            "state_dir": str(settings.state_dir),
            "format_version": layout.format_version,
            "shard_count": layout.shard_count,
            "clock_ms": clock_ms,
            "shards": [_shard_doc(s) for s in shards],
            "total": _shard_doc(_total(shards)),
        }
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"state directory {settings.state_dir}: {layout.describe()}")
    click.echo(f"latest event applied: {_when(clock_ms) if clock_ms is not None else 'none'}")
    header = f"{'shard':>8} {'keys':>12} {'expired':>10} {'record bytes':>15} {'disk bytes':>15}"
    click.echo(header)
    for s in [*shards, _total(shards)]:
        name = "total" if s.shard_index < 0 else str(s.shard_index)
        click.echo(
            f"{name:>8} {s.sessions:>12,} {s.expired:>10,} {s.record_bytes:>15,} "
            f"{s.disk_bytes:>15,}"
        )
    if missing:
        click.echo(
            "shards without a DB yet (no event of their partition processed): "
            f"{', '.join(map(str, missing))}"
        )


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
        f"session cache of {result.cache_sessions:,} sessions: {result.cache_hit_ratio:.1%} of "
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
    if json_path is not None:
        json_path.write_bytes(result.to_json())
        click.echo(f"figures written to {json_path}")


@contextmanager
def _state_errors() -> Iterator[None]:
    try:
        yield
    except StateError as err:
        raise click.ClickException(str(err)) from None


def _when(ms: int) -> str:
    return f"{datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec='milliseconds')} ({ms})"


def _total(shards: list[ShardStats]) -> ShardStats:
    clocks = [s.clock_ms for s in shards if s.clock_ms is not None]
    return ShardStats(
        shard_index=-1,
        sessions=sum(s.sessions for s in shards),
        expired=sum(s.expired for s in shards),
        record_bytes=sum(s.record_bytes for s in shards),
        disk_bytes=sum(s.disk_bytes for s in shards),
        clock_ms=max(clocks) if clocks else None,
    )


def _shard_doc(s: ShardStats) -> dict[str, int | None]:
    return {
        "shard": None if s.shard_index < 0 else s.shard_index,
        "keys": s.sessions,
        "expired": s.expired,
        "record_bytes": s.record_bytes,
        "disk_bytes": s.disk_bytes,
        "clock_ms": s.clock_ms,
    }
