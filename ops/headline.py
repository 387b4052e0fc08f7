"""The headline metrics: one spec, read from the daemons' endpoints or from Prometheus.

A *snapshot* is ``{key: {label-tuple-as-string: value}}`` for the keys of
:data:`HEADLINE`, each a metric aggregated by a few labels. It is read either
by scraping the daemons' ``/metrics`` endpoints (:func:`scrape`; what
``opengem metrics`` and the demo do) or from Prometheus's HTTP API
(:func:`from_prometheus`: instant queries, or a range for ``opengem report``),
with the same aggregation, so one formatter (:func:`format_headline`) and one
plotter (:mod:`opengem.ops.report`) serve both. Derived figures (CTR from
counters, p99 latency from histogram buckets, model age) are computed from
snapshots, never stored.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterable

# The daemons' default endpoints (ops/prometheus/targets/*.json has the same).
DEFAULT_TARGETS = ("127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103", "127.0.0.1:9104")


@dataclass(frozen=True)
class Item:
    key: str
    metric: str  # a sample name as exposed (counters with _total, histogram buckets with _bucket)
    by: tuple[str, ...]  # labels kept; every other label is aggregated
    agg: str = "sum"  # sum | max


HEADLINE: tuple[Item, ...] = (
    Item("impressions", "opengem_ads_impressions_total", ("surface",)),
    Item("clicks", "opengem_ads_clicks_total", ("surface",)),
    Item("conversions", "opengem_ads_conversions_total", ("surface",)),
    Item("ctr", "opengem_ads_ctr", ("surface",), "max"),
    Item("cvr", "opengem_ads_cvr", ("surface",), "max"),
    Item("live_ne", "opengem_live_ne", ("surface", "task"), "max"),
    Item("live_auc", "opengem_live_auc", ("surface", "task"), "max"),
    Item("live_calibration", "opengem_live_calibration", ("surface", "task"), "max"),
    Item("live_window", "opengem_live_window_examples", ("surface", "task"), "max"),
    Item("live_version", "opengem_live_ne", ("model_version",), "max"),
    Item("model_published", "opengem_live_model_published_timestamp_seconds", (), "max"),
    Item("train_ne", "opengem_train_ne", ("surface", "task"), "max"),
    Item("train_examples_per_s", "opengem_train_examples_per_second", ()),
    Item("train_version", "opengem_train_published_version", (), "max"),
    Item("events", "opengem_stream_events_total", ()),
    Item("store_bytes", "opengem_store_bytes", ()),
    Item("dlq", "opengem_stream_dlq_records_total", ("reason",)),
    Item("lag", "opengem_kafka_consumer_lag_records", ("group", "topic")),
    Item("serve_requests", "opengem_serve_requests_total", ("code",)),
    Item("serve_latency_bucket", "opengem_serve_request_seconds_bucket", ("le",)),
)
BY_KEY = {it.key: it for it in HEADLINE}

Snapshot = dict[str, dict[str, float]]


def label_key(values: Iterable[str]) -> str:
    return "/".join(values)


# --------------------------------------------------------------------------- reading


def _aggregate(samples: Iterable[tuple[str, dict[str, str], float]]) -> Snapshot:
    """(sample name, labels, value) -> snapshot, aggregating as HEADLINE says."""
    by_metric: dict[str, list[Item]] = {}
    for it in HEADLINE:
        by_metric.setdefault(it.metric, []).append(it)
    out: Snapshot = {}
    for name, labels, value in samples:
        for it in by_metric.get(name, ()):
            k = label_key(labels.get(lbl, "") for lbl in it.by)
            cell = out.setdefault(it.key, {})
            if k not in cell:
                cell[k] = value
            elif it.agg == "sum":
                cell[k] += value
            elif not math.isnan(value) and (math.isnan(cell[k]) or value > cell[k]):
                cell[k] = value
    return out


def scrape(targets: Iterable[str], timeout_s: float = 5.0) -> tuple[Snapshot, list[str]]:
    """Scrape ``host:port`` endpoints over HTTP; returns the snapshot and the unreachable targets."""
    from prometheus_client.parser import text_string_to_metric_families

    samples, down = [], []
    for t in targets:
        url = t if t.startswith("http") else f"http://{t}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            down.append(t)
            continue
        for fam in text_string_to_metric_families(text):
            samples.extend((s.name, s.labels, s.value) for s in fam.samples)
    return _aggregate(samples), down


def _promql(it: Item) -> str:
    return f"{it.agg} by ({', '.join(it.by)}) ({it.metric})" if it.by else f"{it.agg}({it.metric})"


def prom_get(base_url: str, path: str, params: dict[str, str], timeout_s: float = 10.0) -> list[dict]:
    """GET a Prometheus API endpoint; returns ``data.result`` (raises on an error status)."""
    url = f"{base_url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus {path} {params}: {body.get('error', body)}")
    return body["data"]["result"]


def from_prometheus(base_url: str) -> Snapshot:
    """The headline as Prometheus has it now (instant queries)."""
    out: Snapshot = {}
    for it in HEADLINE:
        for r in prom_get(base_url, "/api/v1/query", {"query": _promql(it)}):
            out.setdefault(it.key, {})[label_key(r["metric"].get(lbl, "") for lbl in it.by)] = float(r["value"][1])
    return out


def timeline_from_prometheus(base_url: str, start: float, end: float, step_s: float) -> list[tuple[float, Snapshot]]:
    """The headline at every ``step_s`` from ``start`` to ``end`` (Unix seconds), oldest first."""
    at: dict[float, Snapshot] = {}
    params = {"start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s}s"}
    for it in HEADLINE:
        for r in prom_get(base_url, "/api/v1/query_range", {"query": _promql(it), **params}):
            k = label_key(r["metric"].get(lbl, "") for lbl in it.by)
            for t, v in r["values"]:
                at.setdefault(float(t), {}).setdefault(it.key, {})[k] = float(v)
    return sorted(at.items())


# --------------------------------------------------------------------------- derived figures


def quantile_from_buckets(buckets: dict[str, float], q: float) -> float:
    """The q-quantile of a Prometheus histogram's cumulative buckets (linear within a bucket,
    as PromQL's histogram_quantile); NaN without observations."""
    bs = sorted((float(le), n) for le, n in buckets.items())
    if not bs or bs[-1][1] <= 0:
        return math.nan
    rank = q * bs[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in bs:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1.0)
        prev_le, prev_n = le, n
    return prev_le


