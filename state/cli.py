"""The command line of session state: ``streamrec state show|dump|stats|reset``.

``state_group`` is mounted by ``streamrec.cli``; the work itself lives in
``streamrec.state.view`` (the benchmark, ``streamrec bench state``, in ``bench/state.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import click
import orjson
from tqdm import tqdm

from streamrec.settings import Settings
from streamrec.state.errors import StateError
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import ShardStats
from streamrec.state.session import EVENT_TYPES
from streamrec.state.view import (
    DamagedShard,
    FoundSession,
    StateView,
    UnreadableRecord,
    open_state_view,
)

# A damaged store can hold many unreadable records: name this many, count them all.
UNREADABLE_NAMED: Final = 20

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="State directory of the flow (default: STREAMREC_STATE_DIR, else run/state).",
)


@click.group("state")
def state_group() -> None:
    """Look into the per-user session state: one RocksDB per shard.

    Shard i holds the users of partition i of the events topic.  `show`, `dump`
    and `stats` open the shard DBs read-only, so they work while the flow runs
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
    """Delete the session state, the recovery store and the changelog: start afresh.

    For state that no longer fits its events topic (deleted and recreated, or
    recreated with another partition count).  Stop the flow first.  The
    changelog topic is recreated empty, with the events topic's partition count
    (STREAMREC_CHANGELOG=false leaves it alone).  The next run reads the events
    topic from its start and rebuilds the sessions.
    """
    from streamrec.kafka_clients import KafkaUnavailable, topic_partitions
    from streamrec.topics import TopicError, create_topics, delete_topics

    settings = Settings.from_env(state_dir=state_dir, recovery_dir=recovery_dir)
    targets = [str(d) for d in (settings.state_dir, settings.recovery_dir) if d.exists()]
    if settings.changelog:
        targets.append(f"every record of topic {settings.sessions_changelog!r}")
    if not yes:
        click.confirm(f"delete {' and '.join(targets)}?", abort=True)
    for directory in (settings.state_dir, settings.recovery_dir):
        if directory.exists():
            shutil.rmtree(directory)
            click.echo(f"deleted {directory}")
    if settings.changelog:
        try:
            partitions = len(topic_partitions(settings, settings.events_topic))
            # Deleting waits until the topic is gone; creating makes what is missing.
            delete_topics(settings, [settings.sessions_changelog])
            create_topics(settings, partitions)
        except (KafkaUnavailable, TopicError) as err:
            raise click.ClickException(
                f"the changelog {settings.sessions_changelog!r} was not cleared ({err}); run "
                "this again once Kafka answers, or the flow would rebuild the old sessions"
            ) from None
        click.echo(f"recreated {settings.sessions_changelog}, empty, {partitions} partition(s)")


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


