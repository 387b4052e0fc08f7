"""`opengem monitor`: the conversion funnel and the *served* model's quality on live outcomes.

The simulator (like any traffic source that does not call our server) does
not show the ads our server ranks, so "served predictions joined with
outcomes" cannot be logged at request time. The monitor measures the next
best thing, and says so:

* it consumes ``opengem.examples`` (every impression with its click and
  conversion outcome, once its attribution windows closed), counts the
  conversion funnel per surface (impressions, clicks, conversions; CTR and
  post-click CVR over a sliding window), each example once;
* it scores every example (or a ``score_fraction`` of them, chosen by a hash
  of the request id) with **the model version the server serves** -- loaded,
  validated and swapped by the server's own :class:`~opengem.serving.models.ModelManager`
  from the same ``LATEST`` pointer -- on the user's history *as of the
  impression*, read from the stream worker's shards through the trainer's and
  server's read path (:func:`~opengem.model.data.examples_batch` over a
  :class:`~opengem.features.sharded.ShardedReader`);
* it exports NE, AUC, calibration, predicted and observed rate per surface
  and task over a sliding window, labelled by the model version.

What that measures: how well the served version predicts the outcomes of the
traffic that actually happened -- counterfactually, on the ads that were
shown, not on the ads our ranking would have chosen (those were never shown,
so their outcomes do not exist). Unlike the trainer's progressive validation
(``opengem_train_*``: the model being trained, scored just before each
update), this is the version users are being served, with its publication
and load delay, which is what a stale or broken publication degrades.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from opengem.model.metrics import WindowedMetrics
from opengem.stream.joiner import Example

log = logging.getLogger(__name__)


def sampled(example: Example, fraction: float) -> bool:
    """Deterministic per request id: every replica (and a re-send) makes the same choice."""
    return fraction >= 1.0 or zlib.crc32(example.request_id.encode()) < fraction * 2**32


class FunnelWindow:
    """The last ``window`` examples' (click, conversion) bits per surface, with running sums."""

    def __init__(self, window: int):
        self.window = window
        self._bits: dict[str, deque[tuple[int, int]]] = {}
        self._sums: dict[str, list[int]] = {}

    def add(self, surface: str, click: int, conversion: int) -> None:
        bits = self._bits.setdefault(surface, deque())
        sums = self._sums.setdefault(surface, [0, 0])
        bits.append((click, conversion))
        sums[0] += click
        sums[1] += conversion
        if len(bits) > self.window:
            c, v = bits.popleft()
            sums[0] -= c
            sums[1] -= v

    def rates(self) -> dict[str, tuple[float, float]]:
        """surface -> (CTR, post-click CVR); CVR is NaN without clicks."""
        return {s: (c / len(self._bits[s]), v / c if c else float("nan")) for s, (c, v) in self._sums.items()}


class QualityWindows:
    """Sliding (prediction, label) windows per served version, keyed (surface, task).

    Figures are exported for one version at a time: the served one once its
    window holds ``min_examples`` examples, until then the previous one's
    (so a version published every few seconds does not make every figure a
    100-example estimate, and every exported figure belongs to the version
    its label names).
    """

    def __init__(self, window: int, min_examples: int):
        self.window, self.min_examples = window, min_examples
        self._by_version: dict[str, WindowedMetrics] = {}
        self._scored: dict[str, int] = {}
        self.exported: str | None = None

    def add(self, version: str, surfaces: Sequence[str], tasks: Sequence[str], probs: np.ndarray,
            labels: np.ndarray, surface_idx: np.ndarray) -> None:
        """probs, labels: (B, T); surface_idx: (B,) indexes into ``surfaces``."""
        w = self._by_version.setdefault(version, WindowedMetrics(self.window))
        self._scored[version] = self._scored.get(version, 0) + len(probs)
        for si in np.unique(surface_idx).tolist():
            sel = surface_idx == si
            for ti, task in enumerate(tasks):
                w.add((surfaces[si], task), probs[sel, ti], labels[sel, ti])

    def pick(self, served: str | None) -> str | None:
        """The version whose figures to export now; forgets every other one but the served."""
        if served is not None and (self.exported is None or self._scored.get(served, 0) >= self.min_examples):
            self.exported = served if served in self._by_version else self.exported
        keep = {served, self.exported}
        for v in [v for v in self._by_version if v not in keep]:
            del self._by_version[v]
            self._scored.pop(v, None)
        return self.exported

    def summary(self, version: str) -> dict[tuple[str, str], dict[str, float]]:
        w = self._by_version.get(version)
        return w.summary() if w is not None else {}


