"""`streamrec run`: the dataflow, alone or as one process of a Bytewax cluster.

Where the flow cannot go on, it stops with one line that says why and an exit
code a supervisor can act on (README, "Running under a supervisor"):

====  ==========================================================================
0     stopped on request (SIGTERM, Ctrl-C), everything in flight finished
1     an unexpected failure (a bug): the traceback is in the log; restart
2     a wrong command line
65    the session state cannot be used: damaged, of a newer format, or built
      from another incarnation of the events topic; a person must decide
69    Kafka, or a topic the flow needs, is not there at start; restart later
74    the state cannot be written (disk full, I/O error); nothing half-written
78    the configuration is wrong: the model or the Kafka client settings
130   aborted by a second SIGTERM or Ctrl-C
====  ==========================================================================
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

import click

from streamrec.settings import AT_LEAST_ONCE, EXACTLY_ONCE, Settings

if TYPE_CHECKING:  # the flow's heavy imports wait until the command runs
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig

EXIT_STATE_UNUSABLE: Final = 65
EXIT_UNAVAILABLE: Final = 69
EXIT_STATE_UNWRITABLE: Final = 74
EXIT_CONFIGURATION: Final = 78
EXIT_ABORTED: Final = 130


def stop_with(code: int, message: str) -> NoReturn:
    """One clear line, then the exit code that tells a supervisor what kind of stop this is."""
    click.echo(f"flow: cannot go on: {message} (exit {code})", err=True)
    sys.exit(code)


def _cause_of(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    # Bytewax re-raises a step's exception wrapped in its own; the original is in the chain.
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kinds):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def ensure_recovery_store(recovery_dir: Path, partitions: int) -> None:
    """Create Bytewax's recovery partitions once; every process of a cluster may race to."""
    from bytewax.recovery import init_db_dir

    recovery_dir.mkdir(parents=True, exist_ok=True)
    with (recovery_dir / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any(recovery_dir.glob("part-*.sqlite3")):
            init_db_dir(recovery_dir, partitions)


def _is_interrupt(err: BaseException) -> bool:
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return True
        cause = cause.__cause__
    return "signal received" in str(err)


@click.command("run")
@click.option("--brokers", default=None, help="Kafka bootstrap servers [default: 127.0.0.1:9092].")
@click.option(
    "--variant",
    default=None,
    help="Model variant to serve, a name from the model card [default: the card's chosen one]; "
    "or an A/B split by user, e.g. student_pruned_int8_dynamic=90,teacher=10 (weights, any scale): "
    "each user always gets the same variant, and each recommendation names it in 'model'.",
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained artifacts [default: model/artifacts].",
)
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker threads in this process [default: 1]. Threads share the GIL: "
    "scale out with processes (-i/-a).",
)
@click.option(
    "-i",
    "--process-id",
    type=click.IntRange(min=0),
    default=None,
    help="This process's index in a cluster (with -a).",
)
@click.option(
    "-a",
    "--addresses",
    default=None,
    help="host:port of every process of the cluster, ';'-separated, in process-id "
    "order (Bytewax cluster mode).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="RocksDB session stores, one per events partition [default: run/state].",
)
@click.option(
    "--recovery-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Bytewax recovery store: where the source resumes [default: run/recovery].",
)
@click.option(
    "--no-recovery",
    is_flag=True,
    help="Start from the beginning of the topic each time (no resume). Sessions still "
    "skip events already applied.",
)
@click.option(
    "--changelog/--no-changelog",
    default=None,
    help="Write session changes to the changelog topic and rebuild a missing or stale shard "
    "from it [default: on; STREAMREC_CHANGELOG].",
)
@click.option(
    "--guarantee",
    type=click.Choice([AT_LEAST_ONCE, EXACTLY_ONCE]),
    default=None,
    help="Output delivery [default: at-least-once; STREAMREC_GUARANTEE]. exactly-once commits "
    "a partition's recommendations, dead letters, session changes and resume offset in one "
    "Kafka transaction every STREAMREC_TRANSACTION_INTERVAL_MS (100 ms; needs the changelog; "
    "no Bytewax recovery store): consumers reading with isolation.level=read_committed see "
    "each event answered once.",
)
@click.option(
    "--epoch-interval",
    type=float,
    default=None,
    help="Seconds per Bytewax epoch: snapshot interval and backpressure [default: 1].",
)
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Items per recommendation.")
@click.option(
    "--candidates",
    type=click.IntRange(min=1),
    default=None,
    help="Candidate items scored per event [default: 200].",
)
@click.option(
    "--batch-max",
    type=click.IntRange(min=1),
    default=None,
    help="Most records read from a partition per micro-batch [default: 32].",
)
@click.option(
    "--batch-linger-ms",
    type=click.FloatRange(min=0),
    default=None,
    help="When the worker is busy (processing over 70% of the time), the longest a record "
    "waits for a fuller micro-batch of STREAMREC_BATCH_FILL (16) records; an idle worker never "
    "waits [default: 3; 0: never].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0),
    default=None,
    help="Prometheus /metrics port, plus the process id, on STREAMREC_METRICS_HOST "
    "[default: 9464 on 127.0.0.1; 0: off].",
)
def run_command(
    brokers: str | None,
    variant: str | None,
    model_dir: Path | None,
    workers: int | None,
    process_id: int | None,
    addresses: str | None,
    state_dir: Path | None,
    recovery_dir: Path | None,
    no_recovery: bool,
    changelog: bool | None,
    guarantee: str | None,
    epoch_interval: float | None,
    top_k: int | None,
    candidates: int | None,
    batch_max: int | None,
    batch_linger_ms: float | None,
    metrics_port: int | None,
) -> None:
    """Run the dataflow: every event in, one top-K recommendation out.

    Reads the events topic, applies each event to its user's session in
    RocksDB (once: replays are recognised by their offset), scores candidate
    items with the served ONNX model and writes a recommendation keyed by
    user; invalid records go to the dead-letter topic with the reason.
    A record {"type": "forget", "user_id": ..., "event_id": ..., "ts": ...}
    on the events topic erases that user's session.

    \b
    One process, two worker threads:
      streamrec run -w 2
    A cluster of two processes (run each, e.g. on two terminals):
      streamrec run -i 0 -a "127.0.0.1:2101;127.0.0.1:2102"
      streamrec run -i 1 -a "127.0.0.1:2101;127.0.0.1:2102"
    """
    from streamrec.flows.shutdown import STARTING, stop_gracefully_on_signals

    # Before the seconds of start-up, so that a stop during them exits cleanly.
    stop_gracefully_on_signals()
    click.echo(STARTING, err=True)
    # The flow's own modules log through `logging` (librdkafka's lines have their own handler).
    logging.basicConfig(level=logging.INFO, format="flow: %(message)s", stream=sys.stderr)
    settings = Settings.from_env(
        brokers=brokers,
        model_dir=model_dir,
        workers=workers,
        state_dir=state_dir,
        recovery_dir=recovery_dir,
        changelog=changelog,
        guarantee=guarantee,
        epoch_interval_s=epoch_interval,
        top_k=top_k,
        candidates=candidates,
        batch_max_events=batch_max,
        batch_linger_ms=batch_linger_ms,
        metrics_port=metrics_port,
    )
    cluster = _checked_cluster(settings, process_id, addresses)
    _serve(settings, variant, process_id, cluster, no_recovery)


