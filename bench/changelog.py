"""`streamrec bench changelog`: the bytes the sessions' changelog costs per event, by record kind.

A slice of a dataset (``--data``, in time order) goes through a session store
in micro-batches of ``--batch`` events, committed as the flow commits them, with
the replay floor ``--replay-lag`` events behind (while a crash may still read an
event again, its user's session keeps the interactions its answer needs: the
replay tail); every commit's changelog records are kept.  Then, for each
``--compression`` codec, those commits go through the real ``ChangelogWriter``
(the flow's changelog producer, with that codec) at ``--rate`` events per
second into a changelog topic of its own, and each codec gets:

* the key and value bytes handed to the producer per event, by record kind
  (``streamrec.state.changelog.record_kind``), before compression;
* the bytes the broker stored per event: the partition's log segments, before
  any compaction (read from the local broker's files; unknown for another broker);
* the process's CPU time per event while producing: the codec's own cost is the
  difference to ``none``;
* the median time to rebuild the shard from that topic (``--repeats``), whose
  session and consumed-items records are checked equal to the store's.

>>> per_event(1_000, 400)
2.5
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, NamedTuple, cast

import click
import orjson
from tqdm import tqdm

from streamrec.bench.services import ensure_broker
from streamrec.contracts import Event
from streamrec.datasets import load_events
from streamrec.settings import Settings
from streamrec.state.changelog import ChangelogWriter, open_shard
from streamrec.state.keys import CONSUMED_PREFIX, SESSION_PREFIX
from streamrec.state.layout import shard_dir
from streamrec.state.rocks import open_read_only
from streamrec.state.store import SessionStore
from streamrec.tools.kafka_local import LocalKafka
from streamrec.topics import create_topics, delete_topics, wanted_topics

CODECS: Final = ("none", "lz4", "zstd")
# The marks name the events topic's id; the benchmark has no events topic, only this name.
EVENTS_TOPIC_ID: Final = "bench-changelog"
FLUSH_TIMEOUT_S: Final = 60.0


class Commit(NamedTuple):
    """One commit of the store: its changelog records, its progress, the events it applied."""

    changes: list[tuple[bytes, bytes | None]]
    applied: int | None
    events: int


class CommitRecorder:
    """A store's change listener that keeps every commit, to be sent later."""

    def __init__(self) -> None:
        self.commits: list[Commit] = []

    def send(
        self, partition: int, changes: Iterable[tuple[bytes, bytes | None]], applied: int | None
    ) -> None:
        self.commits.append(Commit(list(changes), applied, 0))


@dataclass(frozen=True, slots=True)
class CodecFigures:
    """What the changelog cost with one compression codec."""

    compression: str
    # Key and value bytes handed to the producer per event, by record kind and "all".
    produced_bytes_per_event: dict[str, float]
    produced_records: dict[str, int]
    # The partition's log segments on the broker, per event; None: not readable here.
    stored_bytes_per_event: float | None
    cpu_us_per_event: float
    send_s: float
    restore_s: list[float]
    restore_median_s: float


@dataclass(frozen=True, slots=True)
class ChangelogBenchResult:
    """The figures of one run of the changelog benchmark."""

    data: str
    events: int
    batch: int
    replay_lag: int
    rate: float
    commits: int
    sessions: int
    consumed_records: int
    codecs: list[CodecFigures] = field(default_factory=list)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)


def per_event(total: float, events: int) -> float:
    """``total`` per event, rounded for a table."""
    return round(total / max(events, 1), 2)


def record_commits(
    events: list[Event],
    settings: Settings,
    state_dir: Path,
    batch: int,
    replay_lag: int,
    progress: bool = False,
) -> list[Commit]:
    """Apply ``events`` (offsets 0, 1, ...) to shard 0 in ``state_dir``, committing every
    ``batch``; each commit's changelog records, as the flow's store would send them."""
    recorder = CommitRecorder()
    with SessionStore.open(state_dir, 0, 1, settings) as store:
        store.changes = recorder
        starts = range(0, len(events), batch)
        for start in tqdm(starts, desc="applying", unit="batch", disable=not progress):
            if replay_lag:
                store.replay_floor = max(start - replay_lag, 0)
            chunk = events[start : start + batch]
            for offset, event in enumerate(chunk, start):
                store.stage(event, 0, offset)
            sent = len(recorder.commits)
            store.commit()
            if len(recorder.commits) > sent:
                recorder.commits[-1] = recorder.commits[-1]._replace(events=len(chunk))
    return recorder.commits


def user_records(state_dir: Path) -> dict[bytes, bytes]:
    """Every session and consumed-items record of shard 0 in ``state_dir``, by RocksDB key."""
    db = open_read_only(shard_dir(state_dir, 0))
    try:
        found: dict[bytes, bytes] = {}
        for prefix in (SESSION_PREFIX, CONSUMED_PREFIX):
            for key, value in db.items(from_key=prefix):
                key, value = cast(bytes, key), cast(bytes, value)
                if not key.startswith(prefix):
                    break
                found[key] = value
        return found
    finally:
        db.close()


