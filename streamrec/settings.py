"""Every setting of streamrec: one name, one default, one sentence of meaning.

Each field can be overridden from the environment as ``STREAMREC_<NAME>``
(``STREAMREC_BROKERS=host:9092``).  Nothing else in the code base reads the
environment; command-line options override these values in turn.

>>> Settings.from_env({"STREAMREC_TOP_K": "5"}).top_k
5
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

ENV_PREFIX = "STREAMREC_"
# Output delivery guarantees of `streamrec run` (setting ``guarantee``).
AT_LEAST_ONCE: Final = "at-least-once"
EXACTLY_ONCE: Final = "exactly-once"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Sizes in megabytes (and counts) that only make sense at 0 or more.
MEMORY_SETTINGS: Final = (
    "session_cache_mb",
    "consumed_cache_mb",
    "rocksdb_block_cache_mb",
    "exclusion_cache_mb",
    "online_half_life_events",
    "online_user_cap",
)


def _served_artifacts() -> Path:
    """model/artifacts of a checkout; installed from a wheel, the copy inside the package."""
    checkout = REPO_ROOT / "model" / "artifacts"
    installed = Path(__file__).resolve().parent / "model" / "artifacts"  # streamrec.model
    return installed if installed.is_dir() and not checkout.is_dir() else checkout


def _setting(default: Any, meaning: str) -> Any:
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True, slots=True)
class Settings:
    # Kafka connection and topics (the data contracts live in streamrec.contracts).
    brokers: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers, comma separated.")
    events_topic: str = _setting("events", "Topic of user events, keyed by user id.")
    recommendations_topic: str = _setting(
        "recommendations", "Topic the flow writes one recommendation per valid event to."
    )
    dlq_topic: str = _setting("events.dlq", "Dead letters: events that failed validation.")
    events_partitions: int = _setting(4, "Partitions of the events topic when created.")
    topic_replication_factor: int = _setting(
        1,
        "Replicas of each partition of the topics `streamrec topics create` creates "
        "(managed clusters refuse 1; 3 is usual there).",
    )
    topic_min_insync_replicas: int = _setting(
        1,
        "min.insync.replicas of the topics `streamrec topics create` creates: replicas that "
        "must have a record before the flow's acks=all write succeeds (at most the factor).",
    )
    kafka_linger_ms: float = _setting(
        1.0, "Producer linger: how long a record may wait to share a request (latency vs load)."
    )

    kafka_config: str = _setting(
        "",
        "A properties file (key=value lines) of librdkafka settings every Kafka client adds "
        "(security.protocol, sasl.*, ssl.*, tuning); secrets in it are never printed.",
    )
    kafka_options: str = _setting(
        "",
        "librdkafka settings as key=value lines, applied after kafka_config "
        "(`streamrec --kafka-config KEY=VALUE` adds to them).",
    )

    # The local broker started by `streamrec kafka up`.
    kafka_version: str = _setting("4.3.1", "Apache Kafka version whose jars Maven resolves.")
    log4j_version: str = _setting("2.24.3", "log4j2 version used for the broker's logging.")
    kafka_port: int = _setting(9092, "Port of the local broker's PLAINTEXT listener.")
    kafka_controller_port: int = _setting(9093, "Port of the local broker's KRaft controller.")
    kafka_dir: Path = _setting(
        REPO_ROOT / "run" / "kafka", "Data, logs and pid file of the local broker."
    )
    kafka_jars_dir: Path = _setting(
        Path.home() / ".cache" / "streamrec" / "kafka-jars",
        "Cache of the broker's jars, shared by every checkout (reused, never re-downloaded; "
        "checked against tools/kafka_jars.sha256 before every start).",
    )
    kafka_jars_unverified: bool = _setting(
        False,
        "Run a kafka_version whose jars have no recorded digests in tools/kafka_jars.sha256 "
        "(checked by Maven's download checksums alone); off, such a version is refused.",
    )
    kafka_heap: str = _setting(
        "-Xms256m -Xmx1g", "JVM heap flags of the local broker (sized for a 2-core/24 GiB host)."
    )
    kafka_start_timeout_s: float = _setting(90.0, "How long `kafka up` waits for the broker.")

    # Data contracts.
    max_event_bytes: int = _setting(4096, "Largest accepted event payload in bytes.")

    # Data.
    data_dir: Path = _setting(
        REPO_ROOT / "data" / "ml-latest-small", "Default interaction dataset (MovieLens format)."
    )
    replay_event_time: str = _setting(
        "now",
        "Event times `streamrec replay` gives a dataset's events: now (each event's send time) "
        "or recorded (the dataset's own, each lap one dataset span later).",
    )

    # Session state.
    changelog: bool = _setting(
        True,
        "Write every committed session change to a compacted changelog topic and rebuild a "
        "shard from it when its local store is missing or behind (state that survives disks).",
    )
    state_wal: bool = _setting(
        False,
        "Keep RocksDB's write-ahead log although the changelog is on (without the changelog it "
        "is always kept). Off, a shard the process did not close cleanly is rebuilt from the "
        "changelog.",
    )
    changelog_topic: str = _setting(
        "", "The sessions' changelog topic [default: '<events_topic>.sessions-changelog']."
    )
    changelog_compression: str = _setting(
        "zstd",
        "Compression of the changelog's records: none, gzip, snappy, lz4 or zstd (librdkafka's "
        "compression.type; at least once the answers stay uncompressed). `streamrec bench "
        "changelog` compares them.",
    )
    changelog_linger_ms: float = _setting(
        20.0,
        "How long a changelog record may wait to share a compressed batch with later ones "
        "(nothing waits for it: a fuller batch compresses better).",
    )
    state_dir: Path = _setting(
        REPO_ROOT / "run" / "state", "RocksDB session stores, one per events partition."
    )
    session_length: int = _setting(50, "Interactions kept per user session (the last L).")
    session_ttl_s: float = _setting(
        30 * 24 * 3600.0, "Idle time (event time) after which a session is treated as absent."
    )
    event_time_skew_s: float = _setting(
        24 * 3600.0,
        "How far ahead of this machine's clock an event's time may be; a later one is a dead "
        "letter (bad_timestamp). Replayed history, in the past, is fine.",
    )
    # Memory, bounded in bytes.  One flow process of a 2 GB worker, 4 events partitions and two
    # variants, at the defaults: sessions 4 x 64 MB + consumed items 4 x 16 MB + exclusions
    # 2 x 32 MB + RocksDB block caches 4 x 64 MB and memtables 4 x 2 x 64 MB (RocksDB's own
    # bound) = 1,152 MB; Python, numpy, onnxruntime, Bytewax, librdkafka and the shipped model
    # (8,559 items; the online counts are fixed arrays) at rest ~140 MB (RSS of a started flow,
    # `streamrec bench memory`); librdkafka's fetch queues 4 x 64 MB: about 1.55 GB.  Not
    # bounded here: librdkafka's producer queue (1 GB by default) while the broker is slow.
    session_cache_mb: float = _setting(
        64.0,
        "Megabytes of decoded sessions per events partition kept in memory in front of "
        "RocksDB, most recently written first (a session counts its record, its item id "
        "strings as its own and ~1 kB: ~8 kB at full length with short ids, which take 3 kB, "
        "up to ~0.45 MB with hostile ones); 0 reads every session from RocksDB.",
    )
    consumed_cache_mb: float = _setting(
        16.0,
        "Megabytes of consumed-items records per events partition kept in memory (8 bytes an "
        "item and ~0.4 kB a user); 0 reads them from RocksDB on every event.",
    )
    rocksdb_block_cache_mb: float = _setting(
        64.0, "RocksDB block cache of each shard DB (one per events partition), in megabytes."
    )

    consumed_types: str = _setting(
        "purchase,rating",
        "Event types (comma separated) whose item counts as consumed: never recommended to "
        "that user again while their session lives, even beyond the last L interactions.",
    )
    consumed_cap: int = _setting(
        5000,
        "Most consumed items remembered per user (8 bytes each; the oldest leaves first); "
        "0 turns the record off.",
    )

    # Model and scoring.
    model_dir: Path = _setting(_served_artifacts(), "Trained model artifacts served by the flow.")
    model_check_s: float = _setting(
        5.0,
        "How often a running flow looks for new artifacts in model_dir (a repointed symlink, "
        "replaced files) and switches to them between micro-batches; 0: never.",
    )
    top_k: int = _setting(10, "Items per recommendation.")
    candidates: int = _setting(200, "Candidate items scored per event.")
    scoring_threads: int = _setting(1, "onnxruntime intra-op threads per scoring session.")
    train_threads: int = _setting(2, "torch and onnxruntime threads of `streamrec train`.")
    online_candidates: bool = _setting(
        True,
        "Update co-visitation and popularity counts from live events (per worker, in memory).",
    )
    online_half_life_events: int = _setting(
        1_000_000,
        "The online counts halve every this many events a worker observes (8 minutes at "
        "2,000 ev/s), so that a burst fades and new items can rise; 0: counts never decay.",
    )
    online_user_cap: int = _setting(
        500,
        "Events of one user that count in the online counts per half-life; a repeat of an "
        "item still in the user's window never counts, so one key adds at most ~10 to one "
        "item's count per half-life. 0: no cap.",
    )
    exclusion_cache_mb: float = _setting(
        32.0,
        "Megabytes of per-user consumed-item codes each model of a worker keeps (16 bytes an "
        "item and ~0.6 kB a user).",
    )

    # The dataflow.
    guarantee: str = _setting(
        "at-least-once",
        "Output delivery: at-least-once (a restart may answer an event again; downstream "
        "deduplicates by event_id) or exactly-once (each micro-batch's outputs, session changes "
        "and resume offset commit in one Kafka transaction; consumers read read_committed).",
    )
    transaction_interval_ms: float = _setting(
        100.0,
        "Exactly-once: how long each partition's transaction collects micro-batches before it "
        "commits (its answers become visible to read_committed consumers then); 0: every "
        "micro-batch, at one commit per batch and partition.",
    )
    workers: int = _setting(1, "Bytewax worker threads per process.")
    gc_freeze: bool = _setting(
        True,
        "Every few seconds, move what has lived that long (cached sessions, the model) out of "
        "Python's cyclic garbage collector, whose full scans would otherwise stall the flow.",
    )
    recovery_dir: Path = _setting(
        REPO_ROOT / "run" / "recovery", "Bytewax recovery store (snapshots and resume offsets)."
    )
    epoch_interval_s: float = _setting(
        1.0, "Bytewax epoch: snapshot interval, and the bound on work in flight (backpressure)."
    )
    # Micro-batches are the records that arrived together (one read per partition, then
    # Bytewax hands the worker's items over at once); only a busy worker waits to fill them.
    batch_max_events: int = _setting(
        32, "Most records read from one partition at a time (bounds a micro-batch's share)."
    )
    batch_fill: int = _setting(
        16,
        "A busy worker (processing over 70% of the time) lets records wait for a micro-batch "
        "of this many, which spreads each batch's fixed cost over more events; 1: never waits.",
    )
    batch_linger_ms: float = _setting(
        3.0,
        "The longest a busy worker lets a record wait for a fuller micro-batch; 0: never waits. "
        "A worker that is not busy hands every record over at once.",
    )
    metrics_port: int = _setting(9464, "Port of the flow's Prometheus metrics endpoint (0: off).")
    metrics_host: str = _setting(
        "127.0.0.1",
        "Address the metrics endpoint listens on: this machine only unless set (0.0.0.0: every "
        "interface, e.g. inside a container whose port is published).",
    )

    def __post_init__(self) -> None:
        for name in MEMORY_SETTINGS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def sessions_changelog(self) -> str:
        """The name of the sessions' changelog topic."""
        return self.changelog_topic or f"{self.events_topic}.sessions-changelog"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by ``STREAMREC_*`` variables, overridden by ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = _retired(env)
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, f.default, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """These settings as ``STREAMREC_*`` variables, for a child process (flow, benchmark)."""
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }


