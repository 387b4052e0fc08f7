"""Offline evaluation: one materialized event window, every model trained and scored on the same examples.

::

    events (simulator, a Parquet event file, a replayed log), in ts order
        │  the stream worker's own ingest step (stream/ingest.Ingestor: RocksDB store + label joiner)
        ▼
    labelled examples ──► in impression-time order, once every window that could still
        │                 change a label has closed (lateness + click + conversion window)
        │  model/data.examples_batch: the user's history read from the store *as of the
        │  impression* (the trainer's and the server's read), make_batch (dense counters
        ▼  over that point-in-time history)
    dataset/  train-*.pt, test-*.pt (GemBatch tensors + weight, truth, ts)   dataset.json
        │
        ├─► model A: the trainer's own step (OnlineLearner: DMP, fused row-wise Adagrad on
        ├─► model B:   the tables, Adam on the rest) over the train window, predict-then-train
        └─► ...        (progressive NE = the learning curve); then frozen, scored on the test window

Protocol. *Temporal split*: the train window is the impressions among the
first ``events - test_events`` events, the test window those among the next
``test_events``; a model never trains on a test example and the test window
lies entirely after the train window in event time. The train window's
negatives are downsampled (``negative_rate``, the trainer's deterministic
:class:`~opengem.model.sampling.NegativeSampler`) and kept ones weigh 1/r, as
the daemon trains; the test window keeps every example by default
(``test_negative_rate`` = 1), so its figures are exactly
:func:`opengem.model.metrics.summarize` (with r < 1 they are the
importance-weighted estimates of :func:`~opengem.model.sampling.weighted_summary`).

Labels. ``click`` = a click within ``click_window_s`` of the impression,
``conversion`` = a conversion within ``conversion_window_s`` of that click (the
joiner's rules). Examples whose windows had not closed when the events ran out
are dropped: the simulator source generates a tail of events past the test
window for exactly that reason (its impressions are not used).

Oracle. On simulator data every example carries the true ``p_click`` and
``p_conversion``; the oracle probability of the *windowed* conversion label is
``p_conversion * conversion_delay_cdf(sim, conversion_window_s)``
(docs/simulator.md), and the oracle NE is the NE of those probabilities on the
same examples and labels.

Point in time. Every read passes ``before_ts = impression ts`` and
:func:`~opengem.model.batch.make_batch` drops anything at or after it. The
store keeps ``store_max_events`` per user (default 16k); an example is read at
most ~1 h of event time after its impression (its windows), so the history
before the impression is complete up to ``max_len`` unless one user had more
than ``store_max_events - max_len`` events in that hour (the simulator's
busiest user has a few thousand).

Histories are read once with ``max_len`` events (default 1024, GEM base's
window), so every model -- baselines included -- gets dense counters over the
same window; a GEM variant with a shorter window truncates the sequence itself
(its pyramid ``max_len``).

Everything is deterministic under the seeds (simulator seed, sample seed, model
seed): the dataset fingerprint and each model's fingerprint name the results
file, so an interrupted multi-model run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from opengem.model.batch import NONSEQ_KEYS, SEQ_KEYS, FeatureConfig, GemBatch, make_kjt
from opengem.model.metrics import summarize
from opengem.model.sampling import NegativeSampler, WeightedWindow, weighted_summary

DATASET_FORMAT = 1
_SHARD_BATCHES = 32  # batches per dataset file


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class DatasetConfig:
    # Simulator events in the train + test windows (the simulator also emits a tail after them).
    events: int = 600_000
    # The last ``test_events`` of them form the test window.
    test_events: int = 150_000
    # SimConfig.seed of the stream (simulator sources only).
    sim_seed: int = 0
    # Joiner windows. Clicks come at most 300 s after their impression in the simulator;
    # 1 h of post-click attribution keeps the label lag (and the tail) short.
    click_window_s: float = 300.0
    conversion_window_s: float = 3600.0
    allowed_lateness_s: float = 60.0
    # History events read per example (GEM base's pyramid window).
    max_len: int = 1024
    # Negative downsampling of the train window (1/r weights), and of the test window.
    negative_rate: float = 0.1
    test_negative_rate: float = 1.0
    sample_seed: int = 0
    batch_size: int = 256
    # Events kept per user by the store while building (see the module docstring).
    store_max_events: int = 16384
    # Events per ingest step.
    block_events: int = 16384

    def __post_init__(self) -> None:
        if not 0 < self.test_events < self.events:
            raise ValueError("need 0 < test_events < events")
        for name in ("negative_rate", "test_negative_rate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.max_len < 1 or self.store_max_events < self.max_len:
            raise ValueError("need 1 <= max_len <= store_max_events")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs as dataclass dicts)."""
    raw = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


# ------------------------------------------------------------------------------------ sources


@dataclass
class EventSource:
    """Arrow record batches (``codec.EVENT_SCHEMA``) in ts order, and where the windows end.

    ``train_events`` / ``window_events``: the event counts that end the train and the
    test windows; events after ``window_events`` only close labels. ``oracle``: the
    simulator config when the events carry true probabilities (None for real logs).
    """

    batches: Callable[[], Iterator[Any]]
    train_events: int
    window_events: int
    oracle: Any = None
    describe: dict[str, Any] = field(default_factory=dict)


