"""`streamrec demo`: the whole system, end to end, on real MovieLens traffic.

Starts the local broker, creates fresh demo topics, runs the flow serving the
committed model, replays ratings as live events on an open-loop schedule,
measures event-to-recommendation latency, shows a few recommendations with
their movie titles, and stops everything it started.
"""

from __future__ import annotations

import csv
import gc
import shutil
import threading
import time
from pathlib import Path

import click
import orjson
from confluent_kafka import Consumer

from streamrec.contracts import Recommendation
from streamrec.datasets import load_events
from streamrec.kafka_clients import consumer_config, end_offsets, topic_partitions
from streamrec.settings import REPO_ROOT, Settings
from streamrec.topics import create_topics, delete_topics, wanted_topics
from tools.bench_e2e import BenchPlan, wait_until_serving
from tools.bench_services import (
    STUDENT,
    BenchError,
    Service,
    service_commands,
    service_environment,
)
from tools.kafka_local import KafkaLauncherError, LocalKafka
from tools.latency import LatencyCollector, StopRule
from tools.replay import DatasetSource, replay
from tools.schedule import Timing

DEMO_DIR = REPO_ROOT / "run" / "demo"
READINESS = BenchPlan(warmup_events=50, ready_timeout_s=180.0)


def demo_settings() -> Settings:
    """The user's settings with the demo's own topics and state, so nothing of theirs is touched."""
    base = Settings.from_env()
    return base.replace(
        events_topic="demo.events",
        recommendations_topic="demo.recommendations",
        dlq_topic="demo.events.dlq",
        state_dir=DEMO_DIR / "state",
        recovery_dir=DEMO_DIR / "recovery",
    )


def movie_titles(data_dir: Path) -> dict[str, str]:
    path = data_dir / "movies.csv"
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["movieId"]: row["title"] for row in csv.DictReader(f)}


def show_examples(settings: Settings, how_many: int = 3) -> None:
    """Print the last few recommendations with movie titles: what a downstream consumer sees."""
    titles = movie_titles(settings.data_dir)
    consumer = Consumer(consumer_config(settings, group="streamrec-demo"))
    topic = settings.recommendations_topic
    ends = end_offsets(consumer, topic, topic_partitions(settings, topic))
    for end in ends:
        end.offset = max(end.offset - 20, 0)
    consumer.assign(ends)
    by_user: dict[str, Recommendation] = {}
    deadline = time.monotonic() + 5
    while len(by_user) < how_many and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            rec = Recommendation.from_json(message.value() or b"")
            by_user[rec.user_id] = rec
    consumer.close()
    for rec in list(by_user.values())[:how_many]:
        click.echo(f"\nuser {rec.user_id} (event {rec.event_id}, model {rec.model}):")
        for item in rec.items[:5]:
            click.echo(f"  {item.score:8.3f}  {titles.get(item.item_id, item.item_id)}")


@click.command("demo")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="MovieLens ratings replayed as live events.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=500.0,
    show_default=True,
    help="Events per second, on an open-loop schedule.",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave the broker running afterwards (the flow is always stopped).",
)
def demo_command(count: int, rate: float, keep_running: bool) -> None:
    """Run the whole system end to end on MovieLens traffic and report its latency.

    \b
    1. start a real Kafka broker (KRaft, Java 17; jars from Maven Central)
    2. create fresh demo topics (demo.events with 4 partitions, ...)
    3. run the flow serving the model card's chosen variant (model/artifacts)
    4. replay COUNT ratings at RATE events/s, keyed by user
    5. measure latency from each event's Kafka timestamp to its recommendation
    6. stop the flow and, unless --keep-running, the broker
    """
    settings = demo_settings()
    broker = LocalKafka(settings, log=lambda line: click.echo(line))
    was_running = broker.status().running
    try:
        broker.up()
    except KafkaLauncherError as err:
        raise click.ClickException(str(err)) from None
    flow: Service | None = None
    try:
        delete_topics(settings, list(wanted_topics(settings)))
        shutil.rmtree(DEMO_DIR, ignore_errors=True)
        for topic in create_topics(settings):
            click.echo(f"topic {topic.describe()}")
        log = DEMO_DIR / "flow.log"
        click.echo(f"flow: starting (log: {log})")
        flow = Service(STUDENT, service_commands(STUDENT), service_environment(settings), log)
        events = load_events(settings.data_dir)
        started = time.monotonic()
        try:
            # The benchmark's readiness check: probe until answered, then a warm-up.
            served = wait_until_serving(settings, flow, events, 0, READINESS)
        except BenchError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"flow: serving after {time.monotonic() - started:.1f} s")

        source = DatasetSource(events, served, count, name=str(settings.data_dir))
        # The collector fixes its start offsets now, before the first event goes out.
        collector = LatencyCollector(settings, group="streamrec-demo")
        rule = StopRule(count=count, idle_timeout_s=30.0)
        reading = threading.Thread(target=collector.run, args=(rule,))
        reading.start()
        click.echo(f"replay: {count} MovieLens ratings at {rate:g} events/s")
        try:
            report = replay(settings, source, Timing.fixed_rate(rate), progress=True)
            click.echo(report.describe())
        finally:
            reading.join()
            collector.close()
        matcher = collector.matcher
        click.echo("\n" + matcher.describe())
        summary = DEMO_DIR / "latency.json"
        summary.write_bytes(orjson.dumps(matcher.summary(), option=orjson.OPT_INDENT_2))
        click.echo(f"figures: {summary}")
        show_examples(settings)
        if matcher.stats.matched < count:
            raise click.ClickException(
                f"only {matcher.stats.matched} of {count} events got a recommendation; see {log}"
            )
    finally:
        if flow is not None:
            flow.stop()
            click.echo("flow: stopped")
        if not keep_running and not was_running:
            # Free the demo's Kafka clients first, or they log the broker going away.
            gc.collect()
            broker.down()
