"""One metrics module for every opengem daemon (prometheus-client).

Names follow Prometheus conventions: ``opengem_`` prefix, base units
(seconds, bytes), ``_total`` for counters, histograms for latencies. Labels stay
low-cardinality: surface, task, reason, partition, model version — never user
or ad ids.

Each daemon serves its registry over HTTP on 127.0.0.1 by default
(:func:`serve`); scrape configs live in ``ops/prometheus/``.
"""

from __future__ import annotations

import threading
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

# -- stream worker ------------------------------------------------------------------------------
STREAM_RECORDS = Counter("opengem_stream_records_total", "Kafka records consumed from opengem.events",
                         ["partition"], registry=REGISTRY)
STREAM_EVENTS = Counter("opengem_stream_events_total", "Valid events appended to the sequence store",
                        ["partition"], registry=REGISTRY)
STREAM_DLQ = Counter("opengem_stream_dlq_records_total",
                     "Records (or rows of Arrow batches) sent to the dead-letter topic", ["reason"],
                     registry=REGISTRY)
STREAM_BATCH_SECONDS = Histogram("opengem_stream_batch_seconds",
                                 "Wall time to ingest one batch (decode, DLQ, store, joiner, examples)",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                 registry=REGISTRY)
STORE_OFFSET = Gauge("opengem_store_applied_offset", "Last Kafka offset applied to the partition's store",
                     ["partition"], registry=REGISTRY)
STORE_BYTES = Gauge("opengem_store_bytes", "Bytes on disk of the partition's store (SST + WAL)",
                    ["partition"], registry=REGISTRY)

# -- label joiner -------------------------------------------------------------------------------
JOINER_EXAMPLES = Counter("opengem_joiner_examples_total", "Labelled examples produced to opengem.examples",
                          ["surface"], registry=REGISTRY)
JOINER_LABELS = Counter("opengem_joiner_positive_labels_total", "Positive labels in produced examples",
                        ["surface", "task"], registry=REGISTRY)
JOINER_EVENTS = Gauge("opengem_joiner_events", "Joiner counters (late, orphan, duplicate, … clicks and "
                      "conversions), per kind of outcome, summed over this worker's partitions", ["outcome"],
                      registry=REGISTRY)
JOINER_PENDING = Gauge("opengem_joiner_pending_impressions", "Impressions waiting for their windows to close",
                       registry=REGISTRY)

# -- continuous trainer (model/trainer.py; rank 0 serves the model-wide figures) ----------------
TRAIN_EXAMPLES = Counter("opengem_train_examples_total", "Examples trained on (after deduplication)",
                         ["surface"], registry=REGISTRY)
TRAIN_STEPS = Counter("opengem_train_steps_total", "Optimizer steps", registry=REGISTRY)
TRAIN_DUPLICATES = Counter("opengem_train_duplicate_examples_total",
                           "Examples dropped as re-sends of an example already trained on", registry=REGISTRY)
TRAIN_BAD_RECORDS = Counter("opengem_train_bad_records_total", "Undecodable opengem.examples records skipped",
                            registry=REGISTRY)
TRAIN_BATCH_SECONDS = Histogram("opengem_train_batch_seconds",
                                "Wall time of one step: store reads, batch, predict, backward, update",
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                registry=REGISTRY)
TRAIN_EXAMPLES_PER_SECOND = Gauge("opengem_train_examples_per_second",
                                  "Examples trained per second over the last report interval", registry=REGISTRY)
TRAIN_EXAMPLE_DELAY = Histogram("opengem_train_example_delay_seconds",
                                "From an example's record entering Kafka to the step that trains on it",
                                buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
TRAIN_LAG = Gauge("opengem_train_consumer_lag_records", "opengem.examples records not yet trained on",
                  ["partition"], registry=REGISTRY)
# Progressive validation: every example is scored before the model trains on it.
TRAIN_NE = Gauge("opengem_train_ne", "Progressive normalized entropy over the sliding window",
                 ["surface", "task"], registry=REGISTRY)
TRAIN_AUC = Gauge("opengem_train_auc", "Progressive AUC over the sliding window", ["surface", "task"],
                  registry=REGISTRY)
TRAIN_CALIBRATION = Gauge("opengem_train_calibration", "Mean prediction / observed rate over the window",
                          ["surface", "task"], registry=REGISTRY)
TRAIN_LOG_LOSS = Gauge("opengem_train_log_loss", "Progressive log loss over the sliding window",
                       ["surface", "task"], registry=REGISTRY)
TRAIN_LABEL_RATE = Gauge("opengem_train_label_rate", "Observed positive rate over the sliding window",
                         ["surface", "task"], registry=REGISTRY)
TRAIN_MODEL_VERSION = Gauge("opengem_train_published_version", "Number of the last published model version",
                            registry=REGISTRY)
TRAIN_MODEL_AGE = Gauge("opengem_train_model_age_seconds", "Seconds since the last model version was published",
                        registry=REGISTRY)
TRAIN_CHECKPOINT_STEP = Gauge("opengem_train_checkpoint_step", "Step of the last complete checkpoint",
                              registry=REGISTRY)

# -- ranking server (serving/) ------------------------------------------------------------------
SERVE_REQUESTS = Counter("opengem_serve_requests_total", "Rank requests answered, by gRPC status code",
                         ["code"], registry=REGISTRY)
SERVE_SECONDS = Histogram("opengem_serve_request_seconds",
                          "Wall time of one Rank request in the server: validate, store read, featurize, score",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                          registry=REGISTRY)
SERVE_CANDIDATES = Histogram("opengem_serve_candidates", "Candidates per Rank request",
                             buckets=(1, 10, 50, 100, 250, 500, 1000, 2000), registry=REGISTRY)
SERVE_MODEL = Gauge("opengem_serve_model_info", "The served model version (value 1)", ["version", "kind"],
                    registry=REGISTRY)
SERVE_SWAPS = Counter("opengem_serve_model_loads_total",
                      "Published versions the server loaded (loaded) or refused after validation (rejected)",
                      ["outcome"], registry=REGISTRY)
SERVE_LOAD_SECONDS = Gauge("opengem_serve_model_load_seconds", "Load + canary validation time of the last version",
                           registry=REGISTRY)

_server_lock = threading.Lock()
_servers: dict[tuple[str, int], object] = {}


def serve(port: int, host: str = "127.0.0.1", fallback: bool = True) -> int:
    """Serve REGISTRY at http://host:port/metrics (port 0: a free one). Returns the port.

    ``fallback``: if ``port`` is taken (a second daemon on one machine), take a free one.
    """
    with _server_lock:
        key = (host, port)
        if port and key in _servers:
            return port
        try:
            server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError:
            if not fallback or port == 0:
                raise
            server, _thread = start_http_server(0, addr=host, registry=REGISTRY)
        real = server.server_address[1]
        _servers[(host, real)] = server
        return real


def observe_examples(examples: Iterable) -> None:
    """Count produced examples and their positive labels, by surface."""
    for ex in examples:
        JOINER_EXAMPLES.labels(ex.surface).inc()
        if ex.click:
            JOINER_LABELS.labels(ex.surface, "click").inc()
        if ex.conversion:
            JOINER_LABELS.labels(ex.surface, "conversion").inc()