def simulator_source(dcfg: DatasetConfig, sim_cfg: Any = None, surfaces: Sequence[str] | None = None) -> EventSource:
    from opengem.stream.simulator import SimConfig, Simulator

    sim_cfg = sim_cfg or SimConfig(seed=dcfg.sim_seed, **({"surfaces": tuple(surfaces)} if surfaces else {}))
    # Event time the labels still need after the last test impression, as simulator events (+10 %).
    tail_s = dcfg.click_window_s + dcfg.conversion_window_s + dcfg.allowed_lateness_s + 60.0
    tail = int(math.ceil(1.1 * tail_s * sim_cfg.events_per_second))
    total = dcfg.events + tail
    return EventSource(
        batches=lambda: Simulator(sim_cfg).record_batches(total, dcfg.block_events),
        train_events=dcfg.events - dcfg.test_events, window_events=dcfg.events, oracle=sim_cfg,
        describe={"kind": "simulator", "sim": _sim_describe(sim_cfg), "tail_events": tail},
    )


# Config fields added after datasets (SimConfig) or model results (GemConfig) were fingerprinted:
# (path in the config's dict, the value that means "as before"). Left out of the description at
# that value, so what was fingerprinted before the field keeps its fingerprint.
_SIM_FIELDS_ADDED = ((("long_range_click_strength",), 0.0), (("surface_affinity_spread",), 0.0))
_MODEL_FIELDS_ADDED = ((("heads", "shared_stages"), ()),)


def _describe(cfg: Any, added: tuple) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for path, v in added:
        parent = d
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and path[-1] in parent:
            got = parent[path[-1]]
            if (tuple(got) if isinstance(got, list) else got) == v:
                parent.pop(path[-1])
    return d


def _sim_describe(sim_cfg: Any) -> dict[str, Any]:
    return _describe(sim_cfg, _SIM_FIELDS_ADDED)


def _model_describe(cfg: Any) -> dict[str, Any]:
    return _describe(cfg, _MODEL_FIELDS_ADDED)


def event_list_source(events: Sequence[Any], test_fraction: float, block: int = 16384,
                      describe: dict | None = None) -> EventSource:
    """Events (``stream.events.Event``, e.g. from a replayed log), sorted by ts; the last
    ``test_fraction`` of them is the test window (labels of a replayed log are within ms)."""
    from opengem.stream.codec import events_to_batch

    evs = sorted(events, key=lambda e: e.ts)
    n = len(evs)
    n_test = max(1, int(round(n * test_fraction)))

    def batches() -> Iterator[Any]:
        for i in range(0, n, block):
            yield events_to_batch(evs[i:i + block])

    return EventSource(batches=batches, train_events=n - n_test, window_events=n,
                       describe=dict(describe or {}, kind="events", events=n))


# ------------------------------------------------------------------------------------ dataset


def _pack(b: GemBatch, exs: Sequence[Any], weight: np.ndarray, oracle: tuple[np.ndarray, np.ndarray] | None) -> dict:
    B = len(b)
    d = {
        "sparse": b.sparse.values().view(len(NONSEQ_KEYS), B).to(torch.int32),  # (K, B) one id per key
        "dense": b.dense, "seq_lengths": b.seq_lengths.to(torch.int32),
        "surface_idx": b.surface_idx.to(torch.int8), "labels": b.labels,
        "weight": torch.from_numpy(weight.astype(np.float32)),
        "ts": torch.tensor([e.ts for e in exs], dtype=torch.int64),
        "user": torch.tensor([e.user_id for e in exs], dtype=torch.int64),
    }
    for k in SEQ_KEYS:
        d[f"seq_{k}"] = b.seq[k].to(torch.int32)
    if oracle is not None:
        d["oracle"] = torch.from_numpy(np.stack(oracle, 1).astype(np.float64))  # (B, T) true probabilities
    return d


def _unpack(d: dict, features: FeatureConfig) -> GemBatch:
    sp = d["sparse"].to(torch.int64)
    return GemBatch(
        sparse=make_kjt({k: sp[i] for i, k in enumerate(NONSEQ_KEYS)}), dense=d["dense"],
        seq_lengths=d["seq_lengths"].to(torch.int64), seq={k: d[f"seq_{k}"].to(torch.int64) for k in SEQ_KEYS},
        surface_idx=d["surface_idx"].to(torch.int64), labels=d["labels"],
    ).validate(features)


