"""`streamrec bench restore`: how long rebuilding a shard from the changelog takes.

Writes ``--sessions`` full sessions (the records ``bench state`` measures) and
a marks record to a fresh changelog partition, then rebuilds an empty shard
from it ``--repeats`` times, as a process taking a partition on a new machine
does (``streamrec.state.changelog.open_shard``), and reports the median.

>>> per_100k(12.5, 250_000)
5.0
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import click
import orjson
from confluent_kafka import Producer
from tqdm import tqdm

from streamrec.bench.services import ensure_broker
from streamrec.bench.state import full_sessions
from streamrec.kafka_clients import changelog_producer_config, topic_id
from streamrec.settings import Settings
from streamrec.state.changelog import MARKS_KEY, ChangelogWriter, Marks, encode_marks, open_shard
from streamrec.state.session import encode_session
from streamrec.topics import create_topics, delete_topics, wanted_topics


def per_100k(seconds: float, sessions: int) -> float:
    """Seconds per 100,000 sessions."""
    return round(seconds * 100_000 / sessions, 2)


def fill_changelog(settings: Settings, sessions: int, progress: bool) -> int:
    """Write ``sessions`` session records and a marks record to changelog partition 0; bytes."""
    # As the flow's changelog writer sends them: compressed, so a rebuild decompresses.
    producer = Producer(changelog_producer_config(settings))
    topic = settings.sessions_changelog
    written = 0
    rng = random.Random(7)
    made = full_sessions(sessions, settings.session_length, rng)

    def send(key: bytes, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key, partition=0)
                return
            except BufferError:
                producer.poll(0.1)  # the queue is full: let it drain

    for session in tqdm(made, total=sessions, desc="filling the changelog", disable=not progress):
        record = encode_session(session)
        written += len(record)
        send(session.user_id.encode(), record)
    events_id = topic_id(settings, settings.events_topic)
    send(MARKS_KEY, encode_marks(Marks(sessions, events_id)))
    if producer.flush(60):
        raise click.ClickException("the changelog records were not all delivered in 60 s")
    return written


def time_restores(settings: Settings, repeats: int) -> list[float]:
    """Seconds to rebuild shard 0 from the changelog, into an empty state directory each time."""
    events_id = topic_id(settings, settings.events_topic)
    writer = ChangelogWriter(settings, events_id)
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="streamrec-bench-restore-") as scratch:
            fresh = settings.replace(state_dir=Path(scratch))
            started = time.perf_counter()
            store, _marks, rebuilt = open_shard(fresh, 0, 1, writer, events_id)
            times.append(time.perf_counter() - started)
            store.close()
            assert rebuilt
    return times


@click.command("restore")
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Sessions in the changelog partition (each at full length).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Rebuilds timed; the median is reported.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the figures here."
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def bench_restore_command(
    sessions: int, repeats: int, json_path: Path | None, progress: bool
) -> None:
    """Seconds to rebuild a shard of SESSIONS sessions from the changelog topic.

    Uses the broker at STREAMREC_BROKERS (starting the local one if nothing
    answers), on fresh topics of its own that it deletes afterwards.
    """
    base = Settings.from_env()
    suffix = uuid.uuid4().hex[:8]
    settings = base.replace(
        events_topic=f"bench-restore-{suffix}",
        recommendations_topic=f"bench-restore-recs-{suffix}",
        dlq_topic=f"bench-restore-dlq-{suffix}",
        events_partitions=1,
    )
    broker = ensure_broker(settings, lambda line: click.echo(line, err=True))
    create_topics(settings, partitions=1)
    try:
        written = fill_changelog(settings, sessions, progress)
        times = time_restores(settings, repeats)
    finally:
        delete_topics(settings, list(wanted_topics(settings, 1)))
        broker.stop()
    median = statistics.median(times)
    figures = {
        "sessions": sessions,
        "record_bytes": written,
        "repeats": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "s_per_100k_sessions": per_100k(median, sessions),
        "sessions_per_s": round(sessions / median),
    }
    click.echo(
        f"rebuilt {sessions:,} sessions ({written / 1e6:.0f} MB of records) in a median "
        f"{median:.2f} s of {repeats} ({', '.join(f'{t:.2f}' for t in times)}): "
        f"{figures['s_per_100k_sessions']} s per 100,000 sessions, "
        f"{figures['sessions_per_s']:,} sessions/s"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