def _checked_cluster(
    settings: Settings, process_id: int | None, addresses: str | None
) -> list[str]:
    """The cluster's addresses (none: one process), after the checks of the command line."""
    from streamrec.flows.guarantee import GuaranteeChoiceError, check_choice

    try:
        check_choice(settings)
    except GuaranteeChoiceError as err:
        raise click.UsageError(str(err)) from None
    cluster = [a for a in (addresses or "").split(";") if a]
    if cluster and process_id is None:
        raise click.UsageError("-a/--addresses needs -i/--process-id")
    if process_id is not None and process_id >= max(len(cluster), 1):
        raise click.UsageError(f"-i {process_id} is not an index of the {len(cluster)} addresses")
    return cluster


def _serve(
    settings: Settings,
    variant: str | None,
    process_id: int | None,
    cluster: list[str],
    no_recovery: bool,
) -> None:
    """Load and check everything the flow needs, then run it until it stops."""
    from streamrec.flows import metrics
    from streamrec.flows.dataflow import build_dataflow
    from streamrec.flows.guarantee import for_settings
    from streamrec.flows.models import (
        ModelWatcher,
        VariantSpecError,
        load_model_set,
        parse_variants,
    )
    from streamrec.flows.stores import PartitionStores

    try:
        shares = parse_variants(variant)
    except VariantSpecError as err:
        raise click.UsageError(str(err)) from None
    try:
        # Loaded and tried once here so that a missing or broken model stops the flow before
        # it reads (onnxruntime raises its own kinds of error for a model it cannot run).
        model = load_model_set(settings.model_dir, shares, settings)
    except Exception as err:  # noqa: BLE001 - whatever makes the model unservable
        stop_with(EXIT_CONFIGURATION, f"the model in {settings.model_dir} cannot be served: {err}")
    partitions, incarnation = _events_topic(settings)
    _check_state(settings, partitions, incarnation)
    processes = max(len(cluster), 1)
    guarantee = for_settings(settings, incarnation, recovery_store=not no_recovery)
    recovery = _recovery_config(settings, processes) if guarantee.recovery_store else None
    metrics_note = _metrics_endpoint(settings, process_id)
    stores = PartitionStores(partitions, guarantee)
    watcher = ModelWatcher(settings, shares, model, settings.workers).start()
    metrics.observe_gc_pauses()
    flow = build_dataflow(settings, stores, variant, model=model, watcher=watcher)
    click.echo(
        f"flow: {settings.events_topic} ({partitions} partitions) -> "
        f"{settings.recommendations_topic}; process {process_id or 0}/{processes}, "
        f"{settings.workers} worker(s), epoch {settings.epoch_interval_s:g} s, "
        f"{settings.guarantee}; serving {', '.join(model.versions)}{metrics_note}",
        err=True,
    )
    try:
        exit_code, message = _run_until_stopped(flow, settings, process_id, cluster, recovery)
    finally:
        watcher.stop()
        try:
            stores.close()
            click.echo("flow: stopped; session stores closed", err=True)
        except Exception as err:  # noqa: BLE001 - a full disk also refuses the close
            click.echo(f"flow: closing the session stores failed: {err}", err=True)
    if message is not None:
        stop_with(exit_code, message)
    if exit_code:
        sys.exit(exit_code)


