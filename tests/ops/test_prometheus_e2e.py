"""A real Prometheus server, with the shipped configuration and rules, scraping a short run.

The run: embedded broker + simulator + stream worker (its own process) +
`opengem monitor` (its own process) + the ranking server (in this process,
answering a few Rank calls), all on free ports; Prometheus finds them through
the shipped config's target files. The test reads ``opengem.examples``
itself, counts impressions, clicks and conversions per surface, scores every
example with the published version through the trainer's read path, and
checks Prometheus's answers against those figures: the funnel exactly, the
served model's NE / calibration / rates to float precision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from opengem.ops import metrics, promserver

pytestmark = pytest.mark.integration

TOPICS = ("opengem.events", "opengem.examples", "opengem.events.dlq")


def _need_prometheus() -> None:
    if promserver.binary() is None:
        pytest.skip("prometheus is not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run installs it)")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OPENGEM_BOOTSTRAP", None)
    return env


def _query(url: str, expr: str) -> dict[tuple, float]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return {tuple(sorted(x["metric"].items())): float(x["value"][1]) for x in body["data"]["result"]}


def _by(url: str, expr: str, *labels: str) -> dict:
    return {tuple(dict(k)[lbl] for lbl in labels) if len(labels) > 1 else dict(k)[labels[0]]: v
            for k, v in _query(url, expr).items()}


def _wait(what: str, fn, timeout_s: float, procs=()) -> object:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for p, log in procs:
            assert p.poll() is None, f"{log.name} died: {log.read_text()[-2000:]}"
        ok, last = fn()
        if ok:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_examples(bootstrap: str) -> list:
    from kafka import KafkaConsumer

    from opengem.stream.broker import high_watermarks
    from opengem.stream.joiner import decode_examples

    hw = high_watermarks(bootstrap, "opengem.examples")
    c = KafkaConsumer("opengem.examples", bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                      enable_auto_commit=False)
    n, out = 0, {}
    deadline = time.monotonic() + 60
    try:
        while n < sum(hw.values()) and time.monotonic() < deadline:
            for msgs in c.poll(timeout_ms=300).values():
                for m in msgs:
                    n += 1
                    for ex in decode_examples(m.value):
                        out[ex.example_id] = ex  # the worker may re-send: count once
    finally:
        c.close()
    assert n == sum(hw.values())
    return list(out.values())


def test_prometheus_scrapes_the_funnel_and_the_served_models_quality(tmp_path):
    # Queries name the job: the server runs in this pytest process, whose registry also
    # holds whatever earlier in-process tests counted.
    _need_prometheus()
    import torch

    from opengem import config as cfgmod
    from opengem.features.sharded import ShardedReader
    from opengem.model.config import preset
    from opengem.model.data import examples_batch
    from opengem.model.gem import GemModel
    from opengem.model.metrics import summarize
    from opengem.model.registry import load, publish
    from opengem.serving.client import RankClient
    from opengem.serving.server import Service
    from opengem.stream.broker import EmbeddedBroker, high_watermarks
    from opengem.stream.producer import EventProducer
    from opengem.stream.simulator import SimConfig, Simulator

    data = tmp_path / "data"
    conf = tmp_path / "opengem.toml"
    conf.write_text("[monitor]\nreport_interval_s = 0.5\nlag_interval_s = 1.0\nbatch_size = 256\n")
    cfg = cfgmod.load(conf, data_dir=str(data))
    torch.manual_seed(0)
    version = publish(cfg.serve.models_path(data), GemModel(preset("tiny")), {"note": "test"}).name
    ports = {job: promserver.free_port() for job in ("stream", "serve", "monitor")}
    procs = []
    with EmbeddedBroker(port=0, topics=TOPICS, partitions=4) as b:
        boot = b.bootstrap
        common = ["--config", str(conf), "--bootstrap", boot, "--data-dir", str(data)]
        wlog, mlog = tmp_path / "stream.log", tmp_path / "monitor.log"
        worker = subprocess.Popen([sys.executable, "-m", "opengem.cli", "stream", *common, "--click-window", "300",
                                   "--conversion-window", "7200", "--metrics-port", str(ports["stream"])],
                                  stdout=open(wlog, "ab"), stderr=subprocess.STDOUT, env=_env())
        procs.append((worker, wlog))
        monitor = subprocess.Popen([sys.executable, "-m", "opengem.cli", "monitor", *common, "--start", "earliest",
                                    "--metrics-port", str(ports["monitor"])],
                                   stdout=open(mlog, "ab"), stderr=subprocess.STDOUT, env=_env())
        procs.append((monitor, mlog))
        svc = Service(cfg)
        ends = svc.start(metrics_port=ports["serve"])
        prom_dir = tmp_path / "prometheus"
        prom_cfg = promserver.prepare(prom_dir, {"opengem-stream": [f"127.0.0.1:{ports['stream']}"],
                                                 "opengem-serve": [f"127.0.0.1:{ports['serve']}"],
                                                 "opengem-monitor": [f"127.0.0.1:{ports['monitor']}"]},
                                      scrape_interval_s=1)
        try:
            with promserver.PrometheusServer(prom_cfg, prom_dir / "tsdb") as prom, \
                    EventProducer(boot, "opengem.events", fmt="arrow") as prod:
                for batch in Simulator(SimConfig(seed=11, n_users=2000, events_per_second=2.0)).record_batches(30_000, batch_size=8192):
                    prod.send_batch(batch)
                prod.flush()
                # The worker stored every event and produced its examples; nothing more is coming.
                events_end = sum(high_watermarks(boot, "opengem.events").values())
                _wait("all events ingested", lambda: (
                    (got := sum(_by(prom.url, 'sum by (job) (opengem_stream_records_total{job="opengem-stream"})', "job").values()))
                    >= events_end, got), 120, procs)
                ex_end = _wait("examples topic settled", _settled(boot), 60, procs)
                examples = _read_examples(boot)
                assert examples and ex_end > 0

                # Rank calls: the serving metrics count them. The counter lives in this process's
                # registry, which earlier tests in the same pytest run may have counted into.
                def served() -> dict[str, float]:
                    return {m.labels["code"]: m.value for fam in metrics.REGISTRY.collect()
                            if fam.name == "opengem_serve_requests" for m in fam.samples
                            if m.name == "opengem_serve_requests_total"}

                served_before = served()
                with RankClient(f"127.0.0.1:{ends.grpc_port}", timeout_s=30) as client:
                    for ex in examples[:5]:
                        client.rank(ex.user_id, ex.surface, [ex.item_id, ex.item_id + 1], context={"ts_ms": ex.ts + 1})

                # -- the funnel, per surface, exactly as the test counts it -------------------------
                want = {
                    "opengem_ads_impressions_total": Counter(e.surface for e in examples),
                    "opengem_ads_clicks_total": Counter(e.surface for e in examples if e.click),
                    "opengem_ads_conversions_total": Counter(e.surface for e in examples if e.conversion),
                }
                imps = want["opengem_ads_impressions_total"]
                _wait("monitor counted every example", lambda: (
                    (got := _by(prom.url, 'sum by (surface) (opengem_ads_impressions_total{job="opengem-monitor"})', "surface"))
                    == {s: float(n) for s, n in imps.items()}, got), 90, procs)
                for metric, counts in want.items():
                    got = _by(prom.url, f'sum by (surface) ({metric}{{job="opengem-monitor"}})', "surface")
                    assert {s: v for s, v in got.items() if v} == {s: float(n) for s, n in counts.items()}, metric
                # the worker's own (at-least-once) count agrees on a run without crashes
                assert _by(prom.url, 'sum by (surface) (opengem_joiner_examples_total{job="opengem-stream"})', "surface") == \
                    {s: float(n) for s, n in imps.items()}
                clicks = want["opengem_ads_clicks_total"]
                _wait("CTR gauges of the whole run", lambda: (
                    (got := _by(prom.url, 'opengem_ads_ctr{job="opengem-monitor"}', "surface"))
                    == {s: clicks[s] / n for s, n in imps.items()}, got), 30, procs)

                # -- the served model's quality, recomputed here ------------------------------------
                loaded = load(cfg.serve.models_path(data), version)
                reader = ShardedReader(data, cfg.kafka.partitions, secondary_root=tmp_path / "readers")
                try:
                    reader.catch_up()
                    batch = examples_batch(examples, reader, loaded.model.cfg)
                    with torch.inference_mode():
                        probs = loaded.model.predict(batch).double().numpy()
                finally:
                    reader.close()
                labels, surf = batch.labels.numpy(), batch.surface_idx.numpy()
                surfaces, tasks = loaded.model.cfg.features.surfaces, loaded.model.cfg.features.tasks
                expect = {(surfaces[si], t): summarize(probs[surf == si, ti], labels[surf == si, ti])
                          for si in np.unique(surf).tolist() for ti, t in enumerate(tasks)}

                def windows_full():
                    got = _by(prom.url, 'opengem_live_window_examples{job="opengem-monitor"}', "surface", "task", "model_version")
                    return got == {(s, t, version): float(v["n"]) for (s, t), v in expect.items()}, got

                _wait("monitor scored every example", windows_full, 60, procs)
                for metric, field in (("opengem_live_ne", "ne"), ("opengem_live_calibration", "calibration"),
                                      ("opengem_live_predicted_rate", "mean_pred"), ("opengem_live_observed_rate", "rate"),
                                      ("opengem_live_auc", "auc")):
                    got = _by(prom.url, f'{metric}{{job="opengem-monitor"}}', "surface", "task", "model_version")
                    assert set(got) == {(s, t, version) for s, t in expect}, metric
                    for (s, t), v in expect.items():
                        if np.isnan(v[field]):
                            assert np.isnan(got[(s, t, version)]), (metric, s, t)
                        else:
                            assert got[(s, t, version)] == pytest.approx(v[field], rel=1e-4, abs=1e-6), (metric, s, t)
                assert any(v["ne"] == v["ne"] for v in expect.values()), "no defined NE at all: a vacuous test"
                published = _by(prom.url, "opengem_live_model_published_timestamp_seconds", "job")
                assert published["opengem-monitor"] == pytest.approx(loaded.meta["created_at"], abs=1e-3)

                # -- system health -------------------------------------------------------------------
                lag = _wait("lag of the monitor's group", lambda: (
                    (got := _by(prom.url, 'sum by (group, topic) (opengem_kafka_consumer_lag_records)', "group", "topic"))
                    .get(("opengem-monitor", "opengem.examples")) == 0.0, got), 30, procs)
                assert ("opengem-stream", "opengem.events") in lag
                want_codes = dict(served_before)
                want_codes["OK"] = want_codes.get("OK", 0.0) + 5.0
                assert _by(prom.url, 'sum by (code) (opengem_serve_requests_total{job="opengem-serve"})', "code") == \
                    want_codes
                assert _by(prom.url, "up", "job") == {"opengem-stream": 1.0, "opengem-serve": 1.0,
                                                      "opengem-monitor": 1.0}
                # every shipped rule evaluates without error on real series
                with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=10) as r:
                    groups = json.load(r)["data"]["groups"]
                rules = [rule for g in groups for rule in g["rules"]]
                assert len(rules) >= 16
                bad = [(r_["name"], r_.get("lastError")) for r_ in rules if r_["health"] not in ("ok", "unknown")]
                assert not bad, bad
                _wait("a recording rule over the funnel", lambda: (
                    0 < len(got := _by(prom.url, "surface:opengem_ads_ctr:rate15m", "surface")) and set(got) <= set(imps),
                    got), 20, procs)
        finally:
            svc.stop()
            for p, _ in procs:
                _stop(p)
    for p, log in procs:
        assert p.returncode == 0, f"{log.name}: {log.read_text()[-3000:]}"


def _settled(bootstrap: str, quiet_s: float = 2.0):
    """A poll function: true once the examples topic's end has not moved for ``quiet_s``."""
    from opengem.stream.broker import high_watermarks

    state = {"end": -1, "since": time.monotonic()}

    def poll():
        end = sum(high_watermarks(bootstrap, "opengem.examples").values())
        if end != state["end"]:
            state.update(end=end, since=time.monotonic())
        return end > 0 and time.monotonic() - state["since"] >= quiet_s, end

    return poll
