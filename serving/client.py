"""Python client of the ranking service (what `opengem rank` uses).

::

    from opengem.serving.client import RankClient

    with RankClient("127.0.0.1:50051") as c:
        resp = c.rank(user_id=42, surface="feed",
                      candidates=[101, {"ad_id": 102, "bid": 2.5, "ad_format": "video"}],
                      context={"hour": 20, "device": "ios"})
        print(resp.model_version, [resp.candidates[i].ad_id for i in resp.order])

Errors raise ``grpc.RpcError`` with ``.code()`` and ``.details()``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opengem.serving import ranking_pb2 as pb
from opengem.serving import ranking_pb2_grpc as pb_grpc


def build_request(user_id: int, surface: str, candidates: Iterable[int | Mapping[str, Any]], *,
                  context: Mapping[str, Any] | None = None, tasks: Iterable[str] = (), value_task: str = "",
                  request_id: str = "") -> pb.RankRequest:
    """Candidates are ad ids or dicts of :class:`Candidate` fields; ``context``: :class:`Context` fields."""
    cands = [pb.Candidate(ad_id=c) if isinstance(c, int) else pb.Candidate(**c) for c in candidates]
    return pb.RankRequest(user_id=user_id, surface=surface, candidates=cands, context=pb.Context(**(context or {})),
                          tasks=list(tasks), value_task=value_task, request_id=request_id)


class RankClient:
    """A channel to one server. ``token``: bearer token; ``root_certificates``: PEM to use TLS.

    Each client has a connection of its own (gRPC would otherwise share one between the
    channels of a process to the same target): against a server with several processes
    (``[serve] processes``), which the kernel assigns per connection, callers in several
    threads each with a client spread over them."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | None = None, timeout_s: float = 2.0):
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self._meta = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self._stub = pb_grpc.RankerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def rank_request(self, req: pb.RankRequest, timeout_s: float | None = None) -> pb.RankResponse:
        return self._stub.Rank(req, timeout=timeout_s or self.timeout_s, metadata=self._meta)

    def rank(self, user_id: int, surface: str, candidates: Iterable[int | Mapping[str, Any]], *,
             timeout_s: float | None = None, **kw: Any) -> pb.RankResponse:
        """See :func:`build_request` for the arguments."""
        return self.rank_request(build_request(user_id, surface, candidates, **kw), timeout_s)

    def health(self, service: str = "", timeout_s: float = 2.0) -> str:
        """``SERVING`` once a model version is loaded, else ``NOT_SERVING``."""
        r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the channel connects (raises ``grpc.FutureTimeoutError``)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RankClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def response_dict(resp: pb.RankResponse) -> dict[str, Any]:
    return json_format.MessageToDict(resp, preserving_proto_field_name=True)


def format_response(resp: pb.RankResponse, limit: int = 20) -> str:
    """The ranking as a small table, best first."""
    head = (f"model {resp.model_version} ({resp.model_kind}); user history {resp.history_events} events; "
            f"value = bid x P({resp.value_task})")
    cols = "".join(f"{'P(' + t + ')':>16}" for t in resp.tasks)
    lines = [head, f"  {'rank':>4} {'ad_id':>20}{cols}{'value':>14}"]
    for r, i in enumerate(list(resp.order)[:limit], 1):
        c = resp.candidates[i]
        lines.append(f"  {r:>4} {c.ad_id:>20}" + "".join(f"{s:>16.6f}" for s in c.scores) + f"{c.value:>14.6f}")
    if len(resp.order) > limit:
        lines.append(f"  … {len(resp.order) - limit} more")
    return "\n".join(lines)
