"""The ranking service end to end: a real gRPC server on 127.0.0.1, real RocksDB shards, published versions."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opengem import config as cfgmod
from opengem.features.sharded import ShardedReader
from opengem.model import registry
from opengem.model.config import preset
from opengem.model.data import examples_batch
from opengem.model.gem import GemModel
from opengem.serving import ranking_pb2 as pb
from opengem.serving.client import RankClient, build_request
from opengem.serving.server import Service
from opengem.stream.simulator import SimConfig, Simulator

from ingest_testing import ingest_json

P = 2
ATOL = 1e-6  # float32 forward passes over differently shaped batches


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards written by the stream worker's ingest path, the examples its joiner closed, a published model."""
    root = tmp_path_factory.mktemp("serve")
    events = [e for b in Simulator(SimConfig(seed=11, n_users=200)).batches(20_000) for e in b]
    examples = ingest_json(root / "data", events, P)  # short windows: examples close soon
    torch.manual_seed(1)
    model = GemModel(preset("tiny")).eval()
    registry.publish(root / "data" / "models", model)
    return dict(root=root, data=root / "data", events=events, examples=examples, model=model)


def _cfg(data, **serve):
    base = dict(port=0, poll_s=0.1, catch_up_s=0.2, max_candidates=64, max_request_bytes=64 << 10)
    base.update(serve)
    return cfgmod.load(None, data_dir=str(data), **{"kafka.partitions": P},
                       **{f"serve.{k}": v for k, v in base.items()})


@pytest.fixture(scope="module")
def service(world):
    svc = Service(_cfg(world["data"], http_port=0))
    ends = svc.start()
    client = RankClient(f"127.0.0.1:{ends.grpc_port}")
    client.wait_ready(10)
    yield svc, ends, client
    client.close()
    svc.stop()


def _request_for(examples):
    """The Rank request an ad server would send for these examples (one user, one time)."""
    e0 = examples[0]
    return build_request(
        e0.user_id, e0.surface,
        [{"ad_id": e.item_id, **({"advertiser_id": e.advertiser_id} if e.advertiser_id is not None else {}),
          **({"category": e.category} if e.category is not None else {}),
          **({"ad_format": e.ad_format} if e.ad_format is not None else {})} for e in examples],
        context={k: v for k, v in (("ts_ms", e0.ts), ("hour", e0.hour), ("device", e0.device),
                                   ("country", e0.country), ("age_bucket", e0.age_bucket)) if v is not None})