class LiveMonitor:
    """The monitor's state and one step of its loop; :func:`run_monitor` is the daemon around it.

    ``reader``: the store read API (default: a ShardedReader of ``<data_dir>/shards``).
    ``models``: a started ModelManager (default: one over ``[serve] models_dir``).
    """

    def __init__(self, cfg: Any, bootstrap: str, *, reader: Any = None, models: Any = None,
                 start: str | None = None, echo: Callable[[str], None] = lambda s: None):
        import uuid

        from opengem.features.sharded import ShardedReader
        from opengem.model.source import DedupWindow, ExampleSource
        from opengem.serving.models import ModelManager
        from opengem.stream.broker import high_watermarks

        self.cfg, self.mc, self.echo = cfg, cfg.monitor, echo
        k = cfg.kafka
        self._scratch = Path(cfg.data_dir) / "readers" / f"monitor-{uuid.uuid4().hex[:8]}"
        self._own_reader = reader is None
        self.reader = reader if reader is not None else ShardedReader(
            cfg.data_dir, k.partitions, topic=k.events_topic, secondary_root=self._scratch)
        self._own_models = models is None
        self.models = models if models is not None else ModelManager(
            cfg.serve.models_path(cfg.data_dir), cfg.serve.poll_s).start()
        partitions = sorted(high_watermarks(bootstrap, k.examples_topic))
        self.source = ExampleSource(bootstrap, k.examples_topic, partitions, start=self._committed(bootstrap),
                                    reset=start or self.mc.start, group_id=self.mc.group_id,
                                    client_id="opengem-monitor", dedup=DedupWindow(self.mc.dedup_window))
        self.funnel = FunnelWindow(self.mc.window)
        self.quality = QualityWindows(self.mc.window, self.mc.min_examples)
        self.counts = {"examples": 0, "scored": 0, "unscored": 0}
        self._labelled: set[tuple[str, str, str]] = set()
        self.last_summary: dict[tuple[str, str], dict[str, float]] = {}

    def _committed(self, bootstrap: str) -> dict:
        """Cursors from the group's committed offsets: a restarted monitor resumes there."""
        from kafka import KafkaAdminClient

        from opengem.model.source import Cursor

        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="opengem-monitor-admin")
        try:
            offsets = admin.list_group_offsets(self.mc.group_id).get(self.mc.group_id, {})
        finally:
            admin.close()
        topic = self.cfg.kafka.examples_topic
        return {tp.partition: Cursor(om.offset, 0) for tp, om in offsets.items() if tp.topic == topic and om.offset >= 0}

    # -- the loop ----------------------------------------------------------------------------
    def step(self, timeout_s: float = 0.5) -> int:
        """Take up to ``batch_size`` examples, count them, score the sampled ones. Returns how many."""
        from opengem.ops import metrics as m

        items = self.source.take(self.mc.batch_size, timeout_s=timeout_s)
        if not items:
            return 0
        examples = [it.example for it in items]
        for ex in examples:
            m.ADS_IMPRESSIONS.labels(ex.surface).inc()
            if ex.click:
                m.ADS_CLICKS.labels(ex.surface).inc()
            if ex.conversion:
                m.ADS_CONVERSIONS.labels(ex.surface).inc()
            self.funnel.add(ex.surface, ex.click, ex.conversion)
        self.counts["examples"] += len(examples)
        self._score(examples)
        self.source.commit(self.source.cursors)
        return len(examples)

    def _score(self, examples: list[Example]) -> None:
        import torch

        from opengem.model.data import examples_batch
        from opengem.ops import metrics as m

        scorer = self.models.current
        surfaces = scorer.surfaces if scorer is not None else ()
        todo = [e for e in examples if sampled(e, self.mc.score_fraction) and e.surface in surfaces]
        self.counts["unscored"] += sum(sampled(e, self.mc.score_fraction) for e in examples) - len(todo)
        if not todo:
            return
        self.reader.catch_up()  # each example was produced after the events it needs were stored
        batch = examples_batch(todo, self.reader, scorer.cfg)
        with torch.inference_mode():
            probs = scorer.loaded.model.predict(batch).double().numpy()
        surface_idx = batch.surface_idx.numpy()
        self.quality.add(scorer.loaded.version, surfaces, scorer.tasks, probs, batch.labels.double().numpy(),
                         surface_idx)
        for si, n in zip(*np.unique(surface_idx, return_counts=True)):
            m.LIVE_SCORED.labels(surfaces[si]).inc(int(n))
        self.counts["scored"] += len(todo)

    def report(self) -> None:
        """Recompute the windowed figures and set the gauges (stale label sets are removed)."""
        from opengem.ops import metrics as m

        for surface, (ctr, cvr) in self.funnel.rates().items():
            m.ADS_CTR.labels(surface).set(ctr)
            m.ADS_CVR.labels(surface).set(cvr)
        scorer = self.models.current
        if scorer is not None:
            m.LIVE_MODEL_PUBLISHED.set(float(scorer.loaded.meta.get("created_at", float("nan"))))
        version = self.quality.pick(scorer.loaded.version if scorer is not None else None)
        if version is None:
            return
        summary = self.quality.summary(version)
        labelled = set()
        for (surface, task), s in summary.items():
            key = (surface, task, version)
            labelled.add(key)
            for gauge, field in ((m.LIVE_NE, "ne"), (m.LIVE_AUC, "auc"), (m.LIVE_CALIBRATION, "calibration"),
                                 (m.LIVE_PREDICTED_RATE, "mean_pred"), (m.LIVE_OBSERVED_RATE, "rate"),
                                 (m.LIVE_WINDOW_EXAMPLES, "n")):
                gauge.labels(*key).set(s[field])
        for key in self._labelled - labelled:  # a previous version's series
            for gauge in (m.LIVE_NE, m.LIVE_AUC, m.LIVE_CALIBRATION, m.LIVE_PREDICTED_RATE, m.LIVE_OBSERVED_RATE,
                          m.LIVE_WINDOW_EXAMPLES):
                gauge.remove(*key)
        self._labelled = labelled
        self.last_summary = summary

    def status(self) -> str:
        scorer = self.models.current
        ne = [f"{t} {s['ne']:.3f}" for (surf, t), s in sorted(self.last_summary.items()) if s["ne"] == s["ne"]]
        return (f"monitor: {self.counts['examples']:,} examples, {self.counts['scored']:,} scored with "
                f"{scorer.loaded.version if scorer else 'no model yet'}"
                + (f"; live NE {', '.join(ne[:2])}" if ne else ""))

    def close(self) -> None:
        import shutil

        self.source.close()
        if self._own_models:
            self.models.stop()
        if self._own_reader:
            self.reader.close()
            shutil.rmtree(self._scratch, ignore_errors=True)