def segment_bytes(log_dir: Path, topic: str, partition: int) -> int:
    """The bytes of a partition's log segments in a broker's log directory."""
    return sum(f.stat().st_size for f in (log_dir / f"{topic}-{partition}").glob("*.log"))


def send_commits(
    writer: ChangelogWriter, commits: list[Commit], rate: float, progress: bool = False
) -> tuple[float, float]:
    """Send ``commits`` to changelog partition 0 at ``rate`` events/s (0: at once) and wait
    for every record; the process's CPU seconds and the wall seconds it took."""
    cpu_started, started = time.process_time(), time.perf_counter()
    sent = 0
    for commit in tqdm(commits, desc="sending", unit="commit", disable=not progress):
        if rate:
            wait = started + sent / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        writer.send(0, commit.changes, commit.applied)
        sent += commit.events
    if writer.flush(FLUSH_TIMEOUT_S):
        raise click.ClickException(
            f"the changelog records were not all delivered in {FLUSH_TIMEOUT_S:g} s"
        )
    return time.process_time() - cpu_started, time.perf_counter() - started


def time_restores(
    settings: Settings, writer: ChangelogWriter, repeats: int, expected: dict[bytes, bytes]
) -> list[float]:
    """Seconds to rebuild shard 0 from the changelog into an empty directory, each time
    checked to hold exactly the ``expected`` session and consumed-items records."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="streamrec-bench-changelog-") as scratch:
            fresh = settings.replace(state_dir=Path(scratch))
            started = time.perf_counter()
            store, _marks, rebuilt = open_shard(fresh, 0, 1, writer, EVENTS_TOPIC_ID)
            times.append(time.perf_counter() - started)
            store.close()
            restored = user_records(Path(scratch))
        if not rebuilt or restored != expected:
            keys = expected.keys() | restored.keys()
            differ = sorted(k for k in keys if expected.get(k) != restored.get(k))
            raise click.ClickException(
                f"the shard rebuilt from {settings.sessions_changelog!r} differs from the store "
                f"in {len(differ)} records (first: {differ[:3]})"
            )
    return times


def measure_codec(
    settings: Settings,
    commits: list[Commit],
    events: int,
    rate: float,
    repeats: int,
    expected: dict[bytes, bytes],
    log_dir: Path | None,
    progress: bool = False,
) -> CodecFigures:
    """Send ``commits`` through a changelog writer compressing with the settings' codec into
    the settings' (new) changelog topic, then rebuild the shard from it ``repeats`` times."""
    writer = ChangelogWriter(settings, EVENTS_TOPIC_ID)
    writer.claim(0, None)
    cpu_s, send_s = send_commits(writer, commits, rate, progress)
    stored = None if log_dir is None else segment_bytes(log_dir, settings.sessions_changelog, 0)
    times = time_restores(settings, writer, repeats, expected)
    produced = dict(writer.produced_bytes)
    return CodecFigures(
        compression=settings.changelog_compression,
        produced_bytes_per_event={
            kind: per_event(total, events)
            for kind, total in sorted({**produced, "all": sum(produced.values())}.items())
        },
        produced_records=dict(sorted(writer.produced_records.items())),
        stored_bytes_per_event=None if stored is None else per_event(stored, events),
        cpu_us_per_event=per_event(cpu_s * 1e6, events),
        send_s=round(send_s, 2),
        restore_s=[round(t, 3) for t in times],
        restore_median_s=round(statistics.median(times), 3),
    )


def run_changelog_bench(
    settings: Settings,
    events: list[Event],
    data: str,
    batch: int,
    replay_lag: int,
    codecs: Iterable[str],
    rate: float,
    repeats: int,
    log_dir: Path | None,
    progress: bool = False,
) -> ChangelogBenchResult:
    """Record the commits of ``events`` once, then measure each codec on a topic of its own.

    The caller's broker must answer at ``settings.brokers``; the topics made here are
    deleted before this returns.
    """
    suffix = uuid.uuid4().hex[:8]
    base = settings.replace(
        events_topic=f"bench-changelog-{suffix}",
        recommendations_topic=f"bench-changelog-recs-{suffix}",
        dlq_topic=f"bench-changelog-dlq-{suffix}",
        events_partitions=1,
    )
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-changelog-") as scratch:
        commits = record_commits(events, base, Path(scratch), batch, replay_lag, progress)
        expected = user_records(Path(scratch))
    made: list[Settings] = []
    figures = []
    try:
        for codec in codecs:
            one = base.replace(
                changelog_topic=f"bench-changelog-{suffix}-{codec}", changelog_compression=codec
            )
            made.append(one)
            create_topics(one, partitions=1)
            figures.append(
                measure_codec(one, commits, len(events), rate, repeats, expected, log_dir, progress)
            )
    finally:
        for one in made:
            delete_topics(one, list(wanted_topics(one, 1)))
    return ChangelogBenchResult(
        data=data,
        events=len(events),
        batch=batch,
        replay_lag=replay_lag,
        rate=rate,
        commits=len(commits),
        sessions=sum(key.startswith(SESSION_PREFIX) for key in expected),
        consumed_records=sum(key.startswith(CONSUMED_PREFIX) for key in expected),
        codecs=figures,
    )


