"""`opengem train`: the continuous trainer daemon.

::

    opengem.examples ──► ExampleSource (cursors) ──► examples_batch(examples, ShardedReader)
        (partitions p % N == rank)                     histories as of each impression
                                                              │
                         progressive validation ◄── predict ──┤── train (fused row-wise Adagrad
                         (NE/AUC/calibration per      (the same forward)   on the tables, Adam on
                          surface × task, Prometheus)                      the dense part)
                                                              │
                         checkpoints (model + optimizer + cursors) ──► publish a serving version

One step: every rank takes up to ``batch_size`` examples of its partitions
(waiting at most ``fill_timeout_s``), the ranks agree on the largest count
(one all-reduce that also carries "checkpoint due", "publish due" and "stop"),
ranks with fewer examples pad with zero-weight rows so all shapes match, then
each rank reads its users' histories from the feature store *as of each
impression* (:func:`opengem.model.data.examples_batch`: nothing at or after
the impression time can reach a batch), runs one forward -- whose outputs are
the progressive-validation predictions, made before the model has seen these
labels -- and trains on the same forward. While a batch trains, a thread
takes and reads the next one (``prefetch``); an iteration that checkpoints,
publishes, reports or stops reads nothing ahead, so whatever the source has
handed out is trained when its cursors are saved.

Durability. A checkpoint holds each rank's model shards, optimizer state, the
cursors of its partitions and the window of recent example ids
(:mod:`opengem.model.checkpoint`, atomic). A restart loads the newest complete
checkpoint and resumes every partition at its cursor: examples after the
checkpoint are trained again (at most ``checkpoint_every_s`` of them), none is
skipped. Serving versions are published through :func:`opengem.model.registry.publish`
(written, fsynced, renamed), with the cursors they cover in ``meta.json``.

Negative downsampling (``negative_rate`` < 1, :mod:`opengem.model.sampling`).
The source keeps every example with a positive label and a deterministic
fraction r of the negatives (a keyed hash of the example id), so the cursors
move past dropped ones without store reads or a step; a kept negative trains
with weight 1/r in the per-example BCE on the funnel's impression-level
logits, which keeps the model calibrated. Progressive validation is computed
on the kept examples with the same weights (an unbiased estimate of the
full-stream figures). With ``max_delay_s`` the rate follows the trainer's
delay; it is exported as ``opengem_train_negative_rate``.

Student mode (``opengem train --student SURFACE``, :mod:`opengem.model.student_daemon`)
is this daemon with another learner: it overrides the hooks ``_make_learner``,
``_learn``, ``_source_weigh``, ``_facts``, ``_publish_meta``, ``_readers_dir``
and ``_model_name``, whose defaults here are the GEM trainer's behaviour.

The daemon binds its checkpoints to the examples topic's id, like the stream
worker binds its shards: a topic created again (a restarted embedded broker)
makes old cursors meaningless, and the trainer refuses them unless started
with ``fresh=True`` (``opengem train --fresh``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from opengem.config import Config
from opengem.model import checkpoint as ckpt
from opengem.model import registry
from opengem.model.batch import GemBatch
from opengem.model.data import examples_batch
from opengem.model.distributed import (
    DistInfo, full_state_dict, load_local_state, local_state, make_optimizer, shard_model,
)
from opengem.model.sampling import NegativeSampler, WeightedWindow
from opengem.model.train_config import TrainConfig
from opengem.runtime import tune_allocator
from opengem.stream.joiner import Example

log = logging.getLogger(__name__)

# Zero-weight filler for a rank that has no example in a step (its user has no history).
_BLANK = dict(request_id="", ts=1, user_id=0, item_id=0, advertiser_id=None, ad_format=None, category=None,
              age_bucket=None, country=None, device=None, hour=None, click=0, conversion=0, click_ts=None,
              conversion_ts=None)


def model_config(tcfg: TrainConfig, surfaces: tuple[str, ...]) -> Any:
    """The config of the model ``tcfg`` names, with the deployment's surfaces."""
    if tcfg.model == "gem":
        from opengem.model.config import preset

        cfg = preset(tcfg.preset)
    else:
        from opengem.model.baselines import BaselineConfig

        cfg = BaselineConfig()
    return dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, surfaces=tuple(surfaces)))


