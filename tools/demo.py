"""`streamrec demo`: the whole system, end to end, on real MovieLens traffic.

Starts the local broker, creates fresh demo topics, runs the flow serving the
committed model, replays ratings as live events on an open-loop schedule,
measures event-to-recommendation latency, shows a few recommendations with
their movie titles, and stops everything it started.
"""

from __future__ import annotations

import csv
import gc
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import orjson
from confluent_kafka import Consumer, Producer

from streamrec.contracts import Event, Recommendation
from streamrec.settings import REPO_ROOT, Settings
from tools.kafka_clients import consumer_config, end_offsets, producer_config, topic_partitions
from tools.kafka_local import KafkaLauncherError, LocalKafka
from tools.latency import LatencyCollector, StopRule
from tools.replay import open_source, replay
from tools.schedule import Timing
from tools.topics import create_topics, delete_topics, wanted_topics

DEMO_DIR = REPO_ROOT / "run" / "demo"
READY_TIMEOUT_S = 180.0


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


def start_flow(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamrec", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings.to_env()},
        )


def wait_until_serving(settings: Settings, flow: subprocess.Popen[bytes], log: Path) -> float:
    """Send one probe event and wait for its recommendation; returns the seconds it took."""
    consumer = Consumer(consumer_config(settings, group="streamrec-demo"))
    topic = settings.recommendations_topic
    consumer.assign(end_offsets(consumer, topic, topic_partitions(settings, topic)))
    probe = Event("demo-probe", "demo-probe-user", "1", "view", int(time.time() * 1000))
    producer = Producer(producer_config(settings))
    producer.produce(settings.events_topic, probe.to_json(), probe.key)
    producer.flush(30)
    started = time.monotonic()
    try:
        while time.monotonic() - started < READY_TIMEOUT_S:
            if flow.poll() is not None:
                raise click.ClickException(f"the flow exited:\n{_tail(log)}")
            message = consumer.poll(0.5)
            if (
                message is not None
                and message.error() is None
                and Recommendation.from_json(message.value() or b"").event_id == probe.event_id
            ):
                return time.monotonic() - started
        raise click.ClickException(
            f"the flow did not answer within {READY_TIMEOUT_S:.0f} s:\n{_tail(log)}"
        )
    finally:
        consumer.close()


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


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


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
    3. run the flow serving the committed int8 student (model/artifacts)
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
    flow: subprocess.Popen[bytes] | None = None
    log = DEMO_DIR / "flow.log"
    try:
        delete_topics(settings, list(wanted_topics(settings)))
        shutil.rmtree(DEMO_DIR, ignore_errors=True)
        for topic in create_topics(settings):
            click.echo(f"topic {topic.describe()}")
        click.echo(f"flow: starting (log: {log})")
        flow = start_flow(settings, log)
        click.echo(f"flow: serving after {wait_until_serving(settings, flow, log):.1f} s")

        source = open_source(settings, None, settings.data_dir, 0, count, None)
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
        if flow is not None and flow.poll() is None:
            flow.terminate()
            try:
                flow.wait(30)
            except subprocess.TimeoutExpired:
                flow.kill()
            click.echo("flow: stopped")
        if not keep_running and not was_running:
            # Free the demo's Kafka clients first, or they log the broker going away.
            gc.collect()
            broker.down()