def local_log_dir(settings: Settings) -> Path | None:
    """The log directory of the broker at ``settings.brokers`` if it is the local one."""
    local = LocalKafka(settings, log=lambda _: None)
    status = local.status()
    return local.data_dir if status.running and status.bootstrap == settings.brokers else None


def report_lines(result: ChangelogBenchResult) -> Iterator[str]:
    """The figures as a few lines of text, one per codec."""
    yield (
        f"{result.events:,} events of {result.data} in {result.commits:,} commits (batches of "
        f"{result.batch}, replay floor {result.replay_lag:,} events behind): "
        f"{result.sessions:,} sessions, {result.consumed_records:,} consumed-items records"
    )
    none = next((c for c in result.codecs if c.compression == "none"), None)
    for codec in result.codecs:
        kinds = ", ".join(
            f"{kind} {value:,.0f}"
            for kind, value in codec.produced_bytes_per_event.items()
            if kind != "all"
        )
        stored = (
            "unknown (not the local broker)"
            if codec.stored_bytes_per_event is None
            else f"{codec.stored_bytes_per_event:,.0f}"
        )
        extra = (
            ""
            if none is None or codec is none
            else f" ({codec.cpu_us_per_event - none.cpu_us_per_event:+.1f} vs none)"
        )
        yield (
            f"{codec.compression}: produced {codec.produced_bytes_per_event['all']:,.0f} B/event "
            f"({kinds}); broker stored {stored} B/event; CPU {codec.cpu_us_per_event} us/event"
            f"{extra}; restore median {codec.restore_median_s} s of {codec.restore_s}"
        )


@click.command("changelog")
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Dataset whose events are replayed, in time order [default: STREAMREC_DATA_DIR].",
)
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="Events of the dataset replayed (its first, in time order).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Events per commit. 1: every event its own micro-batch, as when the flow keeps up "
    "(the most bytes per event); a busy flow commits up to STREAMREC_BATCH_MAX_EVENTS.",
)
@click.option(
    "--replay-lag",
    type=click.IntRange(min=0),
    default=4_000,
    show_default=True,
    help="How many events behind the replay floor stays (the flow's is about two epochs: "
    "4,000 events at 2,000 ev/s); sessions keep a replay tail that far back. 0: no tail.",
)
@click.option(
    "--compression",
    "codecs",
    default=",".join(CODECS),
    show_default=True,
    help="Codecs compared, comma separated (none, gzip, snappy, lz4, zstd).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=2_000.0,
    show_default=True,
    help="Events per second the commits are sent at (0: as fast as possible); batches of "
    "records, and so what compression sees, form as they would at that rate.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Rebuilds of the shard timed per codec; the median is reported.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the figures here."
)
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def bench_changelog_command(
    data: Path | None,
    events: int,
    batch: int,
    replay_lag: int,
    codecs: str,
    rate: float,
    repeats: int,
    json_path: Path | None,
    progress: bool,
) -> None:
    """Bytes per event the sessions' changelog costs, by record kind and compression codec.

    Replays the first --events events of a dataset through a session store in
    micro-batches of --batch, then sends the store's changelog records through
    the flow's changelog producer once per codec, at --rate events per second,
    and reports per codec: bytes handed to the producer per event (by kind:
    session, consumed, marks, tombstone), bytes the broker stored per event, the
    process's CPU per event, and the median time to rebuild the shard from the
    topic (checked equal to the store).  Uses the broker at STREAMREC_BROKERS
    (starting the local one if nothing answers), on topics of its own that it
    deletes afterwards.
    """
    settings = Settings.from_env()
    path = settings.data_dir if data is None else data
    wanted = [c.strip() for c in codecs.split(",") if c.strip()]
    if not wanted:
        raise click.BadParameter("name at least one codec", param_hint="--compression")
    dataset = load_events(path)[:events]
    broker = ensure_broker(settings, lambda line: click.echo(line, err=True))
    try:
        result = run_changelog_bench(
            settings,
            dataset,
            str(path),
            batch,
            replay_lag,
            wanted,
            rate,
            repeats,
            local_log_dir(settings),
            progress,
        )
    finally:
        broker.stop()
    for line in report_lines(result):
        click.echo(line)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(result.to_json())
        click.echo(f"figures written to {json_path}")
