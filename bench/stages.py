"""`streamrec bench stages`: what each stage of the hot path costs per event, without Kafka.

Replays MovieLens events through the same code the flow runs on every event
(parse, session update in on-disk RocksDB, candidates and scoring) in
micro-batches of several sizes, and reports microseconds per event per stage.
It answers "which stage costs what" when the end-to-end benchmark misses a
target, with no broker sharing the cores.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import orjson

from streamrec.contracts import Event, parse_message
from streamrec.datasets import load_events
from streamrec.model.serving import Recommender
from streamrec.settings import Settings
from streamrec.state.store import SessionStore

SHARDS = 4


def measure_stages(
    events: list[Event], batch: int, settings: Settings, variant: str | None
) -> dict[str, float]:
    """Microseconds per event for parse, state and recommend, at one micro-batch size."""
    records = [(e.to_json(), e.key) for e in events]
    recommender = Recommender.load(
        settings.model_dir,
        variant=variant,
        threads=settings.scoring_threads,
        candidates=settings.candidates,
    )
    with tempfile.TemporaryDirectory() as scratch:
        stores = [SessionStore.open(Path(scratch), s, SHARDS, settings) for s in range(SHARDS)]
        spent = {"parse": 0.0, "state": 0.0, "recommend": 0.0}
        offsets = [0] * SHARDS
        for lo in range(0, len(records), batch):
            t0 = time.perf_counter()
            parsed = [parse_message(value, key) for value, key in records[lo : lo + batch]]
            t1 = time.perf_counter()
            histories = []
            for event in parsed:
                assert isinstance(event, Event)
                shard = hash(event.user_id) % SHARDS
                offsets[shard] += 1
                histories.append(stores[shard].stage(event, shard, offsets[shard]).session.item_ids)
            for store in stores:  # as the flow does: one write per store and micro-batch
                store.commit()
            t2 = time.perf_counter()
            recommender.recommend(histories, settings.top_k)
            t3 = time.perf_counter()
            spent["parse"] += t1 - t0
            spent["state"] += t2 - t1
            spent["recommend"] += t3 - t2
        for store in stores:
            store.close()
    return {f"{stage}_us": seconds / len(records) * 1e6 for stage, seconds in spent.items()}


@click.command("stages")
@click.option(
    "--count",
    type=click.IntRange(min=100),
    default=3000,
    show_default=True,
    help="Events per batch size.",
)
@click.option(
    "--batches",
    default="1,8,32",
    show_default=True,
    help="Micro-batch sizes to measure, comma separated.",
)
@click.option("--variant", default=None, help="Model variant [default: the card's chosen one].")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the figures as JSON.",
)
def bench_stages_command(
    count: int, batches: str, variant: str | None, json_path: Path | None
) -> None:
    """Microseconds per event of parse, state and recommend, in process (no Kafka)."""
    settings = Settings.from_env()
    events = load_events(settings.data_dir)
    rows = []
    for size in (int(b) for b in batches.split(",")):
        # Each batch size starts from empty sessions on the same events.
        figures = {"batch": size, **measure_stages(events[:count], size, settings, variant)}
        rows.append(figures)
        click.echo(
            f"batch {size:>4}: parse {figures['parse_us']:7.1f} us  state "
            f"{figures['state_us']:7.1f} us  recommend {figures['recommend_us']:8.1f} us per event"
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
