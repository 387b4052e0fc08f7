"""Headline snapshots from real HTTP scrapes, the histogram quantile, the PNG report, metrics off."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from opengem.ops import headline, report


def test_scrape_aggregates_a_live_endpoint_and_formats_it():
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    reg = CollectorRegistry()
    imp = Counter("opengem_ads_impressions_total", "x", ["surface"], registry=reg)
    lag = Gauge("opengem_kafka_consumer_lag_records", "x", ["group", "topic", "partition"], registry=reg)
    ne = Gauge("opengem_live_ne", "x", ["surface", "task", "model_version"], registry=reg)
    imp.labels("feed").inc(1000)
    imp.labels("reels").inc(10)
    for p, n in ((0, 5), (1, 7)):
        lag.labels("opengem-train", "opengem.examples", str(p)).set(n)
    ne.labels("feed", "click", "00000004").set(0.91)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=reg)
    try:
        port = server.server_address[1]
        snap, down = headline.scrape([f"127.0.0.1:{port}", "127.0.0.1:1"])
    finally:
        server.shutdown()
    assert down == ["127.0.0.1:1"]
    assert snap["impressions"] == {"feed": 1000.0, "reels": 10.0}
    assert snap["lag"] == {"opengem-train/opengem.examples": 12.0}  # summed over partitions
    assert snap["live_ne"] == {"feed/click": 0.91}
    assert snap["live_version"] == {"00000004": 0.91}
    text = headline.format_headline(snap, down=down)
    assert "1,000" in text and "0.910" in text and "opengem-train/opengem.examples=12" in text
    assert "unreachable: 127.0.0.1:1" in text


def test_quantile_from_buckets_matches_promql_interpolation():
    b = {"0.01": 300.0, "0.05": 540.0, "0.1": 600.0, "+Inf": 600.0}
    assert headline.quantile_from_buckets(b, 0.99) == pytest.approx(0.095)  # as promtool's test expects
    assert headline.quantile_from_buckets(b, 0.5) == pytest.approx(0.01 * 300 / 300)
    assert math.isnan(headline.quantile_from_buckets({"+Inf": 0.0}, 0.99))


def test_report_renders_a_timeline_and_round_trips_the_run_json(tmp_path):
    timeline = []
    for i in range(6):
        t = 1_000.0 + 5 * i
        timeline.append((t, {
            "impressions": {"feed": 100.0 * i, "reels": 40.0 * i},
            "ctr": {"feed": 0.02 + 0.001 * i, "reels": 0.03},
            "cvr": {"feed": 0.1},
            "live_ne": {"feed/click": 0.95 - 0.01 * i},
            "train_ne": {"feed/click": 0.9},
            "live_calibration": {"feed/click": 1.1},
            "live_auc": {"feed/click": 0.7},
            "model_published": {"": 990.0},
            "lag": {"opengem-train/opengem.examples": float(i)},
            "serve_latency_bucket": {"0.01": 10.0 * i, "0.05": 20.0 * i, "+Inf": 20.0 * i},
        }))
    path = report.save_run(tmp_path / "run.json", timeline, {"note": "test"})
    assert report.load_run(path) == timeline
    png = report.render(report.load_run(path), tmp_path / "r.png")
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 500 and img.shape[1] > 1000
    with pytest.raises(ValueError, match="at least 2"):
        report.render(timeline[:1], tmp_path / "x.png")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an opengem run"):
        report.load_run(tmp_path / "bad.json")


def test_metrics_off_records_nothing():
    code = ("from opengem.ops import metrics as m; m.SERVE_REQUESTS.labels('OK').inc(); "
            "m.SERVE_SECONDS.observe(0.1); print(m.enabled(), sum(s.value for f in m.REGISTRY.collect() "
            "for s in f.samples if s.name == 'opengem_serve_requests_total'))")
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OPENGEM_METRICS": "off", "PATH": ""})
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PATH": ""})
    assert off.stdout.split() == ["False", "0"]
    assert on.stdout.split() == ["True", "1.0"]