def run_monitor(cfg: Any, bootstrap: str, *, stop: Callable[[], bool] = lambda: False, start: str | None = None,
                idle_exit_s: float | None = None, metrics_port: int | None = None,
                echo: Callable[[str], None] = print) -> LiveMonitor:
    """The daemon: metrics endpoint, lag collector, then step/report until ``stop()``.

    ``idle_exit_s``: return once no example came for that long (batch runs, tests).
    """
    from opengem.ops import metrics as m
    from opengem.ops.lag import LagCollector, run_lag_thread

    mc = cfg.monitor
    port = mc.metrics_port if metrics_port is None else metrics_port
    if port >= 0:
        echo(f"metrics at http://127.0.0.1:{m.serve(port)}/metrics")
    k = cfg.kafka
    lag_stop = threading.Event()
    lag = LagCollector(bootstrap, (k.events_topic, k.examples_topic), mc.lag_groups)
    lag_thread = run_lag_thread(lag, mc.lag_interval_s, lag_stop)
    mon = LiveMonitor(cfg, bootstrap, start=start, echo=echo)
    try:
        last_report = last_example = time.monotonic()
        while not stop():
            if mon.step():
                last_example = time.monotonic()
            now = time.monotonic()
            if now - last_report >= mc.report_interval_s:
                mon.report()
                echo(mon.status())
                last_report = now
            if idle_exit_s is not None and now - last_example >= idle_exit_s:
                break
        mon.report()
        return mon
    finally:
        lag_stop.set()
        lag_thread.join(timeout=10)
        lag.close()
        mon.close()