def quiet_torchrec() -> None:
    """TorchRec's planner logs warnings about CPU topologies and deprecated DDP flags on every start."""
    for name in ("torchrec", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\..*")
    warnings.filterwarnings("ignore", message=r".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message=r".*Grad strides do not match bucket view strides.*")


class OnlineLearner:
    """A sharded model with its optimizers and the predict-then-train step; no Kafka, no store.

    The daemon, the offline ceiling of ``bench/train.py`` and the drift
    benchmark all train through :meth:`step`, so they measure the same thing.
    """

    def __init__(self, kind: str, cfg: Any, tcfg: TrainConfig, info: DistInfo, *, seed: int = 0,
                 compile_cache: str | Path | None = None):
        quiet_torchrec()
        # Process-wide (see TrainConfig.malloc_keep_mb): here, so that the daemon, the offline
        # ceiling of bench/train.py and the evaluation harness all train under the same allocator.
        tune_allocator(tcfg.malloc_keep_mb, heap_only=True)
        self.kind, self.cfg, self.tcfg, self.info = kind, cfg, tcfg, info
        torch.manual_seed(seed)  # identical initial dense weights on every rank (DDP also broadcasts)
        base = registry.build_model(kind, cfg)
        cuda = info.device.type == "cuda"
        if cuda and tcfg.compile:
            if compile_cache:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
                os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            for name, child in base.named_children():
                if name != "sparse" and not any(isinstance(m, _table_types()) for m in child.modules()):
                    child.compile()  # in place: state-dict keys unchanged
        self.autocast = cuda and tcfg.bf16
        self.model = shard_model(base, info, emb_lr=tcfg.emb_lr)
        self.optimizer = make_optimizer(self.model, tcfg.lr)

    def step(self, batch: GemBatch, weight: torch.Tensor) -> torch.Tensor:
        """Predict, then train on ``batch``. Returns probs (B, T), pre-update.

        weight: (B,) per-example loss weights: 0 = padding, 1/r = a negative kept at
        downsampling rate r. The loss is the weighted mean BCE, so its scale (and the
        optimizers' step sizes) matches the unsampled stream's.
        """
        batch = batch.to(self.info.device)
        weight = weight.to(self.info.device)
        self.model.train()
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(batch)
        logits = logits.float()  # (B, T) impression-level logits
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").mean(1)
        loss = (bce * weight).sum() / weight.sum().clamp(min=1.0)
        loss.backward()  # the tables are updated inside the backward (fused optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.sigmoid(logits.detach())

    @torch.no_grad()
    def predict(self, batch: GemBatch) -> torch.Tensor:
        """Probabilities (B, T) without training (a collective under torchrun, like :meth:`step`)."""
        self.model.eval()
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return torch.sigmoid(self.model(batch.to(self.info.device)).float())

    def state(self) -> dict[str, Any]:
        return local_state(self.model, self.optimizer)

    def load_state(self, state: dict[str, Any]) -> None:
        load_local_state(self.model, self.optimizer, state)

    def unsharded(self) -> nn.Module | None:
        """The whole model as the registry publishes it, on rank 0 (None elsewhere); collective."""
        full = full_state_dict(self.model, self.info)
        if full is None:
            return None
        model = registry.build_model(self.kind, self.cfg, device=torch.device("meta"))
        model.load_state_dict(full, strict=True, assign=True)
        return model.eval()


class _Unit(NamedTuple):
    """One step's input: the taken items and, once read, their batch and loss weights."""

    items: list
    batch: GemBatch | None
    weight: torch.Tensor | None


def _table_types() -> tuple[type, ...]:
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    return (EmbeddingBagCollection, EmbeddingCollection)


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0  # trained by this rank (after dedup)
    duplicates: int = 0
    sampled_out: int = 0  # negatives dropped by downsampling (this rank)
    published: str | None = None
    checkpoint: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    progressive: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> summary (all surfaces)


class Trainer:
    """The daemon: Kafka examples -> point-in-time batches -> predict-then-train -> checkpoints, versions."""

    def __init__(self, cfg: Config, tcfg: TrainConfig, bootstrap: str, info: DistInfo, *, fresh: bool = False,
                 echo: Callable[[str], None] = print, prefetch: bool = True):
        from opengem.features.sharded import ShardedReader
        from opengem.model.source import (
            DedupWindow, ExampleSource, assign_partitions, cursors_from_state,
        )
        from opengem.stream.broker import topic_id
        from opengem.stream.worker import _partition_count

        self.cfg, self.tcfg, self.info = cfg, tcfg, info
        self.prefetch = prefetch
        self.echo = echo if info.rank == 0 else (lambda s: None)
        k = cfg.kafka
        root = Path(cfg.data_dir)
        self.ckpt_dir = Path(tcfg.checkpoint_dir or root / "train" / "checkpoints")
        self.models_dir = Path(tcfg.models_dir or root / "models")
        self.model_cfg = model_config(tcfg, cfg.surfaces)
        self.topic_id = topic_id(bootstrap, k.examples_topic) or ""
        self.stats = TrainStats()
        self.surfaces = tuple(self.model_cfg.features.surfaces)
        self.tasks = tuple(self.model_cfg.features.tasks)
        self.sampler = NegativeSampler(tcfg.negative_rate, seed=tcfg.sample_seed, min_rate=tcfg.negative_rate_min,
                                       max_delay_s=tcfg.max_delay_s)
        self.learner = self._make_learner()

        if info.rank == 0:
            if fresh and self.ckpt_dir.exists():
                shutil.rmtree(self.ckpt_dir)
            for name in ckpt.remove_partial(self.ckpt_dir):
                self.echo(f"removed half-written checkpoint {name}")
        self._barrier()
        start, dedup_ids = self._restore()

        n_ex = _partition_count(bootstrap, k.examples_topic)
        self.partitions = assign_partitions(n_ex, info.rank, info.world_size)
        self.source = ExampleSource(bootstrap, k.examples_topic, self.partitions,
                                    start={p: c for p, c in cursors_from_state(start).items() if p in self.partitions},
                                    reset=tcfg.start, group_id=tcfg.group_id,
                                    dedup=DedupWindow(tcfg.dedup_window, dedup_ids),
                                    client_id=f"opengem-train-{info.rank}",
                                    weigh=self._source_weigh())
        readers = self._readers_dir()
        shutil.rmtree(readers, ignore_errors=True)
        self.reader = ShardedReader(cfg.data_dir, _partition_count(bootstrap, k.events_topic),
                                    topic=k.events_topic, secondary_root=readers)
        self.window = WeightedWindow(tcfg.metrics_window) if info.rank == 0 else None
        now = time.monotonic()
        self._last_ckpt = self._last_pub = self._last_report = now
        self._ckpt_step = self._pub_step = self.stats.steps
        self._report_examples = self._bad_seen = self._sampled_seen = 0
        self._published_at: float | None = None
        self._max_record_ts = 0
        sampling = ""
        if tcfg.downsampling:
            sampling = f"; negatives downsampled to r={self.sampler.rate:g}"
            if tcfg.max_delay_s > 0:
                sampling += f" (adaptive down to {self.sampler.min_rate:g} beyond {tcfg.max_delay_s:g} s of delay)"
        self.echo(f"training {self._model_name()} on {k.examples_topic} "
                  f"partitions {self.partitions} (rank {info.rank} of {info.world_size}); versions -> "
                  f"{self.models_dir}{sampling}")

    # -- what the student mode (model/student_daemon.py) replaces ---------------------------
    def _make_learner(self) -> Any:
        """The learner: ``step(batch, weight)`` -> probs, ``state()``, ``load_state()``, ``unsharded()``."""
        return OnlineLearner(self.tcfg.model, self.model_cfg, self.tcfg, self.info,
                             compile_cache=Path(self.cfg.data_dir) / "train" / "compile-cache")

    def _model_name(self) -> str:
        return f"{self.tcfg.model} {self.tcfg.preset if self.tcfg.model == 'gem' else ''}".strip()

    def _readers_dir(self) -> Path:
        """Scratch directory of this process's store secondaries (removed at start)."""
        return Path(self.cfg.data_dir) / "train" / "readers" / f"rank{self.info.rank}"

    def _source_weigh(self) -> Callable[[Example], float] | None:
        return self._weigh if self.tcfg.downsampling else None

    def _learn(self, unit: "_Unit") -> torch.Tensor:
        """Predict-then-train one batch: probs (B, T) before the update."""
        return self.learner.step(unit.batch, unit.weight)

    def _publish_meta(self) -> dict[str, Any]:
        """Facts of a published version beyond the cursors and metrics."""
        return {"preset": self.tcfg.preset if self.tcfg.model == "gem" else None}

    def _weigh(self, example: Example) -> float:
        """The example's training weight under downsampling (0: not trained)."""
        return self.sampler.weight(example.example_id, any(getattr(example, t) for t in self.tasks))

    # -- checkpoints -------------------------------------------------------------------------
    def _facts(self) -> dict[str, Any]:
        return {"topic_id": self.topic_id, "model": self.tcfg.model, "config": dataclasses.asdict(self.model_cfg)}

    def _restore(self) -> tuple[dict[str, Any], list[str]]:
        path = ckpt.latest(self.ckpt_dir)
        if path is None:
            self.echo(f"no checkpoint in {self.ckpt_dir}: starting a new model ({self._model_name()})")
            return {}, []
        state, m = ckpt.load(path, rank=self.info.rank, world_size=self.info.world_size)
        want = self._facts()
        if m.get("topic_id", "") != want["topic_id"]:
            raise ckpt.CheckpointError(
                f"{path} covers another incarnation of the examples topic (topic id {m.get('topic_id')!r}, now "
                f"{want['topic_id']!r}); its offsets mean nothing here: start with --fresh")
        if m.get("model") != want["model"] or m.get("config") != _jsonable(want["config"]):
            raise ckpt.CheckpointError(f"{path} holds another model configuration; start with --fresh or "
                                       "point --checkpoint-dir elsewhere")
        self.learner.load_state(state["learner"])
        self.stats.steps = int(state["step"])
        self.stats.examples = int(state["examples"])
        self.stats.checkpoint = path.name
        self.sampler.restore(state.get("negative_rate"))
        self.echo(f"resumed from checkpoint {path.name}: step {self.stats.steps:,}, "
                  f"{self.stats.examples:,} examples on rank 0")
        return state["cursors"], list(state["dedup"])

    def checkpoint(self) -> Path:
        from opengem.model.source import cursors_to_state

        state = {"learner": self.learner.state(), "cursors": cursors_to_state(self.source.cursors),
                 "dedup": self.source.dedup.ids(), "step": self.stats.steps, "examples": self.stats.examples,
                 "negative_rate": self.sampler.rate}
        path = ckpt.save(self.ckpt_dir, self.stats.steps, state, rank=self.info.rank,
                         world_size=self.info.world_size, facts=self._facts(), keep=self.tcfg.keep_checkpoints)
        self.source.commit(self.source.cursors)
        self.stats.checkpoint = path.name
        self._ckpt_step, self._last_ckpt = self.stats.steps, time.monotonic()
        from opengem.ops import metrics as m

        m.TRAIN_CHECKPOINT_STEP.set(self.stats.steps)
        return path

    # -- publication -------------------------------------------------------------------------
    def publish(self) -> str | None:
        from opengem.model.source import cursors_to_state

        cursors = self._gather_object(cursors_to_state(self.source.cursors))
        record_ts = self._gather_object(self._max_record_ts)
        model = self.learner.unsharded()
        self._pub_step, self._last_pub = self.stats.steps, time.monotonic()
        if model is None:
            return None
        self._summarize()
        merged: dict[str, list[int]] = {}
        for c in cursors:
            merged.update(c)
        meta = {"step": self.stats.steps, "cursors": dict(sorted(merged.items(), key=lambda kv: int(kv[0]))),
                "examples_topic": self.cfg.kafka.examples_topic, "topic_id": self.topic_id,
                "trained_until_record_ts_ms": max(record_ts), "world_size": self.info.world_size,
                "progressive": self.stats.progressive, **self._publish_meta()}
        path = registry.publish(self.models_dir, model, meta, keep=self.tcfg.keep_versions)
        self.stats.published = path.name
        self._published_at = time.time()
        from opengem.ops import metrics as m

        m.TRAIN_MODEL_VERSION.set(int(path.name) if path.name.isdigit() else 0)
        return path.name

    # -- collectives -------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    def _gather_object(self, obj: Any) -> list[Any]:
        if self.info.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, obj)  # our own ranks' plain data
        return out

    def _agree(self, n: int, ckpt_due: bool, pub_due: bool, stop: bool, idle: bool) -> tuple[int, bool, bool, bool, bool]:
        """One all-reduce: the largest batch, and whether any rank wants a checkpoint / publish / stop;
        ``idle`` only if every rank is idle (max of -idle)."""
        v = torch.tensor([n, ckpt_due, pub_due, stop, -int(idle)], dtype=torch.int64)
        if self.info.world_size > 1:
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
        a = v.tolist()
        return a[0], bool(a[1]), bool(a[2]), bool(a[3]), a[4] == -1

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: Callable[[], bool] = lambda: False, *, max_examples: int | None = None,
            idle_exit_s: float | None = None) -> TrainStats:
        """Train until ``stop()`` (any rank), ``max_examples`` (this rank's count) or, with
        ``idle_exit_s``, until every rank has seen no example for that long. Ends with a
        checkpoint and a publication of whatever is new."""
        t = self.tcfg
        last_example = time.monotonic()
        pending: Future | None = None  # the next batch, read while this one trains
        pool = ThreadPoolExecutor(1, thread_name_prefix="opengem-train-read") if self.prefetch else None
        try:
            while True:
                t_in = time.monotonic()
                unit = pending.result() if pending is not None else self._read()
                pending = None
                items = unit.items
                self.stats.sampled_out = self.source.sampled_out
                now = time.monotonic()
                if items:
                    last_example = now
                new = self.stats.steps > self._ckpt_step
                ckpt_due = new and ((t.checkpoint_every_s > 0 and now - self._last_ckpt >= t.checkpoint_every_s)
                                    or (t.checkpoint_every_steps > 0
                                        and self.stats.steps - self._ckpt_step >= t.checkpoint_every_steps))
                pub_new = self.stats.steps > self._pub_step
                pub_due = pub_new and ((t.publish_every_s > 0 and now - self._last_pub >= t.publish_every_s)
                                       or (t.publish_every_steps > 0
                                           and self.stats.steps - self._pub_step >= t.publish_every_steps))
                want_stop = stop() or (max_examples is not None and self.stats.examples >= max_examples)
                idle = idle_exit_s is not None and now - last_example >= idle_exit_s
                n, ckpt_due, pub_due, want_stop, all_idle = self._agree(len(items), ckpt_due, pub_due, want_stop, idle)
                report_due = now - self._last_report >= t.report_every_s
                if n and (unit.batch is None or n > len(items)):
                    unit = self._build(items, n)  # pad to the ranks' largest count (this thread: no read runs)
                # Read the next batch while this one trains, unless this iteration checkpoints,
                # publishes, reports or stops: those touch the consumer, and a checkpoint's cursors
                # and dedup window must cover exactly the trained examples -- with no read in
                # flight, everything taken so far is trained by the end of this iteration.
                if pool is not None and n and not (ckpt_due or pub_due or want_stop or all_idle or report_due):
                    pending = pool.submit(self._read)
                if n:
                    self._train(unit, t_in)
                if ckpt_due:
                    self.checkpoint()
                if pub_due:
                    self.publish()
                if report_due:
                    self.report()
                if want_stop or all_idle:
                    break
            self._finish()
        finally:
            if pending is not None:  # an exception while a read was in flight: let it end first
                pending.cancel() or pending.exception()
            if pool is not None:
                pool.shutdown(wait=True)
            self.close()
        return self.stats

    def _finish(self) -> None:
        self.report()
        if self.stats.steps > self._ckpt_step:
            self.checkpoint()
        if self.stats.steps > self._pub_step and (self.tcfg.publish_every_s > 0 or self.tcfg.publish_every_steps > 0):
            self.publish()

    def _read(self) -> "_Unit":
        """Take up to ``batch_size`` examples and read their batch (unpadded). With ``prefetch``
        it runs on the read thread while the previous batch trains: that overlap pays where
        either side leaves the GIL (socket waits, RocksDB reads, NumPy, torch kernels);
        ``bench/train.py`` measures how much it buys."""
        t = self.tcfg
        items = self.source.take(t.batch_size, t.fill_timeout_s)
        if not items:
            return _Unit(items, None, None)
        return self._build(items, len(items))

    def _build(self, items: list, n: int) -> "_Unit":
        """The batch of ``items`` padded with zero-weight rows to ``n``."""
        examples = [it.example for it in items]
        filler = examples[0] if examples else Example(surface=self.surfaces[0], **_BLANK)
        weight = torch.zeros(n)
        if items:
            weight[: len(examples)] = torch.tensor([it.weight for it in items])
        examples += [filler] * (n - len(examples))
        self.reader.catch_up()  # every example was produced after its events were written: see them all
        return _Unit(items, examples_batch(examples, self.reader, self.model_cfg), weight)

    def _train(self, unit: "_Unit", t0: float) -> None:
        """Predict-then-train on ``unit``; ``t0``: when this iteration began waiting for it."""
        from opengem.ops import metrics as m

        items, batch, weight = unit.items, unit.batch, unit.weight
        probs = self._learn(unit)
        self.stats.steps += 1
        self.stats.examples += len(items)
        m.TRAIN_STEPS.inc()
        wall = time.time()
        for it in items:
            m.TRAIN_EXAMPLES.labels(it.example.surface).inc()
            m.TRAIN_EXAMPLE_DELAY.observe(max(0.0, wall - it.record_ts_ms / 1000.0))
            self._max_record_ts = max(self._max_record_ts, it.record_ts_ms)
        if items:
            m.TRAIN_NEGATIVE_RATE.set(self.sampler.adapt(wall - max(it.record_ts_ms for it in items) / 1000.0))
        self._observe(probs.cpu(), batch, weight)
        dup = self.source.duplicates - self.stats.duplicates
        if dup:
            m.TRAIN_DUPLICATES.inc(dup)
            self.stats.duplicates = self.source.duplicates
        m.TRAIN_BATCH_SECONDS.observe(time.monotonic() - t0)  # the wait for its read (if any) included

    def _observe(self, probs: torch.Tensor, batch: GemBatch, weight: torch.Tensor) -> None:
        """Progressive validation: gather (prediction, label, surface, weight) rows on rank 0; the
        windowed metrics weigh each row by its training weight (unbiased under downsampling)."""
        rows = torch.cat([probs, batch.labels.cpu(), batch.surface_idx.cpu()[:, None].float(), weight[:, None]], 1)
        if self.info.world_size > 1:
            parts = [torch.empty_like(rows) for _ in range(self.info.world_size)]
            dist.all_gather(parts, rows)
            rows = torch.cat(parts)
        if self.window is None:
            return
        rows = rows[rows[:, -1] > 0].numpy()
        T = len(self.tasks)
        surf = rows[:, 2 * T].astype(np.int64)
        w = rows[:, -1]
        for ti, task in enumerate(self.tasks):
            p, y = rows[:, ti], rows[:, T + ti]
            self.window.add(("all", task), p, y, w)
            for si in np.unique(surf).tolist():
                sel = surf == si
                self.window.add((self.surfaces[si], task), p[sel], y[sel], w[sel])

    def report(self) -> None:
        from opengem.ops import metrics as m

        now = time.monotonic()
        dt = max(now - self._last_report, 1e-9)
        rate = (self.stats.examples - self._report_examples) / dt
        self._last_report, self._report_examples = now, self.stats.examples
        m.TRAIN_EXAMPLES_PER_SECOND.set(rate)
        lag = self.source.lag()
        for p, v in lag.items():
            m.TRAIN_LAG.labels(str(p)).set(v)
        if self._published_at is not None:
            m.TRAIN_MODEL_AGE.set(time.time() - self._published_at)
        m.TRAIN_BAD_RECORDS.inc(self.source.bad_records - self._bad_seen)
        self._bad_seen = self.source.bad_records
        m.TRAIN_SAMPLED_OUT.inc(self.source.sampled_out - self._sampled_seen)
        self._sampled_seen = self.source.sampled_out
        m.TRAIN_NEGATIVE_RATE.set(self.sampler.rate)
        if self.window is None:
            return
        for (surface, task), s in self._summarize().items():
            if surface == "all":
                continue
            for gauge, key in ((m.TRAIN_NE, "ne"), (m.TRAIN_AUC, "auc"), (m.TRAIN_CALIBRATION, "calibration"),
                               (m.TRAIN_LOG_LOSS, "log_loss"), (m.TRAIN_LABEL_RATE, "rate")):
                gauge.labels(surface, task).set(s[key])
        prog = " ".join(f"NE[{task}]={s['ne']:.4f}" for task, s in self.stats.progressive.items()
                        if not math.isnan(s["ne"]))
        sampled = (f" (+{self.source.sampled_out:,} negatives sampled out, r={self.sampler.rate:.3g})"
                   if self.tcfg.downsampling else "")
        self.echo(f"step {self.stats.steps:,} examples {self.stats.examples:,}{sampled} ({rate:,.0f}/s) {prog} "
                  f"lag {sum(lag.values()):,} records | version {self.stats.published or '-'} "
                  f"checkpoint {self.stats.checkpoint or '-'}")

    def _summarize(self) -> dict:
        """Windowed progressive metrics per (surface, task); the all-surface ones go to ``stats``."""
        summary = self.window.summary() if self.window is not None else {}
        for (surface, task), s in summary.items():
            if surface == "all":
                self.stats.progressive[task] = s
        return summary

    def close(self) -> None:
        self.source.close()
        self.reader.close()


