"""Ranking server latency and throughput: GEM vs the DLRM baseline served the same way.

The server is `opengem serve` in its own process (real RocksDB shards, a
published model version, gRPC on 127.0.0.1); this process is the load
generator: closed-loop client threads, each sending pre-built requests back to
back. Per (candidates, history) case and concurrency level: p50 / p99 client
latency and throughput, for GEM (``--preset``, default base) and for the DLRM
baseline on the same data (the ratio carries the claim on a shared machine).

The same run also serves the design before issue 6 (GEM with
``seq_conditioning="target"``: the pyramid conditioned on the ad, its layers
run per candidate) at 500 candidates x 1k (``ablation_target_conditioned_500c_1k``),
and the cost of metrics on the hot path (``metrics_cost``: the same version
served by two servers at once, one with ``OPENGEM_METRICS=off``, load rounds
alternating between them; ``ratio`` = p99 on / p99 off), and ``[serve] precision =
"bf16"`` against the default fp32 the same way (``precision_bf16``: latency at
concurrency 1, CPU per request in process, how far bf16 moves the scores and
whether the top 10 keep their order; ``amx_bf16`` says whether this CPU has AMX).

On a machine shared with other jobs, wall-clock latency mostly measures their
load; ``cpu_per_request_500c_1k`` is the server's lifecycle in-process on one
thread, in CPU milliseconds per request (``time.process_time``), per model, and
``load_average_1m_at_end`` says how busy the machine was.

Then sustained load with a new model version published every ``--swap-every``
seconds: failed requests (must be 0), swaps seen in responses, and the latency
of requests that overlapped a swap against the rest. Last, an in-process
profile of one 500-candidate / 1k-history GEM request: what the time goes to, and
what a full garbage collection costs with the server's objects in memory,
before and after ``freeze_heap`` (``gc_full_collection_ms``).

With ``--options-only``: GEM 500 candidates x 1k served with ``[serve] precision =
"bf16"``, ``threads = 2`` (a host that only serves) and both, against the defaults,
alternating load rounds at concurrency 1 and 4 (``bench/results/serve-options.json``).

With ``--processes-only``: GEM 500 candidates x 1k served by ``opengem serve
--processes 2`` against one process, alternating load rounds at concurrency
1 / 2 / 4 / 8 (``bench/results/serve-processes.json``).

    .venv/bin/python bench/serve.py [--quick] [--preset base] [--options-only | --processes-only]
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, table, write  # noqa: E402

P = 2  # shards (Kafka partitions)
N_ADS = 5000
T0 = 1_700_000_000_000


def _kinds(rng: np.random.Generator, ad: np.ndarray) -> np.ndarray:
    """Event kinds at about the simulator's rates: ad rows are impressions, 5 % of them clicks and
    0.7 % conversions (the search branch's strong-kind slots look for those, and follows);
    organic rows views, likes, shares, comments, 2 % follows."""
    r = rng.random(len(ad))
    ad_kind = np.where(r < 0.007, "conversion", np.where(r < 0.057, "click", "impression"))
    organic = rng.choice(["view", "like", "share", "comment", "follow"], len(ad), p=[0.70, 0.15, 0.06, 0.07, 0.02])
    return np.where(ad, ad_kind, organic)


def build_store(data: Path, users_per_len: int, lengths: tuple[int, ...]) -> dict[int, list[int]]:
    """RocksDB shards (as the stream worker lays them out) with users of exactly these history lengths."""
    from opengem.features.sharded import shard_dir
    from opengem.features.store import SequenceStore, StoreConfig
    from opengem.stream.events import AD_FORMATS, DEFAULT_SURFACES, DEVICES
    from opengem.stream.producer import partition_of

    rng = np.random.default_rng(0)
    users: dict[int, list[int]] = {n: [] for n in lengths}
    cols: dict[int, list[dict[str, np.ndarray]]] = {p: [] for p in range(P)}
    uid = 1000
    for n in lengths:
        for _ in range(users_per_len):
            uid += 1
            users[n].append(uid)
            ad = rng.random(n) < 0.3
            item = np.where(ad, rng.integers(0, N_ADS, n), rng.integers(10**6, 10**6 + 50_000, n))
            cols[partition_of(uid, P)].append({
                "user_id": np.full(n, uid), "ts": T0 + np.sort(rng.integers(0, 30 * 86_400_000, n)),
                "item_id": item, "surface": rng.choice(DEFAULT_SURFACES, n),
                "kind": _kinds(rng, ad),
                "category": item % 97, "advertiser_id": np.where(ad, item % 331, -1),
                "ad_format": np.where(ad, np.array(AD_FORMATS)[item % 4], None),
                "device": np.full(n, DEVICES[uid % 4]), "country": np.full(n, "US"), "age_bucket": np.full(n, uid % 8),
            })
    for p, parts in cols.items():
        path = shard_dir(data, "opengem.events", p) / "store"
        path.parent.mkdir(parents=True, exist_ok=True)
        store = SequenceStore(str(path), StoreConfig(sync=False))
        for i, c in enumerate(parts):
            store.apply(c, (p, i))
        store.flush()
        store.close()
    return users


def publish(models: Path, kind: str, preset_name: str, seed: int, **gem: Any) -> str:
    import torch

    from opengem.model import registry
    from opengem.model.baselines import BaselineConfig, DLRMBaseline
    from opengem.model.config import preset
    from opengem.model.gem import GemModel

    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset(preset_name), **gem)
    model = GemModel(cfg) if kind == "gem" else DLRMBaseline(BaselineConfig(features=cfg.features))
    return registry.publish(models, model, {"bench": True}).name


class Server:
    """`opengem serve` as a child process on a free port; ``env``: extra environment (e.g. metrics off)."""

    def __init__(self, data: Path, models: Path, workdir: Path, env: dict[str, str] | None = None, tag: str = "",
                 processes: int = 1, serve: str = ""):
        conf = workdir / f"serve{tag}.toml"
        conf.write_text(f"[kafka]\npartitions = {P}\n[serve]\nmax_candidates = 1000\nmax_request_bytes = 4194304\n"
                        "timeout_s = 60.0\npoll_s = 0.5\n" + serve)
        self.log = open(workdir / f"server-{models.name}{tag}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opengem.cli", "serve", "--config", str(conf), "--data-dir", str(data),
             "--models-dir", str(models), "--port", "0", "--metrics-port", "-1", "--processes", str(processes)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.log.seek(0)
            # (several processes: the supervisor's line, once every child serves)
            m = re.search(r"^opengem serve: " + (f"{processes} processes, " if processes > 1 else "")
                          + r"gRPC on 127\.0\.0\.1:(\d+)", self.log.read(), re.M)
            if m:
                self.target = f"127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.log.seek(0)
        raise RuntimeError(f"server did not start:\n{self.log.read()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def requests_for(users: list[int], n_cands: int, n: int, seed: int) -> list[bytes]:
    """Serialized RankRequests (built once: the client's own cost stays out of the figures)."""
    from opengem.serving.client import build_request

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ads = rng.choice(N_ADS + 2000, n_cands, replace=False)  # ids >= N_ADS: ads the store never saw
        out.append(build_request(int(users[i % len(users)]), "feed", [{"ad_id": int(a), "bid": 1.0} for a in ads],
                                 context={"ts_ms": T0 + 31 * 86_400_000, "hour": 12}).SerializeToString())
    return out


def load(target: str, reqs: list[bytes], concurrency: int, duration_s: float, min_requests: int,
         on_result: Any = None) -> dict[str, Any]:
    """Closed loop: ``concurrency`` threads send back to back for ``duration_s`` (and ``min_requests``),
    each on a channel of its own (one connection per caller, as independent callers have: a
    server with several processes gets each connection on one of them)."""
    import grpc

    from opengem.serving import ranking_pb2 as pb

    channels = [grpc.insecure_channel(target, [("grpc.max_send_message_length", 16 << 20),
                                               ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(concurrency)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    calls = [ch.unary_unary("/opengem.serving.v1.Ranker/Rank", response_deserializer=pb.RankResponse.FromString)
             for ch in channels]
    lat: list[float] = []
    failed: list[str] = []
    lock = threading.Lock()
    t_start = time.monotonic()
    stop_at = t_start + duration_s

    def worker(k: int) -> None:
        i = k
        call = calls[k]
        while time.monotonic() < stop_at or len(lat) + len(failed) < min_requests:
            t0 = time.monotonic()
            try:
                resp = call(reqs[i % len(reqs)], timeout=120)
                dt = time.monotonic() - t0
                with lock:
                    lat.append(dt)
                if on_result:
                    on_result(t0, dt, resp)
            except grpc.RpcError as e:
                with lock:
                    failed.append(f"{e.code().name}: {e.details()}")
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    for channel in channels:
        channel.close()
    ms = np.array(lat) * 1e3
    return {"n": len(lat), "failed": len(failed), "errors": failed[:3],
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "qps": len(lat) / elapsed,
            "ms": ms, "elapsed_s": elapsed}


def profile_one(data: Path, models: Path, users: list[int], n_cands: int) -> dict[str, Any]:
    """In-process: where one request's time goes (store read + featurize, the user encoding,
    the candidates, top torch ops). Best of 5, wall clock."""
    import torch

    from opengem.features.sharded import ShardedReader
    from opengem.model.gem import GemModel
    from opengem.model.heads import funnel_probs
    from opengem.model.registry import load as load_model
    from opengem.serving.scoring import AdCandidate, RankQuery, Scorer, featurize

    from opengem.serving.config import ServeConfig

    torch.set_num_threads(ServeConfig().threads or torch.get_num_threads())  # as the server runs it
    scorer = Scorer(load_model(models))
    m = scorer.loaded.model
    reader = ShardedReader(data, P, secondary_root=data / "readers" / "profile")
    rng = np.random.default_rng(1)
    q = RankQuery(user_id=users[0], surface="feed", ts_ms=T0 + 31 * 86_400_000, hour=12,
                  candidates=tuple(AdCandidate(ad_id=int(a)) for a in rng.choice(N_ADS, n_cands, replace=False)))
    feat, score, enc, cand = [], [], [], []
    for _ in range(5):
        t0 = time.perf_counter()
        rb = featurize(q, reader, scorer.cfg)
        t1 = time.perf_counter()
        scorer.probs(rb)
        feat.append(t1 - t0)
        score.append(time.perf_counter() - t1)
        if isinstance(m, GemModel) and scorer.shared:
            with torch.inference_mode():
                t2 = time.perf_counter()
                u = m.encode_user(rb.user)
                t3 = time.perf_counter()
                funnel_probs(m.candidate_logits(u, rb.cands))
                enc.append(t3 - t2)
                cand.append(time.perf_counter() - t3)
    with torch.profiler.profile() as prof:
        scorer.probs(rb)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    reader.close()
    best = lambda xs: 1e3 * min(xs) if xs else None  # noqa: E731
    return {"featurize_ms": best(feat), "score_ms": best(score), "encode_user_ms": best(enc),
            "candidates_ms": best(cand), "history_events": rb.history_events,
            "shared_history_path": scorer.shared, "seq_conditioning": getattr(scorer.cfg, "seq_conditioning", None),
            "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3)} for e in ops]}


def in_process_ranker(reader: Any, scorer: Any, mdir: Path) -> Any:
    """The server's Ranker over ``reader`` serving ``scorer`` (no model watcher: what the
    in-process measurements below run ``rank_proto`` on)."""
    from opengem.serving.config import ServeConfig
    from opengem.serving.ranker import Ranker

    class Models:  # what Ranker reads of a ModelManager
        current, models_dir = scorer, mdir

    return Ranker(reader, Models(), ServeConfig(max_candidates=1000, timeout_s=60.0))


def cpu_per_request(data: Path, dirs: dict[str, Path], reqs: list[bytes], n: int = 100) -> dict[str, Any]:
    """In-process, the server's lifecycle on one thread (``rank_proto``: parse, validate, featurize,
    score, serialize) per model: CPU seconds per request (``time.process_time``), which, unlike
    wall time, does not grow with other jobs on a shared machine. With the server's one intra-op
    thread and nothing else running, a request at concurrency 1 takes about this long."""
    import torch

    from opengem.features.sharded import ShardedReader
    from opengem.model.registry import load as load_model
    from opengem.serving import ranking_pb2 as pb
    from opengem.serving.scoring import Scorer
    from opengem.serving.server import rank_proto

    torch.set_num_threads(1)
    reader = ShardedReader(data, P, secondary_root=data / "readers" / "cpu")
    msgs = [pb.RankRequest.FromString(r) for r in reqs]
    out = {}
    for name, mdir in dirs.items():
        scorer = Scorer(load_model(mdir))
        ranker = in_process_ranker(reader, scorer, mdir)
        reps = n if scorer.shared or not scorer.uses_history else max(n // 3, 2)
        cpu, wall = [], []
        for i in range(reps + 1):
            c0, w0 = time.process_time(), time.perf_counter()
            code = rank_proto(ranker, msgs[i % len(msgs)], None)[0]
            if i:  # the first: warm-up
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            assert code.name == "OK", code
        # p99: the request's own CPU tail (the same 32 requests over and over), which the RPC's p99 at
        # concurrency 1 cannot beat
        out[name] = {"cpu_ms_median": 1e3 * float(np.median(cpu)), "cpu_ms_min": 1e3 * min(cpu),
                     "cpu_ms_p99": 1e3 * float(np.percentile(cpu, 99)),
                     "wall_ms_median": 1e3 * float(np.median(wall)), "n": len(cpu)}
    reader.close()
    out["cpu_ratio_gem_to_dlrm"] = out["gem"]["cpu_ms_median"] / out["dlrm"]["cpu_ms_median"]
    if "gem_target" in out:
        out["cpu_ratio_user_to_target"] = out["gem"]["cpu_ms_median"] / out["gem_target"]["cpu_ms_median"]
    return out


def gc_pause(data: Path, mdir: Path, reqs: list[bytes], n: int = 3) -> dict[str, Any]:
    """The garbage collector's full collection (``gc.collect()``; every thread waits: the GIL) in
    this process once it holds what a server holds (torch, gRPC, the reader, a loaded GEM, a few
    served requests), before and after ``opengem.runtime.freeze_heap`` -- what ``opengem serve``
    calls once started (``[serve] gc_freeze``) -- with a second version loaded after the
    freeze (a hot swap). Python starts such a collection by itself now and then."""
    import gc

    from opengem.features.sharded import ShardedReader
    from opengem.model.registry import load as load_model
    from opengem.runtime import freeze_heap
    from opengem.serving import ranking_pb2 as pb
    from opengem.serving.scoring import Scorer
    from opengem.serving.server import rank_proto

    reader = ShardedReader(data, P, secondary_root=data / "readers" / "gc")
    msgs = [pb.RankRequest.FromString(r) for r in reqs[:4]]

    def full_ms() -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            gc.collect()
            out.append(1e3 * (time.perf_counter() - t))
        return out

    ranker = in_process_ranker(reader, Scorer(load_model(mdir)), mdir)
    for m in msgs:
        rank_proto(ranker, m, None)
    tracked = len(gc.get_objects())
    before = full_ms()
    frozen = freeze_heap()
    ranker = in_process_ranker(reader, Scorer(load_model(mdir)), mdir)  # a swap after the freeze
    for m in msgs:
        rank_proto(ranker, m, None)
    after = full_ms()
    gc.unfreeze()  # this process goes on as before
    reader.close()
    return {"objects_tracked": tracked, "objects_frozen": frozen,
            "full_collection_ms": float(np.median(before)), "full_collection_ms_frozen": float(np.median(after)),
            "runs_ms": {"before": before, "frozen": after}}


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Latencies of several load rounds pooled: p50 / p99 over all, qps = requests / time."""
    ms = np.concatenate([r["ms"] for r in runs]) if runs else np.zeros(0)
    secs = sum(r["elapsed_s"] for r in runs)
    return {"n": int(ms.size), "failed": sum(r["failed"] for r in runs),
            "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
            "p99_ms": float(np.percentile(ms, 99)) if ms.size else None, "qps": ms.size / secs if secs else None}


def alternating(srv: dict[str, Server], reqs: list[bytes], rounds: int, duration: float,
                min_req: int, levels: tuple[int, ...] = (1,)) -> dict[str, dict[str, Any]]:
    """Servers up at once (``srv``: name -> Server), load rounds alternating between them (a, b,
    b, a, a, b, ... for two; forward and backward for more) so that drift in the shared
    machine's load falls on all; stops them. Returns name -> the rounds :func:`pooled`, with
    ``levels`` > (1,): name -> {concurrency: pooled}."""
    names = list(srv)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in levels} for k in srv}
    try:
        for sv in srv.values():
            load(sv.target, reqs[:2], 1, 0.0, 2)  # warm-up
        for r in range(rounds):
            for c in levels:
                for k in (names if r % 2 == 0 else names[::-1]):
                    runs[k][c].append(load(srv[k].target, reqs, c, duration, min_req))
    finally:
        for sv in srv.values():
            sv.stop()
    if levels == (1,):
        return {k: pooled(v[1]) for k, v in runs.items()}
    return {k: {c: pooled(v[c]) for c in levels} for k, v in runs.items()}


SERVING_OPTIONS = {  # name -> [serve] lines: the default, bf16 MLPs, two intra-op threads, both
    "default": "", "bf16": 'precision = "bf16"\n', "threads2": "threads = 2\n",
    "threads2_bf16": 'threads = 2\nprecision = "bf16"\n'}


def serving_options(data: Path, mdir: Path, work: Path, reqs: list[bytes], rounds: int, duration: float,
                    min_req: int, levels: tuple[int, ...]) -> dict[str, Any]:
    """GEM 500 candidates x 1k served with each of :data:`SERVING_OPTIONS` -- four servers of
    the same version up at once, load rounds alternating between them per concurrency level.
    ``threads = 2`` is for a host that serves only: the model's large ops then use both cores
    (the default, 1, is for a machine shared with the broker, the worker and the trainer,
    where OpenMP threads waiting on a preempted peer made requests ~15x slower)."""
    res = alternating({k: Server(data, mdir, work, tag=f"-{k}", serve=v) for k, v in SERVING_OPTIONS.items()},
                      reqs, rounds, duration, min_req, levels)
    out: dict[str, Any] = {"rounds": rounds, "round_s": duration, "levels": list(levels), "by_option": {}}
    for k, by in res.items():
        out["by_option"][k] = {str(c): {"p50_ms": v["p50_ms"], "p99_ms": v["p99_ms"], "qps": v["qps"], "n": v["n"],
                                        "failed": v["failed"]} for c, v in by.items()}
    d = res["default"]
    for k in SERVING_OPTIONS:
        if k != "default":
            out[f"p99_ratio_{k}_to_default"] = {str(c): res[k][c]["p99_ms"] / d[c]["p99_ms"] for c in levels}
    out["failed"] = sum(v["failed"] for by in res.values() for v in by.values())
    return out


def metrics_cost(data: Path, models: Path, work: Path, reqs: list[bytes], rounds: int, duration: float,
                 min_req: int) -> dict[str, Any]:
    """The same GEM version served twice, metrics on and ``OPENGEM_METRICS=off``, both up at
    once; load rounds alternate between them (on, off, on, off, ...) so that drift in the
    shared machine's load falls on both. ``ratio``: p99 on / p99 off."""
    srv = {"on": Server(data, models, work, tag="-metrics-on"),
           "off": Server(data, models, work, env={"OPENGEM_METRICS": "off"}, tag="-metrics-off")}
    res = alternating(srv, reqs, rounds, duration, min_req)
    on, off = res["on"], res["off"]
    return {"p99_ms_on": on["p99_ms"], "p99_ms_off": off["p99_ms"], "p50_ms_on": on["p50_ms"],
            "p50_ms_off": off["p50_ms"], "qps_on": on["qps"], "qps_off": off["qps"],
            "ratio": on["p99_ms"] / off["p99_ms"], "p50_ratio": on["p50_ms"] / off["p50_ms"],
            "qps_ratio": on["qps"] / off["qps"], "rounds": rounds, "round_s": duration,
            "requests": on["n"] + off["n"], "failed": on["failed"] + off["failed"]}


def precision_cost(data: Path, mdir: Path, work: Path, reqs: list[bytes], rounds: int, duration: float,
                   min_req: int, n_cpu: int) -> dict[str, Any]:
    """``[serve] precision = "bf16"`` (the FM MLPs in bfloat16) against the default fp32, GEM on the
    same requests: (1) two servers up at once, load rounds at concurrency 1 alternating between
    them; (2) in process, CPU per request of the two alternating (``n_cpu`` each, one thread);
    (3) what bf16 moves the scores by on these requests: the largest |p_bf16 - p_fp32|, and how
    often a request's top 10 by value come out in the same order. ``amx_bf16``: whether this CPU
    has the AMX tiles that make bfloat16 matmuls fast ("auto" picks bf16 only then)."""
    import torch

    from opengem.features.sharded import ShardedReader
    from opengem.model.registry import load as load_model
    from opengem.model.wukong import mlp_precision
    from opengem.serving import ranking_pb2 as pb
    from opengem.serving.scoring import Scorer, amx_bf16
    from opengem.serving.server import rank_proto

    rpc = alternating({"fp32": Server(data, mdir, work, tag="-fp32"),
                       "bf16": Server(data, mdir, work, tag="-bf16", serve='precision = "bf16"\n')},
                      reqs, rounds, duration, min_req)

    torch.set_num_threads(1)
    reader = ShardedReader(data, P, secondary_root=data / "readers" / "precision")
    msgs = [pb.RankRequest.FromString(r) for r in reqs]
    scorer = Scorer(load_model(mdir))
    ranker = in_process_ranker(reader, scorer, mdir)
    model = scorer.loaded.model
    cpu: dict[str, list[float]] = {"fp32": [], "bf16": []}
    out: dict[str, list[Any]] = {"fp32": [], "bf16": []}
    for k in ("fp32", "bf16"):
        mlp_precision(model, k)
        out[k] = [rank_proto(ranker, m, None)[2] for m in msgs]  # (and warm-up)
    for i in range(2 * n_cpu):
        k = ("fp32", "bf16")[(i // 4) % 2]  # 4 requests of one, then 4 of the other
        mlp_precision(model, k)
        c0 = time.process_time()
        rank_proto(ranker, msgs[i % len(msgs)], None)
        cpu[k].append(time.process_time() - c0)
    reader.close()
    diff, same_top = 0.0, 0
    for a, b in zip(out["fp32"], out["bf16"]):
        pa = np.array([list(c.scores) for c in a.candidates])
        pb_ = np.array([list(c.scores) for c in b.candidates])
        diff = max(diff, float(np.abs(pa - pb_).max()))
        same_top += list(a.order[:10]) == list(b.order[:10])
    med = {k: 1e3 * float(np.median(v)) for k, v in cpu.items()}
    return {"amx_bf16": amx_bf16(), "rounds": rounds, "round_s": duration,
            "p50_ms_fp32": rpc["fp32"]["p50_ms"], "p99_ms_fp32": rpc["fp32"]["p99_ms"],
            "p50_ms_bf16": rpc["bf16"]["p50_ms"], "p99_ms_bf16": rpc["bf16"]["p99_ms"],
            "p99_ratio_bf16_to_fp32": rpc["bf16"]["p99_ms"] / rpc["fp32"]["p99_ms"],
            "p50_ratio_bf16_to_fp32": rpc["bf16"]["p50_ms"] / rpc["fp32"]["p50_ms"],
            "cpu_ms_median_fp32": med["fp32"], "cpu_ms_median_bf16": med["bf16"],
            "cpu_ms_p99_fp32": 1e3 * float(np.percentile(cpu["fp32"], 99)),
            "cpu_ms_p99_bf16": 1e3 * float(np.percentile(cpu["bf16"], 99)),
            "cpu_ratio_bf16_to_fp32": med["bf16"] / med["fp32"], "cpu_n": n_cpu,
            "max_abs_prob_diff": diff, "top10_order_same_share": same_top / len(msgs), "requests_compared": len(msgs),
            "requests": rpc["fp32"]["n"] + rpc["bf16"]["n"], "failed": rpc["fp32"]["failed"] + rpc["bf16"]["failed"]}


def processes_scaling(data: Path, mdir: Path, work: Path, reqs: list[bytes], levels: tuple[int, ...],
                      rounds: int, duration: float, min_req: int, n: int = 2) -> dict[str, Any]:
    """`opengem serve --processes n` against one process (the baseline), GEM on the same
    requests: both servers up at once, load rounds alternating between them per
    concurrency level (each load thread its own connection; the kernel assigns a
    connection to one process, so with few connections the split can be uneven)."""
    srvs = {1: Server(data, mdir, work, tag="-p1"), n: Server(data, mdir, work, tag=f"-p{n}", processes=n)}
    runs: dict[int, dict[int, list[dict]]] = {k: {c: [] for c in levels} for k in srvs}
    try:
        for k, srv in srvs.items():
            load(srv.target, reqs[:2], 2, 0.0, 4)  # warm-up
        for r in range(rounds):
            for conc in levels:
                for k in (srvs if r % 2 == 0 else reversed(list(srvs))):
                    runs[k][conc].append(load(srvs[k].target, reqs, conc, duration, min_req))
    finally:
        for srv in srvs.values():
            srv.stop()
    out: dict[str, Any] = {"processes": n, "rounds": rounds, "round_s": duration, "by_concurrency": {}}
    for conc in levels:
        one, many = pooled(runs[1][conc]), pooled(runs[n][conc])
        out["by_concurrency"][str(conc)] = {
            "p50_ms_1": one["p50_ms"], "p99_ms_1": one["p99_ms"], "qps_1": one["qps"],
            f"p50_ms_{n}": many["p50_ms"], f"p99_ms_{n}": many["p99_ms"], f"qps_{n}": many["qps"],
            "qps_ratio": many["qps"] / one["qps"], "p99_ratio": many["p99_ms"] / one["p99_ms"],
            "failed": one["failed"] + many["failed"]}
    return out


def one_case(preset_name: str, quick: bool) -> tuple[Path, Path, list[bytes]]:
    """What --options-only and --processes-only serve: a store of 1k-event histories, one GEM
    version in <data>/models-gem, 32 requests of 500 candidates. (work dir, data dir, requests)."""
    work = Path(tempfile.mkdtemp(prefix="opengem-bench-serve-"))
    data = work / "data"
    users = build_store(data, users_per_len=8 if quick else 32, lengths=(1024,))
    publish(data / "models-gem", "gem", preset_name, seed=0)
    return work, data, requests_for(users[1024], 500, 32, seed=1524)


def main() -> None:
    ap = parser("serve", __doc__)
    ap.add_argument("--preset", default="base", help="GEM preset (default base)")
    ap.add_argument("--swap-every", type=float, default=3.0, help="seconds between published versions")
    ap.add_argument("--no-metrics", action="store_true",
                    help="the daemons with OPENGEM_METRICS=off (no Prometheus metrics recorded); compare with a "
                         "default run to get the cost of metrics (JSON: bench/results/serve-no-metrics.json)")
    ap.add_argument("--options-only", action="store_true",
                    help="only GEM 500 candidates x 1k served with [serve] precision = bf16 and / or threads = 2 "
                         "against the defaults (JSON: bench/results/serve-options.json)")
    ap.add_argument("--processes-only", action="store_true",
                    help="only GEM 500 candidates x 1k served by `--processes 2` vs one process (JSON: "
                         "bench/results/serve-processes.json)")
    args = ap.parse_args()
    if args.options_only:
        from opengem.serving.scoring import amx_bf16

        if args.out == ap.get_default("out"):
            args.out = "bench/results/serve-options.json"
        work, data, reqs = one_case(args.preset, args.quick)
        levels = (1, 4)
        so = serving_options(data, data / "models-gem", work, reqs, 2 if args.quick else 6,
                             3.0 if args.quick else 5.0, 8 if args.quick else 20, levels)
        rows = [[k, c, v["p50_ms"], v["p99_ms"], v["qps"], v["failed"]]
                for k, by in so["by_option"].items() for c, v in by.items()]
        print(table(rows, ["option", "conc", "p50_ms", "p99_ms", "qps", "failed"]))
        so["amx_bf16"] = amx_bf16()
        write(args.out, "serve-options", {"preset": args.preset, "case": "500c_1k", "quick": args.quick,
                                          "options": SERVING_OPTIONS}, so)
        return
    if args.processes_only:
        if args.out == ap.get_default("out"):
            args.out = "bench/results/serve-processes.json"
        work, data, reqs = one_case(args.preset, args.quick)
        ps = processes_scaling(data, data / "models-gem", work, reqs, (1, 2, 4, 8), 2 if args.quick else 4,
                               4.0 if args.quick else 8.0, 8 if args.quick else 20)
        rows = [[c, v["p50_ms_1"], v["p99_ms_1"], v["qps_1"], v["p50_ms_2"], v["p99_ms_2"], v["qps_2"],
                 v["qps_ratio"], v["failed"]] for c, v in ps["by_concurrency"].items()]
        print(table(rows, ["conc", "p50 1p", "p99 1p", "qps 1p", "p50 2p", "p99 2p", "qps 2p", "qps 2p/1p", "failed"]))
        write(args.out, "serve-processes", {"preset": args.preset, "case": "500c_1k", "quick": args.quick,
                                            "levels": [1, 2, 4, 8]}, ps)
        return
    if args.no_metrics:
        os.environ["OPENGEM_METRICS"] = "off"  # inherited by the child processes
        if args.out == ap.get_default("out"):
            args.out = "bench/results/serve-no-metrics.json"
    quick = args.quick
    cands, hists = (100, 500), (1024, 4096)
    levels = (1, 4) if quick else (1, 2, 4, 8)
    duration, min_req = (3.0, 8) if quick else (8.0, 20)
    work = Path(tempfile.mkdtemp(prefix="opengem-bench-serve-"))
    data = work / "data"
    t = time.monotonic()
    users = build_store(data, users_per_len=8 if quick else 32, lengths=hists)
    print(f"store: {sum(map(len, users.values()))} users with {hists} events in {time.monotonic() - t:.1f}s ({work})")
    model_dirs = {k: data / f"models-{k}" for k in ("gem", "dlrm")}
    for k, d in model_dirs.items():
        publish(d, k, args.preset, seed=0)
    reqs = {(c, h): requests_for(users[h], c, 32, seed=c + h) for c in cands for h in hists}

    results: dict[str, dict[str, Any]] = {}
    rows = []
    for kind, mdir in model_dirs.items():
        srv = Server(data, mdir, work)
        try:
            for (c, h), rq in reqs.items():
                load(srv.target, rq[:2], 1, 0.0, 2)  # warm-up: first-call allocations
                for conc in levels:
                    r = load(srv.target, rq, conc, duration, min_req)
                    r.pop("ms"), r.pop("elapsed_s")
                    key = f"{c}c_{h // 1024}k"
                    results.setdefault(key, {}).setdefault(kind, {})[conc] = r
                    rows.append([kind, c, h, conc, r["n"], r["p50_ms"], r["p99_ms"], r["qps"], r["failed"]])
                    print(f"  {kind:<5} {c:>4} cands {h:>5} events  x{conc}: p50 {r['p50_ms']:.1f} ms  "
                          f"p99 {r['p99_ms']:.1f} ms  {r['qps']:.1f} req/s  failed {r['failed']}", flush=True)
        finally:
            srv.stop()
    print()
    print(table(rows, ["model", "cands", "history", "conc", "n", "p50_ms", "p99_ms", "qps", "failed"]))

    # the design before issue 6, in the same run: GEM with the pyramid conditioned on the target ad
    # (seq_conditioning="target", its layers run per candidate), 500 candidates x 1k, concurrency 1
    abl_dir = data / "models-gem-target"
    publish(abl_dir, "gem", args.preset, seed=0, seq_conditioning="target")
    srv = Server(data, abl_dir, work)
    try:
        load(srv.target, reqs[(500, 1024)][:2], 1, 0.0, 2)
        ablation = load(srv.target, reqs[(500, 1024)], 1, duration, min_req)
        ablation.pop("ms"), ablation.pop("elapsed_s")
    finally:
        srv.stop()
    print(f"  gem, seq_conditioning=target (ablation): 500 cands 1024 events x1: p50 {ablation['p50_ms']:.1f} ms  "
          f"p99 {ablation['p99_ms']:.1f} ms", flush=True)

    # metrics on vs off (issue 7), alternating, GEM 500 candidates x 1k
    mc = metrics_cost(data, model_dirs["gem"], work, reqs[(500, 1024)], 4 if quick else 8,
                      3.0 if quick else 5.0, min_req)
    print(f"  metrics on vs off (GEM 500 cands 1k, {mc['rounds']} alternating rounds each): p99 "
          f"{mc['p99_ms_on']:.1f} vs {mc['p99_ms_off']:.1f} ms (ratio {mc['ratio']:.3f}), qps {mc['qps_on']:.1f} vs "
          f"{mc['qps_off']:.1f}", flush=True)

    # [serve] precision = "bf16" vs fp32, alternating, GEM 500 candidates x 1k
    pc = precision_cost(data, model_dirs["gem"], work, reqs[(500, 1024)], 4 if quick else 8,
                        3.0 if quick else 5.0, min_req, 20 if quick else 100)
    print(f"  precision bf16 vs fp32 (GEM 500 cands 1k, {pc['rounds']} alternating rounds each, AMX-BF16 "
          f"{'yes' if pc['amx_bf16'] else 'no'}): p50 {pc['p50_ms_bf16']:.1f} vs {pc['p50_ms_fp32']:.1f} ms, p99 "
          f"{pc['p99_ms_bf16']:.1f} vs {pc['p99_ms_fp32']:.1f} ms; CPU per request in process "
          f"{pc['cpu_ms_median_bf16']:.1f} vs {pc['cpu_ms_median_fp32']:.1f} ms ({pc['cpu_ratio_bf16_to_fp32']:.3f}); "
          f"scores within {pc['max_abs_prob_diff']:.1e}, top 10 in the same order in "
          f"{pc['top10_order_same_share']:.0%} of requests", flush=True)

    # sustained load with a model swap every few seconds (GEM, 100 candidates, 1k history)
    swap_dir = data / "models-swap"
    publish(swap_dir, "gem", args.preset, seed=0)
    srv = Server(data, swap_dir, work)
    swap_times: list[float] = []
    versions: set[str] = set()
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def on_result(t0: float, dt: float, resp: Any) -> None:
        with lock:
            versions.add(resp.model_version)
            spans.append((t0, dt))

    sustain = 12.0 if quick else 30.0
    stop = threading.Event()

    def swapper() -> None:
        seed = 1
        while not stop.wait(args.swap_every):
            publish(swap_dir, "gem", args.preset, seed=seed)
            swap_times.append(time.monotonic())
            seed += 1

    sw = threading.Thread(target=swapper)
    try:
        sw.start()
        swap_run = load(srv.target, reqs[(100, 1024)], 2, sustain, 1, on_result=on_result)
        swap_run.pop("ms"), swap_run.pop("elapsed_s")
    finally:
        stop.set()
        sw.join()
        srv.stop()
    near = [dt for t0, dt in spans if any(0 <= t0 + dt - s and t0 - s <= 2.0 for s in swap_times)]
    far = [dt for t0, dt in spans if not any(0 <= t0 + dt - s and t0 - s <= 2.0 for s in swap_times)]
    pct = lambda xs, q: float(np.percentile(np.array(xs) * 1e3, q)) if xs else None  # noqa: E731
    swap_fig = {"requests": swap_run["n"], "failed_requests": swap_run["failed"], "errors": swap_run["errors"],
                "published": len(swap_times), "versions_seen": len(versions),
                "p99_ms_near_swap": pct(near, 99), "p50_ms_near_swap": pct(near, 50), "n_near_swap": len(near),
                "p99_ms_no_swap": pct(far, 99), "p50_ms_no_swap": pct(far, 50)}
    print(f"\nswaps: {len(swap_times)} versions published every {args.swap_every}s under load, "
          f"{len(versions)} seen in responses; {swap_run['n']} requests, {swap_run['failed']} failed; "
          f"p99 near a swap {swap_fig['p99_ms_near_swap']} ms vs {swap_fig['p99_ms_no_swap']} ms otherwise")

    prof = profile_one(data, model_dirs["gem"], users[1024], 500)
    print(f"\nprofile, one GEM request, 500 candidates, 1k history: featurize {prof['featurize_ms']:.1f} ms, "
          f"model {prof['score_ms']:.1f} ms (user encoding {prof['encode_user_ms']:.1f} ms, candidates "
          f"{prof['candidates_ms']:.1f} ms); top ops {prof['top_ops']}")

    cpu = cpu_per_request(data, {**model_dirs, "gem_target": abl_dir}, reqs[(500, 1024)], n=20 if quick else 100)
    print(f"CPU per request, in-process, 1 thread, 500 candidates x 1k: GEM {cpu['gem']['cpu_ms_median']:.1f} ms "
          f"(p99 {cpu['gem']['cpu_ms_p99']:.1f} over {cpu['gem']['n']}), "
          f"DLRM {cpu['dlrm']['cpu_ms_median']:.1f} ms, GEM target-conditioned "
          f"{cpu['gem_target']['cpu_ms_median']:.1f} ms", flush=True)

    gcp = gc_pause(data, model_dirs["gem"], reqs[(500, 1024)])
    print(f"full garbage collection with the server's objects ({gcp['objects_tracked']:,} tracked): "
          f"{gcp['full_collection_ms']:.1f} ms; after freeze_heap (as opengem serve runs) and a swap: "
          f"{gcp['full_collection_ms_frozen']:.2f} ms", flush=True)

    figures: dict[str, Any] = {}
    for key, by in results.items():
        g, d = by["gem"], by["dlrm"]
        figures[key] = {
            "p50_ms": g[1]["p50_ms"], "p99_ms": g[1]["p99_ms"], "qps": max(r["qps"] for r in g.values()),
            "dlrm_p99_ms": d[1]["p99_ms"], "dlrm_qps": max(r["qps"] for r in d.values()),
            "p99_ratio_gem_to_dlrm": g[1]["p99_ms"] / d[1]["p99_ms"],
            "by_concurrency": {"gem": g, "dlrm": d},
        }
    figures["p99_ms_500c_1k"] = figures["500c_1k"]["p99_ms"]
    figures["p99_goal_ms_500c_1k"] = 30.0
    figures["p99_goal_met_500c_1k"] = figures["p99_ms_500c_1k"] <= 30.0
    figures["ablation_target_conditioned_500c_1k"] = {
        **ablation, "p99_ratio_user_to_target": figures["p99_ms_500c_1k"] / ablation["p99_ms"],
        "p50_ratio_user_to_target": figures["500c_1k"]["p50_ms"] / ablation["p50_ms"]}
    figures["metrics_cost"] = mc
    figures["precision_bf16"] = pc
    figures["cpu_per_request_500c_1k"] = cpu
    figures["gc_full_collection_ms"] = gcp
    figures["load_average_1m_at_end"] = os.getloadavg()[0]
    figures["failed_requests"] = swap_fig["failed_requests"] + sum(
        r["failed"] for by in results.values() for k in by.values() for r in k.values()) + ablation["failed"] + mc["failed"] + pc["failed"]
    figures["swaps"] = swap_fig
    figures["profile_500c_1k"] = prof
    print(f"\np99 500 candidates / 1k history (GEM {args.preset}, concurrency 1): {figures['p99_ms_500c_1k']:.1f} ms "
          f"(goal 30 ms); DLRM {figures['500c_1k']['dlrm_p99_ms']:.1f} ms")
    from opengem.model.config import preset

    write(args.out, "serve", {"metrics": not args.no_metrics, "preset": args.preset,
                              "seq_conditioning": preset(args.preset).seq_conditioning, "quick": quick,
                              "concurrency": levels, "duration_s": duration,
                              "min_requests": min_req, "shards": P, "swap_every_s": args.swap_every,
                              "note": "p50/p99/qps at the top of each case: concurrency 1 (qps: best level)"},
          figures)


if __name__ == "__main__":
    main()
