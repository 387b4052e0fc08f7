"""`opengem serve`: the gRPC ranking service (plus health, reflection, an optional JSON endpoint).

A thin adapter over :class:`~opengem.serving.ranker.Ranker`: proto → query,
errors → status codes, result → proto. Every failure is a status code with a
one-line message; unexpected errors are logged here with a reference the
caller gets instead of a stack trace.

Models per surface: GEM by default; ``[serve] models = {reels = "student"}``
serves the surface's student instead (:class:`SurfaceRouter`, one
:class:`~opengem.serving.models.ModelManager` per student surface with the same
load → canary → hot swap; every response names the version and kind).

Security: binds 127.0.0.1 by default. Binding any other address requires a
bearer token (``authorization: Bearer <token>`` metadata, compared in
constant time; the health service stays open for load balancers) and should
use TLS (``tls_cert`` / ``tls_key``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import shutil
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opengem.ops import metrics
from opengem.runtime import freeze_heap, tune_allocator
from opengem.serving import ranking_pb2 as pb
from opengem.serving import ranking_pb2_grpc as pb_grpc
from opengem.serving.config import ServeConfig
from opengem.serving.models import ModelManager, student_manager
from opengem.serving.ranker import DeadlineExceeded, NoModel, Ranker, RankResult
from opengem.serving.scoring import AdCandidate, RankQuery, RequestError, Scorer, resolve_precision

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Ranker"].full_name  # "opengem.serving.v1.Ranker"
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# --------------------------------------------------------------------------- proto <-> query


def query_from_proto(msg: pb.RankRequest, now_ms: int | None = None) -> RankQuery:
    """The request as a :class:`RankQuery`; proto3 ``optional`` presence decides None."""
    ctx = msg.context

    def opt(m: Any, name: str) -> Any:
        return getattr(m, name) if m.HasField(name) else None

    cands = []
    for c in msg.candidates:  # one C call per candidate for what it sets (field number -> value)
        f = {fd.number: v for fd, v in c.ListFields()}
        cands.append(AdCandidate(f.get(1, 0), f.get(2), f.get(3), f.get(4), f.get(5, 1.0)))
    return RankQuery(
        user_id=msg.user_id, surface=msg.surface, candidates=tuple(cands),
        ts_ms=ctx.ts_ms if ctx.HasField("ts_ms") else (now_ms if now_ms is not None else int(time.time() * 1000)),
        hour=opt(ctx, "hour"), device=opt(ctx, "device"), country=opt(ctx, "country"),
        age_bucket=opt(ctx, "age_bucket"), tasks=tuple(msg.tasks), value_task=msg.value_task,
        request_id=msg.request_id,
    )


def result_to_proto(r: RankResult) -> pb.RankResponse:
    resp = pb.RankResponse(
        model_version=r.model_version, model_kind=r.model_kind, tasks=r.tasks, value_task=r.value_task,
        order=r.order.tolist(), history_events=r.history_events, request_id=r.request_id,
    )
    resp.MergeFromString(_candidate_scores_wire(r.ad_ids, r.scores, r.values))
    return resp


def _candidate_scores_wire(ad_ids: np.ndarray, scores: np.ndarray, values: np.ndarray) -> bytes:
    """``RankResponse.candidates`` (field 5) in protobuf wire format, built column-wise.

    Building 500 ``CandidateScore`` messages one by one cost ~3 ms a request in Python; the
    parser takes these bytes in C. Per candidate, a length-delimited CandidateScore of
    ``scores`` (field 2, packed doubles), ``value`` (field 3, a double) and ``ad_id`` (field 1,
    a varint, last: the one part whose length varies). A parser accepts fields in any order
    and zeros written out; ``SerializeToString`` writes the canonical form again.
    ad_ids (B,) int64 >= 0, scores (B, T) float64, values (B,) float64.
    """
    B, T = scores.shape
    if 8 * T + 2 >= 128:  # one-byte lengths below; never with this model's few tasks
        raise ValueError(f"{T} tasks: too many for the column-wise encoding")
    ids = np.asarray(ad_ids, np.uint64)
    groups = (ids[:, None] >> (7 * np.arange(10, dtype=np.uint64))[None, :]) & np.uint64(0x7F)  # (B, 10)
    top = 9 - np.argmax(groups[:, ::-1] != 0, axis=1)  # the highest non-zero 7-bit group
    nvar = np.where(ids == 0, 1, top + 1)  # (B,) the varint's length
    var = groups.astype(np.uint8)
    var[np.arange(10)[None, :] < (nvar - 1)[:, None]] |= 0x80  # continuation bits
    fixed = (2 + 8 * T if T else 0) + 9 + 1  # scores field, value field, ad_id's tag
    body = fixed + nvar  # (B,) the CandidateScore's length (< 128)
    row = np.zeros((B, 2 + fixed + 10), np.uint8)
    row[:, 0] = 0x2A  # field 5, length-delimited
    row[:, 1] = body.astype(np.uint8)
    c = 2
    if T:
        row[:, c], row[:, c + 1] = 0x12, 8 * T  # field 2, packed
        row[:, c + 2:c + 2 + 8 * T] = np.ascontiguousarray(scores, "<f8").view(np.uint8).reshape(B, 8 * T)
        c += 2 + 8 * T
    row[:, c] = 0x19  # field 3, 64-bit
    row[:, c + 1:c + 9] = np.ascontiguousarray(values, "<f8").view(np.uint8).reshape(B, 8)
    row[:, c + 9] = 0x08  # field 1, varint
    row[:, c + 10:] = var
    keep = np.arange(row.shape[1])[None, :] < (2 + body)[:, None]
    return row[keep].tobytes()


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, NoModel):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
    ref = uuid.uuid4().hex[:12]
    log.error("internal error ref=%s", ref, exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}; details in the server log)"


def rank_proto(ranker: Ranker, msg: pb.RankRequest, deadline: float | None) -> tuple[grpc.StatusCode, str, pb.RankResponse]:
    """One request through the ranker, counted and timed; never raises."""
    t0 = time.perf_counter()
    code, detail, resp = grpc.StatusCode.OK, "", pb.RankResponse()
    try:
        resp = result_to_proto(ranker.rank(query_from_proto(msg), deadline))
    except Exception as e:  # noqa: BLE001 - every error becomes a status
        code, detail = _status(e)
    metrics.SERVE_REQUESTS.labels(code.name).inc()
    metrics.SERVE_SECONDS.observe(time.perf_counter() - t0)
    metrics.SERVE_CANDIDATES.observe(len(msg.candidates))
    return code, detail, resp


# --------------------------------------------------------------------------- model per surface


class SurfaceRouter:
    """The ranker of a request's surface: ``students[surface]`` where ``[serve] models`` names a
    student, else ``default`` (GEM). Has the Ranker's interface (``rank``, ``models`` -- the GEM
    manager, which health reports --, ``cfg``). Build the rankers with one ``slots`` semaphore:
    ``inference_slots`` bounds forward passes server-wide."""

    def __init__(self, default: Ranker, students: dict[str, Ranker] | None = None):
        self.default, self.students = default, dict(students or {})
        self.models, self.cfg = default.models, default.cfg

    def ranker_for(self, surface: str) -> Ranker:
        return self.students.get(surface, self.default)

    def rank(self, q: RankQuery, deadline: float | None = None) -> RankResult:
        return self.ranker_for(q.surface).rank(q, deadline)

    def served(self) -> dict[str, Any]:
        """What serves what: {"gem": version | None, "students": {surface: version | None}}."""
        cur = self.models.current
        return {"gem": cur.loaded.version if cur else None,
                "students": {s: (r.models.current.loaded.version if r.models.current else None)
                             for s, r in sorted(self.students.items())}}


# --------------------------------------------------------------------------- gRPC


class RankerService(pb_grpc.RankerServicer):
    def __init__(self, ranker: Ranker):
        self.ranker = ranker

    def Rank(self, request: pb.RankRequest, context: grpc.ServicerContext) -> pb.RankResponse:  # noqa: N802
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        code, detail, resp = rank_proto(self.ranker, request, deadline)
        if code != grpc.StatusCode.OK:
            context.abort(code, detail)
        return resp


class _BearerToken(grpc.ServerInterceptor):
    """Every call but the health service needs ``authorization: Bearer <token>``."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            metrics.SERVE_REQUESTS.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(details)
        return self._deny


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Endpoints:
    grpc_port: int
    http_port: int | None


