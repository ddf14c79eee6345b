"""The Prometheus metric families of every onebox process, and adding many observations at once.

Every process creates the same families at import. Under ``onebox serve`` each process has
``PROMETHEUS_MULTIPROC_DIR`` in its environment before prometheus_client is imported (the
launcher sets it), so every value lives in that directory's memory-mapped files, one set per
process id, and a scrape adds them up (serving.metrics.exposition). Imported without it (a test
building the Flask app in-process) the values live in this process and :data:`REGISTRY` holds
them.

Labels: ``model``, ``device`` (the host's device: ``cpu``, ``cuda0``, ...), ``status`` (the HTTP
status as a string), and ``role`` (``frontend`` or ``host``) for the process families.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: seconds: from well under a millisecond (a CUDA graph replay) to the 60 s default deadline
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, float("inf"))  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, float("inf"))
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))

REGISTRY = CollectorRegistry(auto_describe=True)

# -- frontends: every invocation (POST /invocations, POST /models/<name>/invoke) --------------
REQUESTS = Counter(
    "onebox_requests", "Invocations answered, by model and HTTP status", ["model", "status"],
    registry=REGISTRY,
)  # fmt: skip
REQUEST_SECONDS = Histogram(
    "onebox_request_duration_seconds",
    "An invocation end to end in a frontend: its body read to its response handed to the socket",
    ["model", "status"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
MODEL_SECONDS = Histogram(
    "onebox_request_model_seconds",
    "Of an invocation that reached a model host, the host call: sent to answer back (CloudWatch ModelLatency)",
    ["model"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
OVERHEAD_SECONDS = Histogram(
    "onebox_request_overhead_seconds",
    "An invocation's time in the frontend outside the host call (CloudWatch OverheadLatency)",
    ["model"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip

# -- model hosts: every batch, load and unload -------------------------------------------------
BATCH_SIZE = Histogram(
    "onebox_batch_size", "Rows in each batch a model ran (padding excluded)", ["model", "device"],
    buckets=BATCH_BUCKETS, registry=REGISTRY,
)  # fmt: skip
BATCH_PADDING = Counter(
    "onebox_batch_padding_rows", "Rows added to batches to reach a compiled batch size", ["model", "device"],
    registry=REGISTRY,
)  # fmt: skip
QUEUE_SECONDS = Histogram(
    "onebox_queue_seconds", "A request's wait in the model's queue, from arrival to its batch's start",
    ["model", "device"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
COMPUTE_SECONDS = Histogram(
    "onebox_compute_seconds", "A batch in the runner, from its start to its outputs back", ["model", "device"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
QUEUE_DEPTH = Gauge(
    "onebox_queue_depth", "Requests waiting in the model's queue (sampled every second)", ["model", "device"],
    multiprocess_mode="livesum", registry=REGISTRY,
)  # fmt: skip
MODELS_LOADED = Gauge(
    "onebox_models_loaded", "Models ready on the device's host", ["device"],
    multiprocess_mode="livemax", registry=REGISTRY,
)  # fmt: skip
LOAD_SECONDS = Histogram(
    "onebox_model_load_seconds", "Model loads (warm-up included), by outcome as an HTTP status",
    ["model", "device", "status"], buckets=LOAD_BUCKETS, registry=REGISTRY,
)  # fmt: skip
UNLOAD_SECONDS = Histogram(
    "onebox_model_unload_seconds", "Model unloads (queued requests answered first)", ["model", "device"],
    buckets=LOAD_BUCKETS, registry=REGISTRY,
)  # fmt: skip
HOST_RESTARTS = Counter(
    "onebox_host_restarts", "Model host processes started again after one died", ["device"],
    registry=REGISTRY,
)  # fmt: skip

# -- every process ---------------------------------------------------------------------------
CPU_SECONDS = Counter(
    "onebox_process_cpu_seconds", "CPU time of onebox's processes (user + system)", ["role", "device"],
    registry=REGISTRY,
)  # fmt: skip
RESIDENT_BYTES = Gauge(
    "onebox_process_resident_memory_bytes", "Resident memory of onebox's live processes", ["role", "device"],
    multiprocess_mode="livesum", registry=REGISTRY,
)  # fmt: skip


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """The histogram bucket ``value`` falls in (the first bound it does not exceed)."""
    return bisect_left(bounds, value)


def add_observations(child, counts: Sequence[int], total: float) -> None:
    """Add to a labelled Histogram ``counts[i]`` observations in bucket ``i``, summing to ``total``.

    What ``observe`` does once per value, done once per bucket: a frontend counts its requests
    in plain memory and adds them here once a second, instead of taking a histogram's locks (and,
    multiprocess, writing its files) on every request. It uses prometheus_client's per-bucket
    values (``_buckets``, ``_sum``; stable since 0.4, the version is pinned in
    build/requirements, and tests/metrics/test_families.py checks it against ``observe``).
    """
    for i, n in enumerate(counts):
        if n:
            child._buckets[i].inc(n)
    child._sum.inc(total)
