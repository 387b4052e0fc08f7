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