class RankServer:
    """gRPC (+ optional HTTP/JSON) front of a :class:`Ranker`; ``start()`` → bound ports."""

    def __init__(self, ranker: Ranker | SurfaceRouter, cfg: ServeConfig = ServeConfig(), *, token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, reuse_port: bool = False):
        if not is_loopback(cfg.host) and not token:
            raise ValueError(f"refusing to serve on {cfg.host} without a bearer token "
                             "(--token-file or OPENGEM_SERVE_TOKEN); use TLS too for non-local clients")
        self.ranker, self.cfg, self.token, self.tls = ranker, cfg, token, tls
        # One of several processes on the same ports (serving/processes.py): bind with SO_REUSEPORT.
        # Otherwise not, so that a port another server holds is an error, not a shared port.
        self.reuse_port = reuse_port
        self.health = health.HealthServicer()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None

    def set_serving(self, serving: bool) -> None:
        st = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.health.set(name, st)

    def start(self) -> Endpoints:
        cfg = self.cfg
        opts = [("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", int(self.reuse_port))]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="rank"),
                             interceptors=[_BearerToken(self.token)] if self.token else [], options=opts)
        pb_grpc.add_RankerServicer_to_server(RankerService(self.ranker), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.set_serving(self.ranker.models.current is not None)
        addr = f"{cfg.host}:{cfg.port}"
        if self.tls:
            port = server.add_secure_port(addr, grpc.ssl_server_credentials([self.tls]))
        else:
            port = server.add_insecure_port(addr)
        server.start()
        self._grpc = server
        http_port = None
        if cfg.http_port >= 0:
            server_cls = _ReusePortHTTPServer if self.reuse_port else ThreadingHTTPServer
            self._http = server_cls((cfg.host, cfg.http_port), _json_handler(self.ranker, self.token))
            self._http.daemon_threads = True
            http_port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, name="rank-http", daemon=True).start()
        return Endpoints(port, http_port)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking requests; in-flight ones get ``grace_s`` to finish."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()