class Dataset:
    """A materialized dataset directory (``dataset.json`` + shard files), read batch by batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "dataset.json").read_text())
        if self.meta.get("format") != DATASET_FORMAT:
            raise ValueError(f"{self.path}: dataset format {self.meta.get('format')} != {DATASET_FORMAT}")
        from opengem.config import from_dict

        self.features = from_dict(FeatureConfig, self.meta["features"], "features")
        self.fingerprint = self.meta["fingerprint"]

    @property
    def has_oracle(self) -> bool:
        return bool(self.meta.get("oracle"))

    def batches(self, split: str) -> Iterator[tuple[GemBatch, dict]]:
        """(GemBatch, extras: weight (B,), ts (B,), user (B,) raw ids, oracle (B, T) | None) in
        impression-time order."""
        for name in self.meta["files"][split]:
            for d in torch.load(self.path / name, weights_only=True):
                yield _unpack(d, self.features), {"weight": d["weight"], "ts": d["ts"], "user": d.get("user"),
                                                 "oracle": d.get("oracle")}


def materialize(source: EventSource, out: str | Path, dcfg: DatasetConfig, features: FeatureConfig, *,
                echo: Callable[[str], None] = print, keep_store: bool = False) -> Dataset:
    """Build (or reuse, when its fingerprint matches) the dataset of ``source`` under ``out``."""
    from opengem.features.store import StoreConfig
    from opengem.model.data import examples_batch
    from opengem.stream.codec import encode_batch
    from opengem.stream.ingest import IngestConfig, Ingestor, Record
    from opengem.stream.joiner import JoinerConfig

    out = Path(out)
    fp = fingerprint({"format": DATASET_FORMAT, "dataset": dataclasses.asdict(dcfg),
                      "features": dataclasses.asdict(features), "source": source.describe})
    if (out / "dataset.json").exists():
        ds = Dataset(out)
        if ds.fingerprint == fp:
            echo(f"dataset {out} ({fp}) exists: reused")
            return ds
        raise FileExistsError(f"{out} holds another dataset ({ds.fingerprint}, want {fp}); remove it or pick "
                              "another directory")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    cw, vw = int(dcfg.click_window_s * 1000), int(dcfg.conversion_window_s * 1000)
    lateness = int(dcfg.allowed_lateness_s * 1000)
    ing = Ingestor(tmp / "work", surfaces=features.surfaces, cfg=IngestConfig(
        store=StoreConfig(sync=False, max_events=dcfg.store_max_events, surfaces=tuple(features.surfaces)),
        joiner=JoinerConfig(sync=False, click_window_ms=cw, conversion_window_ms=vw, allowed_lateness_ms=lateness)))
    store = ing.shard(0).store
    samplers = {"train": NegativeSampler(dcfg.negative_rate, seed=dcfg.sample_seed),
                "test": NegativeSampler(dcfg.test_negative_rate, seed=dcfg.sample_seed)}
    cdf = 1.0
    if source.oracle is not None:
        from opengem.stream.simulator import conversion_delay_cdf

        cdf = float(conversion_delay_cdf(source.oracle, dcfg.conversion_window_s))
    tasks = tuple(features.tasks)
    heap: list[tuple[int, int, Any]] = []
    tie = itertools.count()
    pending: dict[str, list[tuple[Any, float]]] = {"train": [], "test": []}
    shard_buf: dict[str, list[dict]] = {"train": [], "test": []}
    files: dict[str, list[str]] = {"train": [], "test": []}
    stats = {s: {"examples": 0, "kept": 0, "weight": 0.0, **{f"{t}_positives": 0 for t in tasks}}
             for s in ("train", "test")}
    bounds: dict[str, int | None] = {"train": None, "test": None}
    dropped_tail = 0

    def write_shard(split: str) -> None:
        if not shard_buf[split]:
            return
        name = f"{split}-{len(files[split]):05d}.pt"
        torch.save(shard_buf[split], tmp / name)
        files[split].append(name)
        shard_buf[split] = []

    def featurize(split: str, final: bool = False) -> None:
        while len(pending[split]) >= dcfg.batch_size or (final and pending[split]):
            chunk = pending[split][: dcfg.batch_size]
            del pending[split][: dcfg.batch_size]
            exs = [e for e, _ in chunk]
            w = np.array([w for _, w in chunk], np.float64)
            b = examples_batch(exs, store, features, max_len=dcfg.max_len)
            oracle = None
            if source.oracle is not None and tasks == ("click", "conversion"):
                oracle = (np.array([e.p_click for e in exs], np.float64),
                          np.array([e.p_conversion for e in exs], np.float64) * cdf)
            shard_buf[split].append(_pack(b, exs, w, oracle))
            if len(shard_buf[split]) >= _SHARD_BATCHES:
                write_shard(split)

    def release(safe_ts: int) -> None:
        nonlocal dropped_tail
        while heap and heap[0][0] < safe_ts:
            ts, _, ex = heapq.heappop(heap)
            if bounds["train"] is None or ts < bounds["train"]:
                split = "train"
            elif bounds["test"] is None or ts < bounds["test"]:
                split = "test"
            else:
                dropped_tail += 1
                continue
            st = stats[split]
            st["examples"] += 1
            pos = any(getattr(ex, t) for t in tasks)
            w = samplers[split].weight(ex.example_id, pos)
            for t in tasks:
                st[f"{t}_positives"] += int(getattr(ex, t))
            if w > 0:
                st["kept"] += 1
                st["weight"] += w
                pending[split].append((ex, w))
        featurize("train")
        featurize("test")

    seen = off = 0
    last_echo = time.monotonic()
    max_ts = 0
    try:
        for rb in source.batches():
            n = rb.num_rows
            ts_col = rb.column(rb.schema.get_field_index("ts")).to_numpy(zero_copy_only=False)
            for name, idx in (("train", source.train_events), ("test", source.window_events)):
                if bounds[name] is None and seen <= idx < seen + n:
                    bounds[name] = int(ts_col[idx - seen])
            seen += n
            _, pairs = ing.process([Record(0, off, encode_batch(rb))], now_ms=2**62)
            off += 1
            for _, ex in pairs:
                heapq.heappush(heap, (ex.ts, next(tie), ex))
            max_ts = max(max_ts, int(ts_col.max()) if n else 0)
            release(max_ts - lateness - cw - vw)
            if time.monotonic() - last_echo > 10:
                last_echo = time.monotonic()
                echo(f"  materializing: {seen:,} events, train {stats['train']['kept']:,} / test "
                     f"{stats['test']['kept']:,} examples kept ({time.monotonic() - t0:.0f}s)")
        if bounds["test"] is None:  # a finite log: everything closed within ms (replayed labels)
            bounds["test"] = max_ts + 1
            release(2**62)
        else:
            release(max_ts - lateness - cw - vw)
        featurize("train", final=True)
        featurize("test", final=True)
        write_shard("train")
        write_shard("test")
        counters = {k: int(v) for k, v in ing.shard(0).joiner.counters().items()}
    finally:
        ing.close()
    if not keep_store:
        shutil.rmtree(tmp / "work", ignore_errors=True)
    meta = {
        "format": DATASET_FORMAT, "fingerprint": fp, "dataset": dataclasses.asdict(dcfg),
        "features": dataclasses.asdict(features), "source": source.describe, "oracle": source.oracle is not None,
        "conversion_window_cdf": cdf, "train_end_ts": bounds["train"], "test_end_ts": bounds["test"],
        "events_ingested": seen, "examples_after_test_window": dropped_tail, "open_at_end": len(heap),
        "stats": stats, "joiner": counters, "files": files, "build_s": round(time.monotonic() - t0, 1),
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    echo(f"dataset {out} ({fp}): train {stats['train']['kept']:,} examples kept of {stats['train']['examples']:,}, "
         f"test {stats['test']['kept']:,} of {stats['test']['examples']:,} ({meta['build_s']:.0f}s)")
    return Dataset(out)


# ------------------------------------------------------------------------------------ metrics


def cell(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """One (surface, task) cell: :func:`summarize` when every weight is 1 (exact), else the weighted estimate."""
    if np.all(w == 1.0):
        s = summarize(p, y)
        return s | {"weight": float(len(y))}
    return weighted_summary(p, y, w)


def window_metrics(p: np.ndarray, y: np.ndarray, w: np.ndarray, surface: np.ndarray,
                   surfaces: Sequence[str], tasks: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{surface | "all": {task: cell}} for predictions p (N, T), labels y (N, T), weights w (N,)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for si, s in [(None, "all")] + list(enumerate(surfaces)):
        sel = np.ones(len(w), bool) if si is None else surface == si
        if not sel.any():
            continue
        out[s] = {t: cell(p[sel, ti], y[sel, ti], w[sel]) for ti, t in enumerate(tasks)}
    return out


# ------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # gem | dlrm | dcn
    cfg: Any
    note: str = ""


def standard_models(preset_name: str, features: FeatureConfig) -> dict[str, ModelSpec]:
    """GEM, its ablations and the baselines, all on ``features`` (the dataset's tables)."""
    from dataclasses import replace

    from opengem.model.baselines import BaselineConfig
    from opengem.model.config import gem_last_n, preset, with_pyramid

    g = replace(preset(preset_name), features=features)
    base = BaselineConfig(features=features, d=g.d)
    specs = [
        ModelSpec("gem", "gem", g, f"GEM {preset_name}: every part on"),
        ModelSpec("dlrm", "dlrm", base, "TorchRec DLRM (no history sequence, no surface head)"),
        ModelSpec("dcn", "dcn", base, "TorchRec DLRM_DCN (DCNv2 cross net)"),
        ModelSpec("gem_no_sequence", "gem", replace(g, use_sequence=False), "no sequence arch"),
        ModelSpec("gem_short_history", "gem", gem_last_n(g, 50), "only the last 50 events, one branch"),
        ModelSpec("gem_no_pyramid", "gem", with_pyramid(g, pyramid=False, max_len=256),
                  "one full-resolution branch over the last 256 events"),
        ModelSpec("gem_no_interleave", "gem", replace(g, interleave=False), "sequence arch first, then Wukong"),
        ModelSpec("gem_shared_head", "gem", replace(g, heads=replace(g.heads, per_surface=False)),
                  "one head for every surface"),
        ModelSpec("gem_no_strong", "gem", replace(g, pyramid=replace(g.pyramid, search_strong=0)),
                  "no strong-kind search slots (only the most recent matches)"),
        # a variant, not an ablation: shared expert MLPs mixed per surface by a gate, linear surface towers
        # (the per-surface towers fragment the rare conversion labels four ways; one shared head does not)
        ModelSpec("gem_mmoe", "gem", replace(g, heads=replace(g.heads, n_experts=4)),
                  "4 gated experts shared by the surfaces (MMoE), a linear tower per surface"),
        ModelSpec("gem_shared_conversion", "gem", replace(g, heads=replace(g.heads, shared_stages=(1,))),
                  "per-surface click towers, one conversion tower shared by the surfaces"),
        # the run of 2026-12-03/06 that tried the slots before the base preset had them
        ModelSpec("gem_search_strong", "gem", replace(g, pyramid=replace(g.pyramid, search_strong=8)),
                  "GEM + 8 search slots for the most recent matching conversions / clicks / follows"),
    ]
    return {s.name: s for s in specs}


def scaling_models(preset_name: str, features: FeatureConfig, max_len: int) -> dict[str, ModelSpec]:
    """GEM at three sizes (same tables) and at history windows 50 / 500 / ``max_len``."""
    from dataclasses import replace

    from opengem.model.config import gem_last_n, preset, with_pyramid

    g = replace(preset(preset_name), features=features)
    small = replace(g, d=max(8, g.d // 2), wukong=replace(g.wukong, n_layers=max(2, g.wukong.n_layers - 1),
                                                          n_fm=max(2, g.wukong.n_fm // 2), n_lcb=max(2, g.wukong.n_lcb // 2)),
                    heads=replace(g.heads, trunk=tuple(max(8, t // 2) for t in g.heads.trunk),
                                  tower=tuple(max(4, t // 2) for t in g.heads.tower)),
                    dense_hidden=max(8, g.dense_hidden // 2))
    big = replace(g, d=g.d * 2, wukong=replace(g.wukong, n_fm=g.wukong.n_fm * 2, n_lcb=g.wukong.n_lcb * 2),
                  heads=replace(g.heads, trunk=tuple(t * 2 for t in g.heads.trunk),
                                tower=tuple(t * 2 for t in g.heads.tower)),
                  dense_hidden=g.dense_hidden * 2)
    specs = [
        ModelSpec("gem_size_s", "gem", small, "half width"),
        ModelSpec("gem", "gem", g, f"{preset_name}"),
        ModelSpec("gem_size_l", "gem", big, "double width"),
        ModelSpec("gem_short_history", "gem", gem_last_n(g, 50), "last 50 events"),
        ModelSpec("gem_hist_500", "gem", with_pyramid(g, max_len=500), "pyramid over 500 events"),
        ModelSpec(f"gem_hist_{max_len}", "gem", with_pyramid(g, max_len=max_len), f"pyramid over {max_len} events"),
    ]
    return {s.name: s for s in specs}


# ------------------------------------------------------------------------------------ train + evaluate


def train_and_evaluate(spec: ModelSpec, ds: Dataset, *, seed: int = 0, tcfg: Any = None, results_dir: str | Path,
                       curve_every: int = 2048, curve_window: int = 20_000, force: bool = False,
                       echo: Callable[[str], None] = print) -> dict | None:
    """Train ``spec`` on the train window (predict-then-train), score the test window frozen.

    Writes and returns ``<results_dir>/<name>.json``; an existing file with the same
    fingerprint (dataset, model config, train config, seed) is returned as is. Another
    live process training the same model (its ``.lock``): returns None.
    """
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import quiet_torchrec

    quiet_torchrec()
    tcfg = tcfg or TrainConfig()
    feats = getattr(spec.cfg, "features", None)
    if feats != ds.features:
        raise ValueError(f"{spec.name}: model features differ from the dataset's (tables / surfaces / tasks)")
    fp = fingerprint({"dataset": ds.fingerprint, "kind": spec.kind, "cfg": _model_describe(spec.cfg),
                      "train": {k: getattr(tcfg, k) for k in ("lr", "emb_lr")}, "seed": seed})
    out = Path(results_dir) / f"{spec.name}.json"
    if out.exists() and not force:
        prev = json.loads(out.read_text())
        if prev.get("fingerprint") == fp:
            echo(f"{spec.name}: results {out} exist ({fp}), skipped")
            return prev
    lock = _Lock(out.with_suffix(".lock"))
    if not lock.acquire():
        echo(f"{spec.name}: being trained by process {lock.holder()}, skipped")
        return None
    try:
        return _train_and_evaluate(spec, ds, seed, tcfg, out, fp, curve_every, curve_window, echo)
    finally:
        lock.release()


class _Lock:
    """A results file's lock: a file holding the trainer's pid (stale when that process is gone)."""

    def __init__(self, path: Path):
        self.path = path

    def holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = self.holder()
                if pid and pid != os.getpid() and _alive(pid):
                    return False
                self.path.unlink(missing_ok=True)  # stale
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self) -> None:
        if self.holder() == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train_and_evaluate(spec: ModelSpec, ds: Dataset, seed: int, tcfg: Any, out: Path, fp: str, curve_every: int,
                        curve_window: int, echo: Callable[[str], None]) -> dict:
    from opengem.model.distributed import init_distributed
    from opengem.model.gem import n_params
    from opengem.model.trainer import OnlineLearner

    code = code_version()  # as the sources stand when this model is built
    info = init_distributed("cpu")
    learner = OnlineLearner(spec.kind, spec.cfg, tcfg, info, seed=seed)
    from opengem.model.registry import build_model

    params = n_params(build_model(spec.kind, spec.cfg, device=torch.device("meta")))
    surfaces, tasks = tuple(ds.features.surfaces), tuple(ds.features.tasks)
    total = ds.meta["stats"]["train"]["kept"]
    win = WeightedWindow(curve_window)
    curve: list[dict] = []
    t0 = time.monotonic()
    n = since = 0
    last_echo = t0
    train_p, train_y, train_w = [], [], []
    stream_n = 0.0
    for batch, ex in ds.batches("train"):
        probs = learner.step(batch, ex["weight"]).numpy()
        y, w = batch.labels.numpy(), ex["weight"].numpy()
        for ti, t in enumerate(tasks):
            win.add(t, probs[:, ti], y[:, ti], w)
        train_p.append(probs), train_y.append(y), train_w.append(w)
        stream_n += float(w.sum())
        n += len(batch)
        since += len(batch)
        if since >= curve_every:
            since = 0
            s = win.summary()
            curve.append({"examples": n, "stream_examples": stream_n,
                          **{f"ne_{t}": s[t]["ne"] for t in tasks}})
        if time.monotonic() - last_echo > 15:
            last_echo = time.monotonic()
            el = last_echo - t0
            ne_txt = " ".join(f"NE[{t}]={curve[-1][f'ne_{t}']:.4f}" for t in tasks) if curve else ""
            echo(f"  {spec.name}: train {n:,}/{total:,} ({n / el:,.0f} ex/s, eta {(total - n) / max(n / el, 1e-9):,.0f}s) "
                 f"{ne_txt}")
    train_s = time.monotonic() - t0
    t1 = time.monotonic()
    ps, ys, ws, ss, orc = [], [], [], [], []
    for batch, ex in ds.batches("test"):
        ps.append(learner.predict(batch).numpy())
        ys.append(batch.labels.numpy())
        ws.append(ex["weight"].numpy().astype(np.float64))
        ss.append(batch.surface_idx.numpy())
        if ex["oracle"] is not None:
            orc.append(ex["oracle"].numpy())
    test_s = time.monotonic() - t1
    P, Y, W, S = (np.concatenate(a) for a in (ps, ys, ws, ss))
    res = {
        "model": spec.name, "kind": spec.kind, "note": spec.note, "fingerprint": fp, "dataset": ds.fingerprint,
        "seed": seed, "params": params, "config": dataclasses.asdict(spec.cfg), "code": code,
        "train_examples": n, "train_s": round(train_s, 1), "test_s": round(test_s, 1),
        "train_examples_per_s": n / max(train_s, 1e-9),
        "test": window_metrics(P, Y, W, S, surfaces, tasks),
        "train_progressive": window_metrics(np.concatenate(train_p), np.concatenate(train_y), np.concatenate(train_w),
                                            np.zeros(n, np.int64), ("all",), tasks).get("all"),
        "curve": curve,
    }
    if orc:
        res["oracle"] = window_metrics(np.concatenate(orc), Y, W, S, surfaces, tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The test predictions, for paired comparisons between models (same rows in every file).
    np.savez_compressed(out.with_suffix(".test.npz"), p=P.astype(np.float32), y=Y.astype(np.int8),
                        w=W.astype(np.float32), s=S.astype(np.int8),
                        **({"oracle": np.concatenate(orc).astype(np.float32)} if orc else {}))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(res), indent=1) + "\n")
    os.replace(tmp, out)
    a = res["test"]["all"]
    echo(f"{spec.name}: test NE " + " ".join(f"{t}={a[t]['ne']:.4f}" for t in tasks)
         + f" AUC " + " ".join(f"{t}={a[t]['auc']:.4f}" for t in tasks)
         + f" ({n:,} train examples in {train_s:.0f}s, test {test_s:.0f}s)")
    return res


def _finite(v: Any) -> Any:
    """NaN / inf -> None, so the JSON is strict."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# ------------------------------------------------------------------------------------ report


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def summary(results: dict[str, dict], surfaces: Sequence[str], tasks: Sequence[str],
            gem: str = "gem", baseline: str = "dlrm") -> dict[str, Any]:
    """The headline figures: per model, surface and task ``ne``, ``auc``, ``calibration``
    (+ ``oracle_ne``); ``ne_gap_to_oracle`` = mean over surfaces of (ne - oracle_ne) /
    oracle_ne of GEM, ``gem_vs_dlrm_ne_gain`` = mean over surfaces of (ne_dlrm - ne_gem) /
    ne_dlrm -- each per task, the headline (no suffix) being the mean over tasks."""
    models: dict[str, Any] = {}
    for name, r in results.items():
        m: dict[str, Any] = {}
        for s in ["all", *surfaces]:
            if s not in r["test"]:
                continue
            m[s] = {}
            for t in tasks:
                c = r["test"][s][t]
                d = {"ne": c.get("ne"), "auc": c.get("auc"), "calibration": c.get("calibration"), "n": c.get("n"),
                     "positives_weighted": None if c.get("rate") is None else c["rate"] * c.get("weight", c["n"])}
                if "oracle" in r:
                    d["oracle_ne"] = r["oracle"][s][t].get("ne")
                m[s][t] = d
        models[name] = m
    out: dict[str, Any] = {"models": models}

    def mean_over_surfaces(f: Callable[[str, str], float], t: str) -> float | None:
        vals = [f(s, t) for s in surfaces]
        vals = [v for v in vals if v == v]
        return float(np.mean(vals)) if vals else None

    if gem in models:
        g = models[gem]
        if all("oracle_ne" in g[s][t] for s in surfaces if s in g for t in tasks):
            gap = {t: mean_over_surfaces(lambda s, t: (_num(g[s][t]["ne"]) - _num(g[s][t]["oracle_ne"]))
                                         / _num(g[s][t]["oracle_ne"]) if s in g else math.nan, t) for t in tasks}
            out["ne_gap_to_oracle_by_task"] = gap
            out["ne_gap_to_oracle"] = _mean([gap[t] for t in tasks])
        if baseline in models:
            b = models[baseline]
            gain = {t: mean_over_surfaces(lambda s, t: (_num(b[s][t]["ne"]) - _num(g[s][t]["ne"])) / _num(b[s][t]["ne"])
                                          if s in g and s in b else math.nan, t) for t in tasks}
            out[f"gem_vs_{baseline}_ne_gain_by_task"] = gain
            out[f"gem_vs_{baseline}_ne_gain"] = _mean([gain[t] for t in tasks])
        for other in models:
            if other == gem:
                continue
            o = models[other]
            out.setdefault("ne_delta_vs_gem", {})[other] = {
                t: {s: (None if s not in o or s not in g else _num(o[s][t]["ne"]) - _num(g[s][t]["ne"]))
                    for s in ["all", *surfaces]} for t in tasks}
    return _finite(out)


def _mean(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and x == x]
    return float(np.mean(xs)) if xs else None


def table_rows(results: dict[str, dict], surfaces: Sequence[str], tasks: Sequence[str]) -> list[list[Any]]:
    """One row per (model, surface): NE / AUC / calibration per task, oracle NE."""
    rows = []
    for name, r in results.items():
        for s in ["all", *surfaces]:
            if s not in r["test"]:
                continue
            row: list[Any] = [name, s]
            for t in tasks:
                c = r["test"][s][t]
                row += [_num(c.get("ne")), _num(c.get("auc")), _num(c.get("calibration"))]
            if "oracle" in r:
                row += [_num(r["oracle"][s][t].get("ne")) for t in tasks]
            rows.append(row)
    return rows


def table_header(tasks: Sequence[str], oracle: bool) -> list[str]:
    h = ["model", "surface"]
    for t in tasks:
        h += [f"NE {t}", f"AUC {t}", f"cal {t}"]
    if oracle:
        h += [f"oracle NE {t}" for t in tasks]
    return h


def fmt_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def f(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.4f}"
        return str(v)

    cells = [list(map(str, header))] + [[f(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str | Path, tasks: Sequence[str], title: str = "") -> Path:
    """Learning curves: progressive NE (trailing window, train stream) per model and task, plus
    the test NE per model as a marker at the end of each curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ti, t in enumerate(tasks):
        ax = axes[0][ti]
        for name, r in results.items():
            xs = [c["stream_examples"] for c in r.get("curve", []) if c.get(f"ne_{t}") is not None]
            ys = [c[f"ne_{t}"] for c in r.get("curve", []) if c.get(f"ne_{t}") is not None]
            if not xs:
                continue
            line, = ax.plot(xs, ys, label=name, lw=1.2)
            test_ne = r["test"]["all"][t].get("ne")
            if test_ne is not None:
                ax.plot([xs[-1]], [test_ne], "o", color=line.get_color(), ms=5)
        vals = [c[f"ne_{t}"] for r in results.values() for c in r.get("curve", []) if c.get(f"ne_{t}") is not None]
        vals += [r["test"]["all"][t]["ne"] for r in results.values() if r["test"]["all"][t].get("ne") is not None]
        if vals:  # early baseline NE (an untrained bias) can be several times the rest: clip the view
            ax.set_ylim(max(0.0, min(vals) - 0.02), min(max(vals), min(vals) + 0.15) + 0.005)
        ax.set_title(f"{t}: progressive NE (train window); dot = test NE")
        ax.set_xlabel("stream examples (kept examples x weight)")
        ax.set_ylabel("NE")
        ax.grid(alpha=0.3)
        if ti == 0 and ax.get_lines():
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_results(results_dir: str | Path, names: Iterable[str], dataset_fp: str) -> dict[str, dict]:
    """The per-model results of ``names`` on that dataset, in the given order (missing ones skipped)."""
    out = {}
    for n in names:
        f = Path(results_dir) / f"{n}.json"
        if f.exists():
            r = json.loads(f.read_text())
            if r.get("dataset") == dataset_fp:
                out[n] = r
    return out


# ------------------------------------------------------------------------------------ one call


def replay_source(path: str | Path, mapping: str, test_fraction: float, surfaces: Sequence[str]) -> EventSource:
    """A logged interaction file (Parquet / CSV / TSV) through ``opengem replay``'s mapping, as a source."""
    from opengem.stream.replay import parse_mapping, replay_file

    events: list[Any] = []
    report = replay_file(path, parse_mapping(mapping), events.extend, surfaces=surfaces)
    if not events:
        raise ValueError(f"{path}: no valid events ({report.bad_rows} bad rows)")
    st = os.stat(path)
    return event_list_source(events, test_fraction, describe={
        "kind": "replay", "file": Path(path).name, "bytes": st.st_size, "mapping": mapping,
        "test_fraction": test_fraction, "rows": report.rows, "bad_rows": report.bad_rows})


def parquet_source(path: str | Path, test_fraction: float) -> EventSource:
    """An event-schema Parquet file (``opengem simulate --parquet``), ts-ordered as written.
    Its p_click / p_conversion are not used as an oracle (the simulator config is unknown)."""
    import pyarrow.parquet as pq

    from opengem.stream.codec import EVENT_SCHEMA

    pf = pq.ParquetFile(path)
    n = pf.metadata.num_rows
    n_test = max(1, int(round(n * test_fraction)))

    def batches() -> Iterator[Any]:
        for rb in pf.iter_batches(batch_size=16384):
            yield rb.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)

    return EventSource(batches=batches, train_events=n - n_test, window_events=n,
                       describe={"kind": "parquet", "file": Path(path).name, "rows": n, "test_fraction": test_fraction})


def run_evaluation(source: EventSource, dcfg: DatasetConfig, specs: Sequence[ModelSpec], work: str | Path, *,
                   seed: int = 0, json_out: str | Path | None = None, plot_out: str | Path | None = None,
                   baseline: str = "dlrm", label: str = "", force: bool = False,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Materialize ``source`` once, train + score every spec on it, print the table, write JSON + PNG."""
    work = Path(work)
    features = specs[0].cfg.features
    ds = materialize(source, work / "dataset", dcfg, features, echo=echo)
    results = {}
    for s in specs:
        results[s.name] = train_and_evaluate(s, ds, seed=seed, results_dir=work / "models", force=force, echo=echo)
    surfaces, tasks = tuple(features.surfaces), tuple(features.tasks)
    echo("")
    echo(fmt_table(table_rows(results, surfaces, tasks), table_header(tasks, ds.has_oracle)))
    gem = next((s.name for s in specs if s.kind == "gem"), None)
    figures = summary(results, surfaces, tasks, gem=gem or "gem", baseline=baseline)
    for k in ("ne_gap_to_oracle", f"gem_vs_{baseline}_ne_gain"):
        if figures.get(k) is not None:
            echo(f"{k}: {figures[k]:+.4f}  by task {figures.get(k + '_by_task')}")
    doc = {"label": label, "seed": seed, "dataset": {k: ds.meta[k] for k in (
        "fingerprint", "dataset", "source", "stats", "joiner", "conversion_window_cdf", "events_ingested")},
        **figures,
        "per_model": {n: {k: r[k] for k in ("train_examples", "train_s", "test_s", "params", "note", "fingerprint")}
                      for n, r in results.items()}}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(_finite(doc), indent=2) + "\n")
        echo(f"wrote {json_out}")
    if plot_out:
        plot(results, plot_out, tasks, title=label)
        echo(f"wrote {plot_out}")
    return doc


def ne_rows(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted NE (log loss / entropy of the weighted base rate) of one task's rows; NaN without both labels."""
    from opengem.model.metrics import EPS, entropy

    pc = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    tot = w.sum()
    rate = float((w * y).sum() / tot)
    h = entropy(rate)
    ll = float(-(w * (y * np.log(pc) + (1 - y) * np.log1p(-pc))).sum() / tot)
    return ll / h if h == h and h > 0 else math.nan


def paired_bootstrap(pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray, w: np.ndarray, *, n_boot: int = 300,
                     seed: int = 0) -> dict[str, float]:
    """NE(b) - NE(a) on the same rows, with a 95 % interval from resampling the rows (paired:
    both models are scored on each resample). Positive = b is worse."""
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        diffs[i] = ne_rows(pred_b[idx], y[idx], w[idx]) - ne_rows(pred_a[idx], y[idx], w[idx])
    diffs = diffs[np.isfinite(diffs)]
    return {"delta": ne_rows(pred_b, y, w) - ne_rows(pred_a, y, w),
            "lo": float(np.percentile(diffs, 2.5)) if diffs.size else math.nan,
            "hi": float(np.percentile(diffs, 97.5)) if diffs.size else math.nan}


def compare_to(ref: str, names: Iterable[str], results_dir: str | Path, surfaces: Sequence[str],
               tasks: Sequence[str], n_boot: int = 300) -> dict[str, Any]:
    """{model: {task: {surface | "all": {delta, lo, hi}}}} of NE(model) - NE(ref) from the saved test
    predictions (models without a ``.test.npz`` are left out)."""
    d = Path(results_dir)
    f_ref = d / f"{ref}.test.npz"
    if not f_ref.exists():
        return {}
    a = np.load(f_ref)
    out: dict[str, Any] = {}
    for n in names:
        f = d / f"{n}.test.npz"
        if n == ref or not f.exists():
            continue
        b = np.load(f)
        if b["p"].shape != a["p"].shape or not np.array_equal(a["y"], b["y"]):
            continue
        out[n] = {}
        for ti, t in enumerate(tasks):
            out[n][t] = {}
            for si, s in [(None, "all")] + list(enumerate(surfaces)):
                sel = np.ones(len(a["y"]), bool) if si is None else a["s"] == si
                out[n][t][s] = paired_bootstrap(a["p"][sel, ti], b["p"][sel, ti], a["y"][sel, ti].astype(np.float64),
                                                a["w"][sel].astype(np.float64), n_boot=n_boot)
    return _finite(out)


def code_version() -> dict[str, Any]:
    """The commit and a hash of the model / features / stream sources this process imported
    (the working tree may hold uncommitted edits: the hash says whether two runs used the same code)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("model", "features", "stream"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"commit": commit, "sources_sha": h.hexdigest()[:12]}