@state_group.command("dump")
@state_dir_option
@click.option(
    "--include-expired",
    is_flag=True,
    help='Print expired sessions too (with "expired": true).',
)
@click.option(
    "--partition",
    "partitions",
    type=click.IntRange(min=0),
    multiple=True,
    metavar="P",
    help="Dump only the shard of events partition P (repeatable; default: every shard).",
)
@click.option(
    "--now-ms",
    type=int,
    default=None,
    help="Judge expiry at this event time, epoch ms (default: each shard's own clock, as the "
    "flow does).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    help="Show a progress bar on stderr (only while stderr is a terminal and stdout is not).",
)
def dump(
    state_dir: Path | None,
    include_expired: bool,
    partitions: tuple[int, ...],
    now_ms: int | None,
    progress: bool,
) -> None:
    """Print every session as JSON Lines: one JSON object per line on stdout.

    Each object: user_id; partition (the shard, which is the events partition);
    offset (the source offset of the last event applied); items (the item ids of
    the session's window, oldest first: the scorer's input, without the replay
    tail); first_seen_ms and last_seen_ms; counts by event type; expired.  Shard
    by shard, in key order.  Sessions expired by their shard's clock are left
    out unless --include-expired.

    Reads the shard DBs read-only, so it works while the flow runs (it sees the
    state as of the moment it starts; with the changelog on and so no RocksDB
    log, as of each shard's last memtable flush), and streams: memory stays flat however
    many sessions there are.  Only sessions go to stdout; the progress bar, notes
    and a summary go to stderr.  A record that cannot be read is skipped, named
    on stderr and counted in the summary.  Exits with status 1 only if a shard DB
    is damaged (RocksDB cannot read it to its end), after printing all it could.

    \b
    streamrec state dump --partition 3 > sessions.jsonl
    streamrec state dump | jq -c 'select(.counts.purchase > 0)'
    """
    settings = Settings.from_env(state_dir=state_dir)
    with _state_errors(), open_state_view(settings.state_dir, settings) as view:
        shards = _dumped_shards(view, partitions)
        report = _write_dump(view, shards, include_expired, now_ms, progress)
    if report.reader_gone:
        return  # e.g. `| head`: the reader has what it wanted
    summary = (
        f"dumped {report.printed:,} sessions from {_many(len(shards), 'shard DB')} of "
        f"{settings.state_dir}"
    )
    if report.expired_left_out:
        summary += f"; {report.expired_left_out:,} expired left out (--include-expired prints them)"
    if report.unreadable:
        named = "named above" if report.unreadable <= UNREADABLE_NAMED else "the first named above"
        summary += (
            f"; skipped {_many(report.unreadable, 'unreadable record')} ({named}: the flow "
            "sets each aside under q: when it next reads it)"
        )
    click.echo(summary, err=True)
    if report.damaged:
        raise click.ClickException(
            "; ".join(_damage(settings.state_dir, d) for d in report.damaged)
            + ". The sessions before the damage were printed. Restore the shard DB from a "
            "backup, or stop the flow, move it away and let the flow rebuild its sessions from "
            "the events."
        )


@state_group.command("stats")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(state_dir: Path | None, as_json: bool) -> None:
    """Print keys, expired sessions, quarantined records and bytes per shard DB.

    Keys are sessions, one per user; expired ones await the sweep.  Quarantined
    records are session records the flow could not read, set aside under q: for
    inspection (their users started afresh).  Record bytes are the keys and
    encoded sessions; disk bytes are the DB's files (tables, write-ahead log,
    manifest).  Counting is a full scan.
    """
    settings = Settings.from_env(state_dir=state_dir)
    with _state_errors(), open_state_view(settings.state_dir, settings) as view:
        shards = view.stats()
        quarantined = view.quarantined()
        layout = view.layout
        clock_ms = view.clock_ms
        missing = view.missing_shards
    if as_json:
        document = {
            "state_dir": str(settings.state_dir),
            "format_version": layout.format_version,
            "shard_count": layout.shard_count,
            "clock_ms": clock_ms,
            "shards": [_shard_doc(s, quarantined.get(s.shard_index, 0)) for s in shards],
            "total": _shard_doc(_total(shards), sum(quarantined.values())),
        }
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"state directory {settings.state_dir}: {layout.describe()}")
    click.echo(f"latest event applied: {_when(clock_ms) if clock_ms is not None else 'none'}")
    click.echo(
        f"{'shard':>8} {'keys':>12} {'expired':>10} {'quarantined':>12} {'record bytes':>15} "
        f"{'disk bytes':>15}"
    )
    for s in [*shards, _total(shards)]:
        if s.shard_index < 0:
            name, held_aside = "total", sum(quarantined.values())
        else:
            name, held_aside = str(s.shard_index), quarantined.get(s.shard_index, 0)
        click.echo(
            f"{name:>8} {s.sessions:>12,} {s.expired:>10,} {held_aside:>12,} "
            f"{s.record_bytes:>15,} {s.disk_bytes:>15,}"
        )
    if missing:
        click.echo(
            "shards without a DB yet (no event of their partition processed): "
            f"{', '.join(map(str, missing))}"
        )


@dataclass(slots=True)
class _DumpReport:
    printed: int = 0
    expired_left_out: int = 0
    unreadable: int = 0
    damaged: list[DamagedShard] = field(default_factory=list)
    reader_gone: bool = False