def _jsonable(v: Any) -> Any:
    """What a dataclass dict looks like after a JSON round trip (tuples become lists)."""
    import json

    return json.loads(json.dumps(v))


def run_trainer(cfg: Config, tcfg: TrainConfig, bootstrap: str, *, stop: Callable[[], bool] = lambda: False,
                fresh: bool = False, max_examples: int | None = None, idle_exit_s: float | None = None,
                student: str | None = None) -> TrainStats:
    """Set up (or join torchrun's) process group, serve metrics, run the daemon, tear down.
    ``student``: a surface -- run the student daemon of that surface instead (model/student_daemon.py)."""
    from opengem.model.distributed import init_distributed, shutdown_distributed
    from opengem.ops import metrics as m

    info = init_distributed(tcfg.device or None)
    tune_allocator(tcfg.malloc_keep_mb, heap_only=True)  # the student daemon too
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    try:
        if tcfg.metrics_port is not None:
            port = m.serve(tcfg.metrics_port + info.rank if tcfg.metrics_port else 0)
            if info.rank == 0:
                print(f"metrics at http://127.0.0.1:{port}/metrics", flush=True)
        if student:  # `opengem train --student SURFACE`
            from opengem.model.student_daemon import run_student

            return run_student(cfg, tcfg, student, bootstrap, info, stop=stop, fresh=fresh,
                               max_examples=max_examples, idle_exit_s=idle_exit_s)
        trainer = Trainer(cfg, tcfg, bootstrap, info, fresh=fresh, echo=lambda s: print(s, flush=True))
        return trainer.run(stop, max_examples=max_examples, idle_exit_s=idle_exit_s)
    finally:
        shutdown_distributed(info)
