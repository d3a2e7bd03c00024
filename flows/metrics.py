"""The flow's own Prometheus metrics, and the endpoint that serves them.

``serve`` runs the Prometheus client's own HTTP server on the address the
settings name (127.0.0.1 unless configured).  Bytewax's API server is not
used: Bytewax 0.21 binds it to every interface with no way to choose, and it
serves nothing of ours that the Python registry does not (its per-step
timings are the only loss; the flow's stage histograms below cover them).
"""

from __future__ import annotations

import errno
import gc
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Stage durations are sub-millisecond to tens of milliseconds.
_STAGE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

EVENTS = Counter("streamrec_events_total", "Valid events processed (duplicates included).")
DUPLICATES = Counter(
    "streamrec_duplicates_skipped_total",
    "Events already applied (read again after a restart): not applied again, answered from "
    "the session as of the event.",
)
DEAD_LETTERS = Counter(
    "streamrec_dead_letters_total", "Records sent to the dead-letter topic, by reason.", ["code"]
)
FORGOTTEN = Counter("streamrec_users_forgotten_total", "Users erased on request.")
FORGETS_FOUND_NOTHING = Counter(
    "streamrec_forgets_found_nothing_total",
    "Forget requests for a user the shard held no record of (never seen, expired, or erased "
    "already): nothing to erase.",
)
FORGETS_REPLAYED = Counter(
    "streamrec_forgets_replayed_total",
    "Forget requests read again after a restart, applied before: not applied again, so the "
    "user's later events stay.",
)
EXPIRED = Counter("streamrec_sessions_expired_total", "Idle sessions removed by the sweep.")
CONSUMER_ERRORS = Counter(
    "streamrec_consumer_errors_total",
    "Errors the events consumer reported (it retries by itself), by librdkafka error name.",
    ["error"],
)
EVENTS_NEVER_READ = Counter(
    "streamrec_events_lost_to_retention_total",
    "Events deleted by the topic's retention before the flow resumed to read them.",
)
QUARANTINED = Counter(
    "streamrec_sessions_quarantined_total",
    "Unreadable session records moved aside; their users started afresh.",
)
SHARDS_REBUILT = Counter(
    "streamrec_shards_rebuilt_total",
    "Shards rebuilt from the changelog because their local store was missing or behind it.",
)
RECOMMENDATIONS = Counter("streamrec_recommendations_total", "Recommendations emitted.")
SESSION_READS = Counter(
    "streamrec_session_reads_total",
    "Session reads by where they were served from: the in-memory cache or RocksDB.",
    ["source"],
)
BATCH_SIZE = Histogram(
    "streamrec_batch_events",
    "Events scored together in one micro-batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
STAGE_SECONDS = Histogram(
    "streamrec_stage_seconds",
    "Processing time per micro-batch and stage (parse, state, score, emit).",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
PARSE_SECONDS = STAGE_SECONDS.labels("parse")
STATE_SECONDS = STAGE_SECONDS.labels("state")
SCORE_SECONDS = STAGE_SECONDS.labels("score")
EMIT_SECONDS = STAGE_SECONDS.labels("emit")
OUTPUT_FAILURES = Counter(
    "streamrec_output_failures_total",
    "Output records Kafka did not take, by librdkafka error and what the sink did: retried, "
    "dead_lettered (a refused recommendation), stubbed (a refused dead letter), dropped (a "
    "refused stub, logged) or new_producer (a fatal producer error).",
    ["code", "action"],
)
OUTPUT_BLOCKED = Gauge(
    "streamrec_output_blocked",
    "Workers whose output Kafka has not taken for a while; their reading waits meanwhile.",
)
TRANSACTION_SECONDS = Histogram(
    "streamrec_transaction_seconds",
    "Exactly-once mode: time to commit one partition's micro-batch transaction (outputs, "
    "session changes and resume offset), retries included.",
    buckets=_STAGE_BUCKETS,
)
TRANSACTIONS_ABORTED = Counter(
    "streamrec_transactions_aborted_total",
    "Exactly-once mode: transactions Kafka aborted (an outage, a refused record); each is "
    "made again.",
)
MODELS_SERVING = Gauge(
    "streamrec_model_serving",
    "1 for each model variant and version this process serves now (version: the ONNX file's "
    "sha256 prefix, as in each recommendation's 'model' field).",
    ["variant", "version"],
)
MODEL_WATCH_FAILURES = Counter(
    "streamrec_model_watch_failures_total",
    "Looks at the model directory that failed unexpectedly; the watcher looks again later.",
)
MODELS_REFUSED = Counter(
    "streamrec_model_refused_total",
    "New model versions a running flow refused, still serving the old one, by reason: "
    "digest, missing, unlisted, outside, not_sealed, malformed (checked against the "
    "directory's manifest.json), unservable (anything else that stops it loading).",
    ["reason"],
)
GC_PAUSE_SECONDS = Histogram(
    "streamrec_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector in the flow process, by generation: a full "
    "(generation 2) collection scans every tracked object, the cached sessions included.",
    ["generation"],
    buckets=_STAGE_BUCKETS,
)
SWEEP_SECONDS = STAGE_SECONDS.labels("sweep")


def observe_gc_pauses() -> None:
    """Time every collection of the cyclic garbage collector into ``GC_PAUSE_SECONDS``."""
    started = [0.0]
    by_generation = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_generation[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)


class MetricsEndpointError(OSError):
    """The metrics endpoint could not listen; ``retryable`` when the port is only taken."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def serve(host: str, port: int) -> WSGIServer:
    """Serve the default registry on ``http://host:port/metrics``, from a daemon thread.

    A port in use may free itself (an old process still stopping): retryable.
    An address this machine does not have, or a host name that does not
    resolve, will not fix itself: a configuration error.
    """
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        reason = "is taken by another process" if taken else f"cannot be listened on ({err})"
        raise MetricsEndpointError(
            f"the metrics endpoint {host}:{port} {reason}; choose another with "
            "STREAMREC_METRICS_HOST / --metrics-port (0: off)",
            retryable=taken,
        ) from err
    return server