def test_served_scores_equal_the_trainers_scores_for_the_same_version(world, service):
    svc, _, client = service
    reader = ShardedReader(world["data"], P, secondary_root=world["root"] / "trainer-sec")  # the trainer's view
    try:
        model = registry.load(world["data"] / "models").model  # the version the server serves
        exs = world["examples"]
        assert len(exs) > 100
        by_user = Counter(e.user_id for e in exs)
        heavy = max(by_user, key=by_user.get)
        anchor = next(e for e in exs if e.user_id == heavy)
        new_ad = dataclasses.replace(exs[0], item_id=10**13, advertiser_id=None, category=None, ad_format=None)
        for user_id in (heavy, 10**14):  # a user with history; a user never seen (cold start)
            cands = [dataclasses.replace(e, user_id=user_id, ts=anchor.ts, surface=anchor.surface, hour=anchor.hour,
                                         device=anchor.device, country=anchor.country, age_bucket=anchor.age_bucket)
                     for e in exs[:30] + [new_ad]]
            resp = client.rank_request(_request_for(cands))
            with torch.inference_mode():
                want = model.predict(examples_batch(cands, reader, model.cfg)).double()
            got = torch.tensor([list(c.scores) for c in resp.candidates], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            assert resp.model_version == registry.latest_version(world["data"] / "models")
            assert list(resp.tasks) == ["click", "conversion"] and resp.model_kind == "gem"
            assert (resp.history_events > 0) == (user_id == heavy)
            values = [resp.candidates[i].value for i in resp.order]
            assert values == sorted(values, reverse=True) and sorted(resp.order) == list(range(len(cands)))
            assert [c.ad_id for c in resp.candidates] == [e.item_id for e in cands]
    finally:
        reader.close()


def test_health_reflection_and_bids(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, _, client = service
    assert client.health() == "SERVING" and client.health("opengem.serving.v1.Ranker") == "SERVING"
    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in out[0].list_services_response.service}
    assert {"opengem.serving.v1.Ranker", "grpc.health.v1.Health"} <= names
    # value = bid x P(conversion); a zero bid ranks last, tasks can be restricted
    resp = client.rank(5, "feed", [{"ad_id": 1, "bid": 0.0}, {"ad_id": 2, "bid": 3.0}], tasks=["click"],
                       value_task="click")
    assert list(resp.tasks) == ["click"] and len(resp.candidates[0].scores) == 1
    assert resp.candidates[0].value == 0.0 and list(resp.order) == [1, 0]
    assert resp.candidates[1].value == pytest.approx(3.0 * resp.candidates[1].scores[0])


@pytest.mark.parametrize("req,msg", [
    (dict(surface="tv"), "unknown surface"),
    (dict(candidates=[]), "no candidates"),
    (dict(candidates=[-3]), "ad_id=-3"),
    (dict(user_id=-1), "user_id"),
    (dict(candidates=list(range(65))), "exceed the limit of 64"),
    (dict(candidates=[{"ad_id": 1, "ad_format": "banner"}]), "ad_format"),
    (dict(candidates=[{"ad_id": 1, "bid": float("inf")}]), "bid"),
    (dict(context={"ts_ms": 10}), "ts_ms"),
    (dict(tasks=["install"]), "unknown task"),
])
def test_bad_requests_are_invalid_argument_with_a_message(service, req, msg):
    _, _, client = service
    args = dict(user_id=1, surface="feed", candidates=[1, 2])
    args.update(req)
    with pytest.raises(grpc.RpcError) as ei:
        client.rank(**args)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert msg in ei.value.details() and "Traceback" not in ei.value.details()


def test_limits_and_deadlines(world, service):
    _, ends, client = service
    big = build_request(1, "feed", [{"ad_id": i, "ad_format": "video"} for i in range(10_000)])
    with pytest.raises(grpc.RpcError) as ei:
        client.rank_request(big)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a server budget that runs out before scoring -> DEADLINE_EXCEEDED, not a failure
    svc = Service(_cfg(world["data"], timeout_s=1e-6), reader=service[0].reader)
    e2 = svc.start()
    try:
        with RankClient(f"127.0.0.1:{e2.grpc_port}") as c, pytest.raises(grpc.RpcError) as ei:
            c.rank(1, "feed", [1, 2])
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        svc.stop()
    assert client.health() == "SERVING"


def test_no_model_yet_is_unavailable_until_one_is_published(world, tmp_path):
    svc = Service(_cfg(world["data"], models_dir=str(tmp_path / "models")))
    e = svc.start()
    try:
        with RankClient(f"127.0.0.1:{e.grpc_port}") as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.rank(1, "feed", [1])
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert c.health() == "NOT_SERVING"
            v = registry.publish(tmp_path / "models", world["model"]).name
            deadline = time.monotonic() + 10
            while c.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.rank(1, "feed", [1]).model_version == v
    finally:
        svc.stop()


def test_hot_swap_under_load_fails_no_request_and_skips_a_broken_version(world, tmp_path):
    models = tmp_path / "models"
    torch.manual_seed(2)
    registry.publish(models, world["model"])
    svc = Service(_cfg(world["data"], models_dir=str(models)), reader=None)
    e = svc.start()
    seen: Counter[str] = Counter()
    errors: list[str] = []
    stop = threading.Event()

    def load():
        with RankClient(f"127.0.0.1:{e.grpc_port}") as c:
            while not stop.is_set():
                try:
                    seen[c.rank(42, "reels", list(range(20)), timeout_s=10).model_version] += 1
                except grpc.RpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        published = [registry.latest_version(models)]

        def until(cond, what: str, timeout_s: float = 60.0) -> None:
            # each swap is waited for (not slept for): on a loaded machine the watcher may be slow
            deadline = time.monotonic() + timeout_s
            while not cond():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.05)

        for i in range(3):
            time.sleep(0.3)  # requests on the current version meanwhile
            m = GemModel(preset("tiny"))
            m.load_state_dict(world["model"].state_dict())
            with torch.no_grad():
                for prm in m.heads.parameters():
                    prm.add_(0.05 * (i + 1))
            published.append(registry.publish(models, m).name)
            until(lambda: svc.models.current.loaded.version == published[-1], f"{published[-1]} served")
        broken = GemModel(preset("tiny"))
        with torch.no_grad():
            broken.heads.towers[0][0].weight.fill_(float("nan"))
        bad = registry.publish(models, broken).name
        until(lambda: bad in svc.models.rejected, f"{bad} rejected")
        n = sum(seen.values())
        until(lambda: sum(seen.values()) > n + 3, "requests after the rejection")
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert errors == []
        assert set(seen) <= set(published) and published[-1] in seen and len(seen) >= 2, seen
        assert bad in svc.models.rejected and svc.models.current.loaded.version == published[-1]
        assert svc.models.swaps == 3
    finally:
        svc.stop()