# --------------------------------------------------------------------------- JSON / HTTP


class _ReusePortHTTPServer(ThreadingHTTPServer):
    allow_reuse_port = True  # the JSON port shared by the server's processes


def _json_handler(ranker: Ranker, token: str | None) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode() if token else None
    limit = ranker.cfg.max_request_bytes

    class Handler(BaseHTTPRequestHandler):
        """POST /v1/rank: the RankRequest as proto3 JSON; GET /healthz."""

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: metrics count requests
            log.debug("http: " + fmt, *args)

        def _send(self, status: int, body: dict[str, Any] | str) -> None:
            raw = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/healthz":
                return self._send(404, {"error": "not found; POST /v1/rank or GET /healthz"})
            cur = ranker.models.current
            body = {"serving": cur is not None, "model_version": cur.loaded.version if cur else None}
            if isinstance(ranker, SurfaceRouter) and ranker.students:
                body["students"] = ranker.served()["students"]
            self._send(200 if cur else 503, body)

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/rank":
                return self._send(404, {"error": "not found; POST /v1/rank"})
            if expected and not hmac.compare_digest(self.headers.get("authorization", "").encode(), expected):
                return self._send(401, {"error": "missing or wrong bearer token"})
            try:
                n = int(self.headers.get("content-length", "0"))
            except ValueError:
                n = -1
            if not 0 < n <= limit:
                return self._send(413 if n > limit else 400, {"error": f"need a JSON body of 1..{limit} bytes"})
            try:
                msg = json_format.Parse(self.rfile.read(n), pb.RankRequest())
            except (json_format.ParseError, UnicodeDecodeError, ValueError) as e:
                return self._send(400, {"error": f"bad RankRequest JSON: {str(e)[:200]}"})
            code, detail, resp = rank_proto(ranker, msg, None)
            if code != grpc.StatusCode.OK:
                return self._send(_HTTP_STATUS.get(code, 500), {"error": detail, "code": code.name})
            self._send(200, json_format.MessageToJson(resp, preserving_proto_field_name=True))

    return Handler


# --------------------------------------------------------------------------- the daemon