def _events_topic(settings: Settings) -> tuple[int, str]:
    """The events topic's partition count and incarnation id; stops if Kafka cannot say, or
    if a topic the flow writes to is missing (69: a supervisor retries once it is made)."""
    from streamrec.kafka_clients import (
        KafkaConfigError,
        KafkaRefused,
        KafkaUnavailable,
        topic_id,
        topic_partitions,
    )

    try:
        partitions = len(topic_partitions(settings, settings.events_topic))
        incarnation = topic_id(settings, settings.events_topic)
        # The outputs' topics too: missing, every answer would wait as "output blocked".
        for output in (settings.recommendations_topic, settings.dlq_topic):
            topic_partitions(settings, output)
        if settings.changelog:
            changelog_partitions = len(topic_partitions(settings, settings.sessions_changelog))
            if changelog_partitions != partitions:
                stop_with(
                    EXIT_STATE_UNUSABLE,
                    f"changelog {settings.sessions_changelog!r} has {changelog_partitions} "
                    f"partitions, the events topic {partitions}: shard p writes to changelog "
                    "partition p, so they must match (recreate the changelog topic)",
                )
    except KafkaRefused as err:  # retrying cannot help: the settings are wrong
        stop_with(EXIT_CONFIGURATION, str(err))
    except KafkaUnavailable as err:
        stop_with(EXIT_UNAVAILABLE, str(err))
    except KafkaConfigError as err:
        stop_with(EXIT_CONFIGURATION, str(err))
    return partitions, incarnation