def test_bearer_token_and_remote_bind(world):
    with pytest.raises(ValueError, match="bearer token"):
        Service(_cfg(world["data"], host="0.0.0.0"))
    svc = Service(_cfg(world["data"]), token="s3cret")
    e = svc.start()
    try:
        with RankClient(f"127.0.0.1:{e.grpc_port}") as anon, pytest.raises(grpc.RpcError) as ei:
            anon.rank(1, "feed", [1])
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RankClient(f"127.0.0.1:{e.grpc_port}") as anon:
            assert anon.health() == "SERVING"  # load balancers need no token
        with RankClient(f"127.0.0.1:{e.grpc_port}", token="wrong") as c, pytest.raises(grpc.RpcError) as ei:
            c.rank(1, "feed", [1])
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RankClient(f"127.0.0.1:{e.grpc_port}", token="s3cret") as c:
            assert len(c.rank(1, "feed", [1, 2]).candidates) == 2
    finally:
        svc.stop()


def test_json_endpoint_matches_grpc(service):
    _, ends, client = service
    url = f"http://127.0.0.1:{ends.http_port}"
    body = {"user_id": 7, "surface": "stories", "candidates": [{"ad_id": 3}, {"ad_id": 4, "bid": 2}],
            "context": {"ts_ms": 1_750_000_000_000, "hour": 9}}
    req = urllib.request.Request(f"{url}/v1/rank", json.dumps(body).encode(), {"content-type": "application/json"})
    got = json.loads(urllib.request.urlopen(req, timeout=10).read())
    want = client.rank(7, "stories", [3, {"ad_id": 4, "bid": 2}], context={"ts_ms": 1_750_000_000_000, "hour": 9})
    assert got["model_version"] == want.model_version
    assert [c["scores"] for c in got["candidates"]] == [list(c.scores) for c in want.candidates]
    for raw, code in ((b"{nope", 400), (json.dumps({**body, "surface": "tv"}).encode(), 400)):
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v1/rank", raw), timeout=10)
        assert ei.value.code == code and "error" in json.loads(ei.value.read())
    assert json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=10).read())["serving"] is True


_any_int = st.integers(-(2**63), 2**63 - 1)
_text = st.one_of(st.sampled_from(["feed", "reels", "", "click", "conversion", "video", "US", "ios"]), st.text(max_size=8))
_candidate = st.fixed_dictionaries({"ad_id": _any_int}, optional={
    "advertiser_id": _any_int, "category": st.integers(-(2**31), 2**31 - 1), "ad_format": _text,
    "bid": st.floats(allow_nan=True, allow_infinity=True)})
_context = st.fixed_dictionaries({}, optional={
    "ts_ms": _any_int, "hour": st.integers(-(2**31), 2**31 - 1), "device": _text, "country": _text,
    "age_bucket": st.integers(-(2**31), 2**31 - 1)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=_any_int, surface=_text, cands=st.lists(_candidate, max_size=4), ctx=_context,
       tasks=st.lists(_text, max_size=2), raw=st.binary(max_size=64))
def test_fuzzed_requests_always_get_a_proper_status(service, user, surface, cands, ctx, tasks, raw):
    _, _, client = service
    ok = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    try:
        client.rank(user, surface, cands, context=ctx, tasks=tasks)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert "Traceback" not in (e.details() or "")
    assert code in ok
    # arbitrary bytes as the request message: the server must answer, not die
    call = client.channel.unary_unary("/opengem.serving.v1.Ranker/Rank")
    try:
        call(raw, timeout=10)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), e
    assert client.health() == "SERVING"


def test_metrics_count_requests_by_code(service):
    from opengem.ops import metrics

    svc, _, client = service
    port = metrics.serve(0)
    before = metrics.SERVE_REQUESTS.labels("INVALID_ARGUMENT")._value.get()
    with pytest.raises(grpc.RpcError):
        client.rank(1, "nope", [1])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith('opengem_serve_requests_total{code="INVALID_ARGUMENT"}'))
    assert float(line.split()[-1]) == before + 1
    assert f'opengem_serve_model_info{{kind="gem",version="{svc.models.current.loaded.version}"}} 1.0' in text
    assert "opengem_serve_request_seconds_bucket" in text