class Service:
    """Everything `opengem serve` runs: the store reader, the model watcher, the ranker, the servers.

    ``reader``: any store with the read API (default: a :class:`ShardedReader`
    of ``<data_dir>/shards`` whose secondaries catch up every ``catch_up_s``).
    ``models``: the GEM manager; ``students``: {surface: manager} of the surfaces
    ``[serve] models`` gives to a student.
    """

    def __init__(self, cfg: Any, *, reader: Any = None, token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, reuse_port: bool = False):
        from opengem.features.sharded import ShardedReader

        sc: ServeConfig = cfg.serve
        self._secondaries = Path(cfg.data_dir) / "readers" / f"serve-{uuid.uuid4().hex[:8]}"
        self._own_reader = reader is None
        self.reader = reader if reader is not None else ShardedReader(
            cfg.data_dir, cfg.kafka.partitions, topic=cfg.kafka.events_topic, interval_s=sc.catch_up_s,
            secondary_root=self._secondaries)
        unknown = sorted(set(sc.models) - set(cfg.surfaces))
        if unknown:
            raise ValueError(f"[serve] models names unknown surface(s) {unknown}; the deployment has "
                             f"{list(cfg.surfaces)}")
        self._model_labels: dict[str, tuple[str, str]] = {}
        precision = resolve_precision(sc.precision)  # once: "auto" asks the CPU
        self.models = ModelManager(sc.models_path(cfg.data_dir), sc.poll_s,
                                   on_change=lambda *a: self._on_model_change("gem", *a),
                                   scorer=lambda loaded: Scorer(loaded, precision))
        self.students = {
            s: student_manager(sc.students_path(cfg.data_dir), s, poll_s=sc.poll_s, catch_up_s=sc.catch_up_s,
                               representations_dir=sc.representations_dir or None,
                               secondary_root=self._secondaries,
                               on_change=lambda *a, s=s: self._on_model_change(f"student:{s}", *a))
            for s in sc.student_surfaces()}
        slots = threading.BoundedSemaphore(sc.inference_slots)
        self.ranker = SurfaceRouter(Ranker(self.reader, self.models, sc, slots=slots),
                                    {s: Ranker(self.reader, m, sc, slots=slots) for s, m in self.students.items()})
        self.server = RankServer(self.ranker, sc, token=token, tls=tls, reuse_port=reuse_port)
        self.metrics_port: int | None = None

    def _on_model_change(self, name: str, event: str, obj: Any, detail: Any) -> None:
        metrics.SERVE_SWAPS.labels(event).inc()
        if event == "loaded":
            old = self._model_labels.get(name)
            if old is not None and old not in {v for k, v in self._model_labels.items() if k != name}:
                metrics.SERVE_MODEL.labels(*old).set(0)  # what a scrape of several processes' files keeps
                try:
                    metrics.SERVE_MODEL.remove(*old)
                except KeyError:
                    pass
            self._model_labels[name] = (obj.loaded.version, obj.loaded.kind)
            metrics.SERVE_MODEL.labels(obj.loaded.version, obj.loaded.kind).set(1)
            metrics.SERVE_LOAD_SECONDS.set(detail)
            if name == "gem":
                self.server.set_serving(True)

    def start(self, metrics_port: int | None = None) -> Endpoints:
        """Load the latest version (if any), start watching, bind; ``metrics_port``: None = off."""
        tune_allocator(self.server.cfg.malloc_keep_mb)
        if self.server.cfg.threads:
            import torch

            torch.set_num_threads(self.server.cfg.threads)  # process-wide: the model's intra-op threads
        self.models.start()
        for m in self.students.values():
            m.start()
        if metrics_port is not None:
            self.metrics_port = metrics.serve(metrics_port, host=self.server.cfg.host)
        if self.server.cfg.gc_freeze:
            self._frozen = freeze_heap()  # the first model loaded, before any request
        return self.server.start()

    def stop(self) -> None:
        self.server.stop()
        if getattr(self, "_frozen", 0):
            import gc

            gc.unfreeze()  # what start froze (a process that goes on, e.g. tests, collects as before)
            self._frozen = 0
        self.models.stop()
        for m in self.students.values():
            m.stop()  # closes their representation stores' secondaries
        if self._own_reader:
            self.reader.close()
        shutil.rmtree(self._secondaries, ignore_errors=True)  # scratch space of the secondaries