def bucket_delta(new: dict[str, float], old: dict[str, float] | None) -> dict[str, float]:
    if not old:
        return dict(new)
    return {le: n - old.get(le, 0.0) for le, n in new.items()}


def format_headline(snap: Snapshot, now: float | None = None, down: Iterable[str] = ()) -> str:
    """The headline as a few text tables (``opengem metrics``, the demo's summary)."""
    now = time.time() if now is None else now
    get = lambda key: snap.get(key, {})  # noqa: E731
    lines = []
    surfaces = sorted(set(get("impressions")) | set(get("ctr")))
    if surfaces:
        lines.append(f"  {'surface':<11}{'impressions':>12}{'clicks':>9}{'conv.':>7}{'CTR':>8}{'CVR':>8}"
                     f"{'NE click':>10}{'NE conv.':>10}{'AUC click':>11}{'cal. click':>11}")
        for s in surfaces:
            def f(key: str, task: str | None = None, fmt: str = "{:.3f}") -> str:
                v = get(key).get(label_key((s, task)) if task else s)
                return "-" if v is None or v != v else fmt.format(v)

            lines.append(f"  {s:<11}{f('impressions', fmt='{:,.0f}'):>12}{f('clicks', fmt='{:,.0f}'):>9}"
                         f"{f('conversions', fmt='{:,.0f}'):>7}{f('ctr', fmt='{:.2%}'):>8}{f('cvr', fmt='{:.2%}'):>8}"
                         f"{f('live_ne', 'click'):>10}{f('live_ne', 'conversion'):>10}{f('live_auc', 'click'):>11}"
                         f"{f('live_calibration', 'click'):>11}")
    facts = []
    versions = [v for v in get("live_version") if v]
    if versions:
        facts.append(f"served model {versions[0]}")
    pub = get("model_published").get("")
    if pub is not None and pub > 0:  # 0: the monitor has no served version yet
        facts.append(f"published {now - pub:,.0f}s ago")
    elif pub is not None:
        facts.append("no served model version yet")
    if get("train_version"):
        facts.append(f"trainer published #{get('train_version')[''] :.0f}")
    if get("train_examples_per_s"):
        facts.append(f"training {get('train_examples_per_s')[''] :,.0f} examples/s")
    if facts:
        lines.append("  " + ", ".join(facts))
    sys_facts = []
    ev, sb = get("events").get(""), get("store_bytes").get("")
    if ev:
        sys_facts.append(f"events ingested {ev:,.0f}" + (f" ({sb / ev:.1f} bytes/event)" if sb else ""))
    if get("dlq"):
        sys_facts.append("DLQ " + ", ".join(f"{r}={n:,.0f}" for r, n in sorted(get("dlq").items())))
    if get("lag"):
        sys_facts.append("lag " + ", ".join(f"{g}={n:,.0f}" for g, n in sorted(get("lag").items())))
    reqs = get("serve_requests")
    if reqs:
        p99 = quantile_from_buckets(get("serve_latency_bucket"), 0.99)
        sys_facts.append(f"served {sum(reqs.values()):,.0f} requests ("
                         + ", ".join(f"{c}={n:,.0f}" for c, n in sorted(reqs.items()))
                         + (f"), p99 {p99 * 1000:.1f} ms since start" if p99 == p99 else ")"))
    if sys_facts:
        lines.append("  " + "; ".join(sys_facts))
    if down:
        lines.append("  unreachable: " + ", ".join(down))
    return "\n".join(lines) if lines else "  no opengem metrics found"
