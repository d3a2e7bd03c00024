"""`streamrec demo`: the whole system, end to end, on real MovieLens traffic.

Starts the local broker, creates fresh demo topics, runs the flow serving the
committed model, replays the ratings after the model's training cut-off as
live events on an open-loop schedule, measures event-to-recommendation latency
and the online hit rate (with an interval, beside two baselines on the same
events: ``streamrec.tools.online_quality``), shows a few recommendations with their movie
titles, and stops everything it started.
"""

from __future__ import annotations

import csv
import gc
import shutil
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
from confluent_kafka import Consumer

from streamrec.contracts import Event, Recommendation
from streamrec.datasets import load_events
from streamrec.kafka_clients import consumer_config, end_offsets, topic_partitions
from streamrec.model.candidates import CandidateIndex
from streamrec.model.data import Vocab
from streamrec.model.quota import UserQuota
from streamrec.model.serving import INDEX_FILE, VOCAB_FILE, read_card
from streamrec.settings import REPO_ROOT, Settings
from streamrec.tools.kafka_local import KafkaLauncherError, LocalKafka
from streamrec.tools.latency import LatencyCollector, LatencyMatcher, StopRule
from streamrec.tools.online_quality import (
    BASELINES,
    RESAMPLES,
    CardError,
    HeldOut,
    Interval,
    StreamProtocol,
    baseline_hit_rates,
    held_out,
    interval_of,
)
from streamrec.tools.replay import DatasetSource, replay
from streamrec.tools.schedule import Timing
from streamrec.tools.services import (
    Readiness,
    Service,
    ServiceError,
    flow_commands,
    service_environment,
    wait_until_serving,
)
from streamrec.topics import create_topics, delete_topics, wanted_topics

DEMO_DIR = REPO_ROOT / "run" / "demo"
READINESS = Readiness(warmup_events=50, timeout_s=180.0)


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