def _dumped_shards(view: StateView, partitions: tuple[int, ...]) -> list[int]:
    """The shards to dump, ascending: those asked for (checked against the layout), or all."""
    count = view.layout.shard_count
    beyond = sorted({p for p in partitions if p >= count})
    if beyond:
        raise click.BadParameter(
            f"{', '.join(map(str, beyond))}: this state has {_many(count, 'shard')}, one per "
            f"partition of the events topic (0 to {count - 1})",
            param_hint="--partition",
        )
    chosen = sorted(set(partitions)) if partitions else list(range(count))
    absent = [p for p in chosen if p in view.missing_shards]
    if absent:
        click.echo(
            f"no shard DB yet for partition {', '.join(map(str, absent))} (no event of it "
            "processed): nothing to dump there",
            err=True,
        )
    return [p for p in chosen if p not in absent]


def _write_dump(
    view: StateView, shards: list[int], include_expired: bool, now_ms: int | None, progress: bool
) -> _DumpReport:
    """Write the sessions of ``shards`` to stdout, one JSON line each, as the scan yields them."""
    report = _DumpReport()
    out = sys.stdout.buffer
    bar = tqdm(
        total=view.estimated_keys(shards) or None,  # an estimate: ETA, not an exact count
        desc="dump",
        unit=" sessions",
        file=sys.stderr,
        leave=False,
        disable=not (progress and sys.stderr.isatty() and not sys.stdout.isatty()),
    )
    # The scan holds a RocksDB cursor: close it before the view closes its DBs.
    with bar, closing(view.scan(shards, now_ms)) as records:
        try:
            for record in records:
                if isinstance(record, FoundSession):
                    bar.update()
                    if record.expired and not include_expired:
                        report.expired_left_out += 1
                        continue
                    out.write(orjson.dumps(_dump_doc(record), option=orjson.OPT_APPEND_NEWLINE))
                    report.printed += 1
                elif isinstance(record, UnreadableRecord):
                    bar.update()
                    report.unreadable += 1
                    if report.unreadable <= UNREADABLE_NAMED:
                        bar.write(
                            f"skipped the record of user {record.user_key!r} in shard "
                            f"{record.shard_index}: {record.reason}",
                            file=sys.stderr,
                        )
                else:
                    report.damaged.append(record)  # said once, at the end, with what to do
            out.flush()
        except BrokenPipeError:
            report.reader_gone = True
            _silence_stdout()
        except OSError as err:
            raise click.ClickException(
                f"stdout refused the dump after {report.printed:,} sessions: {err.strerror}"
            ) from None
    return report


def _dump_doc(found: FoundSession) -> dict[str, Any]:
    """One line of `dump`; a field that `show` also prints has the same name there."""
    session = found.session
    return {
        "user_id": session.user_id,
        "partition": found.shard_index,
        # A session loaded without events (never by the flow) has no last offset.
        "offset": session.last_offset if len(session) else None,
        "items": session.item_ids,
        "first_seen_ms": session.first_seen_ms,
        "last_seen_ms": session.last_seen_ms,
        "counts": dict(zip(EVENT_TYPES, session.counts, strict=True)),
        "expired": found.expired,
    }


def _damage(state_dir: Path, damaged: DamagedShard) -> str:
    where = (
        "before its first session"
        if damaged.after_user_key is None
        else f"after the session of user {damaged.after_user_key!r}"
    )
    return (
        f"shard DB {shard_dir(state_dir, damaged.shard_index)} is damaged: its scan stopped "
        f"{where} ({damaged.reason})"
    )


def _silence_stdout() -> None:
    # The reader closed the pipe: point stdout at /dev/null, so that flushing it at exit
    # cannot raise BrokenPipeError again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # not a real file (a test runner's buffer): nothing will flush it


def _many(n: int, thing: str) -> str:
    return f"{n:,} {thing}" if n == 1 else f"{n:,} {thing}s"


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


def _shard_doc(s: ShardStats, quarantined: int) -> dict[str, int | None]:
    return {
        "shard": None if s.shard_index < 0 else s.shard_index,
        "keys": s.sessions,
        "expired": s.expired,
        "quarantined": quarantined,
        "record_bytes": s.record_bytes,
        "disk_bytes": s.disk_bytes,
        "clock_ms": s.clock_ms,
    }