def test_rank_command(service, capsys):
    from opengem.cli import main

    _, ends, _ = service
    assert main(["rank", "--target", f"127.0.0.1:{ends.grpc_port}", "--user", "3", "--surface", "feed",
                 "--ads", "10,11,12", "--hour", "8"]) == 0
    out = capsys.readouterr().out
    assert "P(click)" in out and out.count("\n") >= 4
    assert main(["rank", "--target", f"127.0.0.1:{ends.grpc_port}", "--user", "3", "--surface", "tv",
                 "--ads", "1"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


@pytest.mark.parametrize("n_tasks", [0, 1, 2, 3])
def test_response_candidates_built_column_wise_equal_the_messages(n_tasks):
    """result_to_proto writes the candidates' scores as wire bytes built with numpy: the message
    equals the one built CandidateScore by CandidateScore, and serializes to the same bytes
    (varint edges: 0, 127 / 128, 2^63 - 1; zero scores and values)."""
    import numpy as np

    from opengem.serving.ranker import RankResult
    from opengem.serving.server import result_to_proto

    rng = np.random.default_rng(n_tasks)
    ids = np.array([0, 1, 127, 128, 16383, 16384, 2**35, 2**62, 2**63 - 1]
                   + rng.integers(0, 2**63 - 1, 40).tolist(), np.int64)
    scores, values = rng.random((len(ids), n_tasks)), 3 * rng.random(len(ids))
    scores[0], values[1] = 0.0, 0.0
    r = RankResult("v1", "gem", ("click", "conversion", "x")[:n_tasks], "click", ids, scores, values,
                   np.argsort(-values, kind="stable"), 17, "req-1")
    want = pb.RankResponse(
        model_version=r.model_version, model_kind=r.model_kind, tasks=r.tasks, value_task=r.value_task,
        candidates=[pb.CandidateScore(ad_id=a, scores=s, value=v)
                    for a, s, v in zip(r.ad_ids.tolist(), r.scores.tolist(), r.values.tolist())],
        order=r.order.tolist(), history_events=r.history_events, request_id=r.request_id)
    got = result_to_proto(r)
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def test_query_from_proto_keeps_presence():
    """Optional candidate fields: set (even to 0) -> the value, unset -> None (bid: 1.0)."""
    from opengem.serving.server import query_from_proto

    msg = pb.RankRequest(user_id=3, surface="feed", candidates=[
        pb.Candidate(ad_id=5, advertiser_id=0, category=0, ad_format="video", bid=0.0),
        pb.Candidate(ad_id=0), pb.Candidate(ad_id=7, category=4, bid=2.5)])
    q = query_from_proto(pb.RankRequest.FromString(msg.SerializeToString()), now_ms=1)
    assert [tuple(c) for c in q.candidates] == [(5, 0, 0, "video", 0.0), (0, None, None, None, 1.0),
                                               (7, None, 4, None, 2.5)]
    assert q.ts_ms == 1


def test_start_freezes_the_start_up_heap_and_stop_releases_it(world):
    """opengem serve moves what start-up made (imports, the first model) out of the collector's
    reach (a full collection with it all took ~210 ms here, every thread stopped); stop undoes it.
    With [serve] gc_freeze = false nothing is frozen."""
    import gc

    gc.unfreeze()
    svc = Service(_cfg(world["data"]))
    svc.start()
    try:
        assert gc.get_freeze_count() > 10_000  # torch, grpc, the model...
    finally:
        svc.stop()
    assert gc.get_freeze_count() == 0
    svc = Service(_cfg(world["data"], gc_freeze=False))
    svc.start()
    try:
        assert gc.get_freeze_count() == 0
    finally:
        svc.stop()


def test_a_bf16_server_scores_within_its_stated_bound_of_the_trainer(world):
    """`[serve] precision = "bf16"` reaches the served versions (the FM MLPs in bfloat16): the
    scores are no longer bit-for-bit the trainer's but within the canary's bound, and the canary
    recorded how far it moved them."""
    from opengem.serving.scoring import BF16_MAX_ERROR

    svc = Service(_cfg(world["data"], precision="bf16"))
    ends = svc.start()
    client = RankClient(f"127.0.0.1:{ends.grpc_port}")
    reader = ShardedReader(world["data"], P, secondary_root=world["root"] / "trainer-sec-bf16")
    try:
        client.wait_ready(10)
        scorer = svc.models.current
        assert scorer.precision == "bf16" and 0 < scorer.precision_error <= BF16_MAX_ERROR
        model = registry.load(world["data"] / "models").model
        exs = world["examples"]
        anchor = exs[0]
        cands = [dataclasses.replace(e, user_id=anchor.user_id, ts=anchor.ts, surface=anchor.surface,
                                     hour=anchor.hour, device=anchor.device, country=anchor.country,
                                     age_bucket=anchor.age_bucket) for e in exs[:30]]
        resp = client.rank_request(_request_for(cands))
        with torch.inference_mode():
            want = model.predict(examples_batch(cands, reader, model.cfg)).double()
        got = torch.tensor([list(c.scores) for c in resp.candidates], dtype=torch.float64)
        assert not torch.allclose(got, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(got, want, atol=BF16_MAX_ERROR, rtol=0)
    finally:
        reader.close()
        client.close()
        svc.stop()