# Settings that were replaced: a deployment that still sets one keeps working, and is told.
RETIRED_SESSION_CACHE: Final = ENV_PREFIX + "SESSION_CACHE"
# What `STREAMREC_SESSION_CACHE` sessions were taken to be: a full session of short ids, as
# the byte bound counts it (streamrec.state.memory).
SESSION_CACHE_ENTRY_MB: Final = 8_000 / 2**20


def _retired(env: Mapping[str, str]) -> dict[str, Any]:
    """Values for the retired variables of ``env`` that nothing replaces yet, with a warning."""
    raw = env.get(RETIRED_SESSION_CACHE)
    if raw is None:
        return {}
    new_name = ENV_PREFIX + "SESSION_CACHE_MB"
    if new_name in env:
        log.warning("%s is retired and ignored: %s is set", RETIRED_SESSION_CACHE, new_name)
        return {}
    try:
        sessions = int(raw)
    except ValueError as err:
        raise ValueError(
            f"environment variable {RETIRED_SESSION_CACHE}={raw!r} is not a valid int "
            f"(the setting is retired: set {new_name} instead): {err}"
        ) from err
    mb = round(max(sessions, 0) * SESSION_CACHE_ENTRY_MB, 1)
    log.warning(
        "%s=%s (a count of sessions) is retired: the cache is bounded in bytes now. Taken as "
        "%s=%g (sessions of about 8 kB as counted); set %s instead",
        RETIRED_SESSION_CACHE,
        raw,
        new_name,
        mb,
        new_name,
    )
    return {"session_cache_mb": mb}


def _convert(name: str, default: Any, raw: str) -> Any:
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(default, Path):
            return Path(raw).expanduser()
        return type(default)(raw)
    except ValueError as err:
        raise ValueError(
            f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid "
            f"{type(default).__name__}: {err}"
        ) from err


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default, meaning) for every setting, for `streamrec config`."""
    return [
        (ENV_PREFIX + f.name.upper(), str(f.default), f.metadata["help"])
        for f in dataclasses.fields(Settings)
    ]