def _utc(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def report_quality(
    settings: Settings,
    events: Sequence[Event],
    window: HeldOut,
    served: int,
    matcher: LatencyMatcher,
    protocol: StreamProtocol,
) -> dict[str, Any]:
    """Print the served model's online hit rate beside the baselines' on the same events.

    The baselines replay in process what the flow was sent: the warm-up events
    (``events[:served]``, sessions and counts only) and then the measured ones.
    """
    replayed = events[window.start : window.start + window.count]
    index = CandidateIndex.load(settings.model_dir / INDEX_FILE, settings.online_half_life_events)
    vocab = Vocab.load(settings.model_dir / VOCAB_FILE)
    baselines = baseline_hit_rates(
        replayed,
        index,
        vocab,
        settings.top_k,
        events[:served],
        settings.online_candidates,
        UserQuota(settings.online_user_cap, settings.online_half_life_events),
        settings.session_length,
    )
    figures: dict[str, Interval] = {
        "served model": interval_of(list(matcher.stats.per_model.values()))
    }
    figures |= {name: interval_of([baselines[name]]) for name in BASELINES}
    before = {e.user_id for e in events[: window.start]}
    users = {e.user_id for e in replayed}
    k = settings.top_k
    lines = [
        f"online quality: hit rate@{k} on the {window.count:,} events after the model's training "
        f"cut-off ({_utc(window.cutoff_ts)}), none of which it was trained on",
        f"  hit: the user's next event's item among the {k} recommended on their previous event; "
        f"[95% interval: {RESAMPLES:,} bootstrap resamples of users]",
        f"  {'served model':<14}{', '.join(matcher.stats.per_model) or '-'}: "
        f"{figures['served model'].describe()}",
    ]
    for name in BASELINES:
        lines.append(f"  {name:<14}in process, same events: {figures[name].describe()}")
    if protocol.hr is not None and protocol.hr_ci is not None:
        low, high = protocol.hr_ci
        lines.append(
            f"  {'model card':<14}{protocol.chosen} offline stream HR@10 {protocol.hr:.1%} "
            f"[{low:.1%}, {high:.1%}] (from each user's full history)"
        )
    lines.append(
        "  cold sessions: the flow starts empty, so it knows nothing of these users before the "
        f"cut-off ({len(users & before)} of the {len(users)} had ratings there); a fresh live "
        "deploy meets the same"
    )
    click.echo("\n" + "\n".join(lines))
    return {
        "cutoff_ts": window.cutoff_ts,
        "events": window.count,
        "users": len(users),
        "users_with_history_before_cutoff": len(users & before),
        "k": k,
        "hit_rate": {
            name: {
                "hits": f.hits,
                "judged": f.judged,
                "rate": round(f.point, 4),
                "ci95": [round(f.low, 4), round(f.high, 4)],
            }
            for name, f in figures.items()
        },
        "card_stream_hr@10": protocol.hr,
    }


@click.command("demo")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="MovieLens ratings replayed as live events, from the model's training cut-off on.",
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
    """Run the whole system end to end on MovieLens traffic; report latency and hit rate.

    \b
    1. start a real Kafka broker (KRaft, Java 17; jars from Maven Central)
    2. create fresh demo topics (demo.events with 4 partitions, ...)
    3. run the flow serving the model card's chosen variant (model/artifacts)
    4. replay COUNT ratings after the card's training cut-off (all there
       are, if fewer) at RATE events/s, keyed by user
    5. measure latency from each event's Kafka timestamp to its recommendation
    6. report the online hit rate with a 95% interval, beside the "popular"
       and "co-visitation" baselines on the same events (run in process)
    7. stop the flow and, unless --keep-running, the broker

    Only events the model was not trained on are replayed, so the hit rate is
    out of sample; the flow starts empty, so these users' sessions start cold.
    """
    settings = demo_settings()
    events = load_events(settings.data_dir)
    try:
        protocol = StreamProtocol.from_card(read_card(settings.model_dir))
    except (CardError, OSError) as err:
        raise click.ClickException(
            f"cannot read the model card in {settings.model_dir}: {err}"
        ) from None
    window = held_out(events, protocol, count)
    if protocol.cutoff_ts is None:
        click.echo(
            f"the model card records no cut-off: drawn as training does, at the last "
            f"{protocol.fraction:.0%} of {settings.data_dir}'s events ({_utc(window.cutoff_ts)})"
        )
    elif window.recomputed_ts != window.cutoff_ts:
        click.echo(
            f"warning: the model card's cut-off ({_utc(window.cutoff_ts)}) is not the one "
            f"{settings.data_dir} gives ({_utc(window.recomputed_ts)}): the model was trained "
            "on other data"
        )
    if window.count == 0:
        raise click.ClickException(
            f"{settings.data_dir} has no event after the model's training cut-off "
            f"({_utc(window.cutoff_ts)}); train on it first (`streamrec train --data ...`)"
        )
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
        flow = Service("student", flow_commands(), service_environment(settings), log)
        started = time.monotonic()
        try:
            # The benchmark's readiness check: probe until answered, then a warm-up, with
            # the first (training) events, so that the held-out ones are all measured.
            served = wait_until_serving(settings, flow, events, 0, READINESS)
        except ServiceError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"flow: serving after {time.monotonic() - started:.1f} s")
        if served > window.start:
            raise click.ClickException(
                f"the warm-up took {served} events, past the cut-off at event {window.start}"
            )

        count = window.count
        source = DatasetSource(events, window.start, count, name=str(settings.data_dir))
        # The collector fixes its start offsets now, before the first event goes out.
        collector = LatencyCollector(settings, group="streamrec-demo")
        rule = StopRule(count=count, idle_timeout_s=30.0)
        reading = threading.Thread(target=collector.run, args=(rule,))
        reading.start()
        if window.short:
            click.echo(
                f"only {window.available:,} events follow the training cut-off, fewer than "
                f"--count {window.asked:,}: replaying all of them"
            )
        click.echo(
            f"replay: {count:,} MovieLens ratings after the training cut-off "
            f"({_utc(window.cutoff_ts)}; events {window.start:,}..{window.start + count - 1:,} "
            f"of {len(events):,}) at {rate:g} events/s"
        )
        try:
            report = replay(settings, source, Timing.fixed_rate(rate), progress=True)
            click.echo(report.describe())
        finally:
            reading.join()
            collector.close()
        matcher = collector.matcher
        click.echo("\n" + matcher.describe())
        quality = report_quality(settings, events, window, served, matcher, protocol)
        summary = DEMO_DIR / "latency.json"
        figures = {**matcher.summary(), "online_quality": quality}
        summary.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
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