def _check_state(settings: Settings, partitions: int, incarnation: str) -> None:
    from streamrec.state.errors import StateError
    from streamrec.state.layout import check_topic_incarnation, ensure_layout

    try:
        # Sessions live with the events partition they arrive on, so the state
        # is laid out for the topic's partition count, not for the worker count.
        ensure_layout(settings.state_dir, partitions)
        check_topic_incarnation(settings.state_dir, settings.events_topic, incarnation)
    except StateError as err:
        stop_with(EXIT_STATE_UNUSABLE, str(err))


def _recovery_config(settings: Settings, processes: int) -> RecoveryConfig:
    from bytewax.recovery import RecoveryConfig

    # One recovery partition per process, not per Kafka partition: each is a SQLite file
    # committed (fsync) at every epoch on the thread that scores events, and a few bytes
    # of offsets need no more.  A store made earlier keeps its count.
    ensure_recovery_store(settings.recovery_dir, processes)
    return RecoveryConfig(str(settings.recovery_dir))


def _metrics_endpoint(settings: Settings, process_id: int | None) -> str:
    """Serve /metrics, if asked; what the start line says of it."""
    from streamrec.flows.metrics import MetricsEndpointError, serve

    if os.environ.get("BYTEWAX_DATAFLOW_API_ENABLED"):
        logging.getLogger(__name__).warning(
            "BYTEWAX_DATAFLOW_API_ENABLED is set: Bytewax's API server listens on every "
            "interface (0.0.0.0), whatever STREAMREC_METRICS_HOST says; unset it unless that "
            "port is firewalled"
        )
    if not settings.metrics_port:
        return ""
    port = settings.metrics_port + (process_id or 0)
    try:
        serve(settings.metrics_host, port)
    except MetricsEndpointError as err:
        stop_with(EXIT_UNAVAILABLE if err.retryable else EXIT_CONFIGURATION, str(err))
    return f", metrics on {settings.metrics_host}:{port}/metrics"


def _run_until_stopped(
    flow: Dataflow,
    settings: Settings,
    process_id: int | None,
    cluster: list[str],
    recovery: RecoveryConfig | None,
) -> tuple[int, str | None]:
    """Run ``flow``; the exit code and the line to stop with (None: nothing to say)."""
    from bytewax.errors import BytewaxRuntimeError
    from bytewax.run import cli_main

    # A stop during start-up needs no case of its own: the readers end at once.
    try:
        cli_main(
            flow,
            workers_per_process=settings.workers,
            process_id=process_id,
            addresses=cluster or None,
            epoch_interval=timedelta(seconds=settings.epoch_interval_s),
            recovery_config=recovery,
        )
    except KeyboardInterrupt:
        click.echo("flow: aborted", err=True)
        return EXIT_ABORTED, None
    except BytewaxRuntimeError as err:
        # Bytewax reports the interrupt it stopped on as its own error.
        if _is_interrupt(err):
            click.echo("flow: aborted", err=True)
            return EXIT_ABORTED, None
        exit_code, message = exit_code_of(err)
        if message is None:
            raise
        return exit_code, message
    return 0, None


def exit_code_of(err: BaseException) -> tuple[int, str | None]:
    """The exit code and line for a failure the flow cannot go on from; (1, None): a bug.

    The kinds are tried in this order, each against the whole chain of causes
    (Bytewax wraps a step's exception in its own), a kind before its base.
    """
    from streamrec.flows.source import ResumeOffsetError
    from streamrec.kafka_clients import KafkaRefused, KafkaUnavailable
    from streamrec.state.errors import StateError, StateWriteError

    kinds: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
        ((KafkaRefused,), EXIT_CONFIGURATION),  # a login, a certificate or rights: a person
        ((KafkaUnavailable,), EXIT_UNAVAILABLE),  # Kafka away or too slow: retry later
        ((StateWriteError,), EXIT_STATE_UNWRITABLE),  # the disk
        ((ResumeOffsetError, StateError), EXIT_STATE_UNUSABLE),  # a person decides
    )
    for kind, code in kinds:
        cause = _cause_of(err, kind)
        if cause is not None:
            return code, str(cause)
    return 1, None
