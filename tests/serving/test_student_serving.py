"""Serving a student for a surface (``[serve] models = {reels = "student"}``): a real gRPC server,
real RocksDB shards written by the worker's ingest path, a real representation store written by
GEM (the daemon's role) and read by the server as a secondary; published student versions."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter

import grpc
import pytest
import torch

from opengem import config as cfgmod
from opengem.features.representations import RepresentationStore
from opengem.features.sharded import ShardedReader
from opengem.model import registry
from opengem.model.config import preset
from opengem.model.data import examples_batch
from opengem.model.gem import GemModel
from opengem.model.student import (
    StudentConfig, StudentInputs, StudentLearner, refresh_representations, representation_dim, student_inputs,
)
from opengem.serving.client import RankClient, build_request
from opengem.serving.server import Service
from opengem.stream.simulator import SimConfig, Simulator

from ingest_testing import ingest_json

P = 2
SURFACE = "reels"
# Parity tolerance: float32 forward passes over differently assembled batches (the server cuts the
# user's history to the student's 16 events before replicating it; the trainer's batch holds 256
# per row), and fp16 representations read from the same store entry: equal up to rounding.
ATOL = 1e-6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-student")
    data = root / "data"
    events = [e for b in Simulator(SimConfig(seed=5, n_users=150, events_per_second=10.0)).batches(12_000) for e in b]
    examples = ingest_json(data, events, P)  # short windows: examples close soon
    torch.manual_seed(1)
    gem = GemModel(preset("tiny")).eval()
    registry.publish(data / "models", gem)
    mine = [e for e in examples if e.surface == SURFACE]
    assert len(mine) > 50
    # GEM's user representations as of the middle of the stream (what the daemon's refresh writes).
    t_rep = sorted(e.ts for e in mine)[len(mine) // 2]
    R = representation_dim(gem)
    store = RepresentationStore(data / "representations" / SURFACE, R)
    reader = ShardedReader(data, P, secondary_root=root / "trainer-sec")
    refresh_representations(gem, [e for e in examples if e.ts < t_rep], reader, store, t_rep, version=1)
    # A student with every input: history, representations; trained a little on its surface's examples.
    scfg = StudentConfig(features=gem.cfg.features, surface=SURFACE, history=16, hidden=(32, 16), distill=True,
                         repr_dim=R)
    learner = StudentLearner(scfg, seed=0)
    for i in range(0, len(mine) - 32, 32):
        chunk = mine[i:i + 32]
        b = examples_batch(chunk, reader, scfg)
        x = student_inputs(b, [e.user_id for e in chunk], [e.ts for e in chunk], store)
        learner.step(x, torch.ones(len(chunk)), None)
    student = learner.model.eval()
    meta = {"surface": SURFACE, "representations_dir": str(data / "representations" / SURFACE)}
    sv = registry.publish(data / "students" / SURFACE, student, meta).name
    yield dict(root=root, data=data, examples=examples, mine=mine, gem=gem, student=student, store=store,
               reader=reader, t_rep=t_rep, version=sv, meta=meta)
    reader.close()
    store.close()


def _cfg(data, **serve):
    base = dict(port=0, poll_s=0.1, catch_up_s=0.2, max_candidates=64, max_request_bytes=64 << 10,
                models={SURFACE: "student"})
    base.update(serve)
    return cfgmod.load(None, data_dir=str(data), **{"kafka.partitions": P},
                       **{f"serve.{k}": v for k, v in base.items()})


def _request(cands):
    e0 = cands[0]
    return build_request(
        e0.user_id, e0.surface,
        [{"ad_id": e.item_id, **({"advertiser_id": e.advertiser_id} if e.advertiser_id is not None else {}),
          **({"category": e.category} if e.category is not None else {}),
          **({"ad_format": e.ad_format} if e.ad_format is not None else {})} for e in cands],
        context={k: v for k, v in (("ts_ms", e0.ts), ("hour", e0.hour), ("device", e0.device),
                                   ("country", e0.country), ("age_bucket", e0.age_bucket)) if v is not None})


def test_config_names_the_problem(world):
    with pytest.raises(ValueError, match=r"unknown surface\(s\) \['tv'\]"):
        Service(_cfg(world["data"], models={"tv": "student"}))
    with pytest.raises(ValueError, match="gem.*student"):
        _cfg(world["data"], models={SURFACE: "tiny-gem"})


def test_served_student_scores_equal_its_own_predictions_and_name_the_version(world):
    svc = Service(_cfg(world["data"], http_port=0))
    ends = svc.start()
    try:
        with RankClient(f"127.0.0.1:{ends.grpc_port}") as client:
            client.wait_ready(10)
            student, store, reader, mine = world["student"], world["store"], world["reader"], world["mine"]
            later = [e for e in mine if e.ts > world["t_rep"]]
            by_user = Counter(e.user_id for e in later)
            heavy = max(by_user, key=by_user.get)
            anchor = next(e for e in later if e.user_id == heavy)
            new_ad = dataclasses.replace(mine[0], item_id=10**13, advertiser_id=None, category=None, ad_format=None)
            checked_reps = False
            for user_id in (heavy, 10**14):  # a user with history and a representation; one never seen
                cands = [dataclasses.replace(e, user_id=user_id, ts=anchor.ts, surface=SURFACE, hour=anchor.hour,
                                             device=anchor.device, country=anchor.country,
                                             age_bucket=anchor.age_bucket) for e in mine[:30] + [new_ad]]
                resp = client.rank_request(_request(cands))
                assert resp.model_kind == "student" and resp.model_version == world["version"]
                assert svc.students[SURFACE].current.shared  # the history pooled once per request
                b = examples_batch(cands, reader, student.cfg)  # the student trainer's batch
                x = student_inputs(b, [e.user_id for e in cands], [e.ts for e in cands], store)
                with torch.inference_mode():
                    want = student.predict(x).double()
                got = torch.tensor([list(c.scores) for c in resp.candidates], dtype=torch.float64)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
                assert got[:, 0].std() > 0
                if user_id == heavy:
                    assert bool(x.has_reps.all()) and resp.history_events > 0
                    with torch.inference_mode():  # the representation really reaches the served score
                        blind = student.predict(StudentInputs(b, x.reps, torch.zeros(len(b), dtype=torch.bool)))
                    assert float((blind.double() - got).abs().max()) > 1e-4
                    checked_reps = True
                else:
                    assert not bool(x.has_reps.any()) and resp.history_events == 0
            assert checked_reps
            # Before the first refresh the user has no representation: absent, as the trainer saw it.
            early = next(e for e in mine if e.ts < world["t_rep"] and e.user_id == heavy)
            cands = [dataclasses.replace(e, user_id=heavy, ts=early.ts, surface=SURFACE, hour=early.hour,
                                         device=early.device, country=early.country, age_bucket=early.age_bucket)
                     for e in mine[:8]]
            got = torch.tensor([list(c.scores) for c in client.rank_request(_request(cands)).candidates],
                               dtype=torch.float64)
            x = student_inputs(examples_batch(cands, reader, student.cfg), [heavy] * 8, [early.ts] * 8, store)
            assert not bool(x.has_reps.any())
            with torch.inference_mode():
                torch.testing.assert_close(got, student.predict(x).double(), atol=ATOL, rtol=0)
            # Other surfaces are still GEM's.
            feed = client.rank(heavy, "feed", [1, 2, 3])
            assert feed.model_kind == "gem" and feed.model_version == registry.latest_version(world["data"] / "models")
            import json
            import urllib.request

            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ends.http_port}/healthz").read())
            assert health["students"] == {SURFACE: world["version"]}
            from prometheus_client import generate_latest

            from opengem.ops import metrics

            text = generate_latest(metrics.REGISTRY).decode()  # both served models are listed
            assert f'opengem_serve_model_info{{kind="student",version="{world["version"]}"}} 1.0' in text
            assert f'opengem_serve_model_info{{kind="gem",version="{feed.model_version}"}} 1.0' in text
    finally:
        svc.stop()


def test_a_student_surface_without_a_student_is_unavailable_until_one_is_published(world, tmp_path):
    svc = Service(_cfg(world["data"], students_dir=str(tmp_path / "students")))
    e = svc.start()
    try:
        with RankClient(f"127.0.0.1:{e.grpc_port}") as c:
            c.wait_ready(10)
            with pytest.raises(grpc.RpcError) as ei:
                c.rank(1, SURFACE, [1])
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "students" in ei.value.details()
            assert c.rank(1, "feed", [1]).model_kind == "gem"  # the other surfaces serve meanwhile
            v = registry.publish(tmp_path / "students" / SURFACE, world["student"], world["meta"]).name
            deadline = time.monotonic() + 10
            while svc.students[SURFACE].current is None and time.monotonic() < deadline:
                time.sleep(0.05)
            r = c.rank(1, SURFACE, [1])
            assert (r.model_kind, r.model_version) == ("student", v)
    finally:
        svc.stop()


def _perturbed(student, delta: float):
    m = type(student)(student.cfg)
    m.load_state_dict(student.state_dict())
    with torch.no_grad():
        for prm in m.serve_head.parameters():
            prm.add_(delta)
    return m.eval()


def test_student_hot_swap_under_load_fails_no_request_and_refuses_bad_versions(world, tmp_path):
    sdir = tmp_path / "students"
    registry.publish(sdir / SURFACE, world["student"], world["meta"])
    svc = Service(_cfg(world["data"], students_dir=str(sdir)))
    e = svc.start()
    seen: Counter[str] = Counter()
    errors: list[str] = []
    stop = threading.Event()
    heavy = Counter(ex.user_id for ex in world["mine"]).most_common(1)[0][0]

    def load():
        with RankClient(f"127.0.0.1:{e.grpc_port}") as c:
            while not stop.is_set():
                try:
                    r = c.rank(heavy, SURFACE, list(range(20)), timeout_s=10)
                    assert r.model_kind == "student"
                    seen[r.model_version] += 1
                except grpc.RpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        published = [registry.latest_version(sdir / SURFACE)]
        for i in range(3):
            time.sleep(0.6)
            published.append(registry.publish(sdir / SURFACE, _perturbed(world["student"], 0.05 * (i + 1)),
                                              world["meta"]).name)
        broken = _perturbed(world["student"], 0.0)
        with torch.no_grad():
            broken.serve_head.weight.fill_(float("nan"))
        bad = registry.publish(sdir / SURFACE, broken, world["meta"]).name
        wrong = StudentLearner(dataclasses.replace(world["student"].cfg, surface="feed"), seed=0).model
        wrong_surface = registry.publish(sdir / SURFACE, wrong, world["meta"]).name
        gem_here = registry.publish(sdir / SURFACE, world["gem"]).name
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        m = svc.students[SURFACE]
        assert errors == []
        assert set(seen) <= set(published) and published[-1] in seen and len(seen) >= 2, seen
        assert m.current.loaded.version == published[-1] and m.swaps == 3
        assert "finite" in m.rejected[bad]
        assert "student of 'feed'" in m.rejected[wrong_surface]
        assert "not a student" in m.rejected[gem_here]
        assert svc.models.current.loaded.kind == "gem" and svc.models.swaps == 0  # GEM's manager untouched
    finally:
        svc.stop()


def test_student_scorer_shares_the_users_history_and_equals_the_trainers_batch():
    """The serving split (history pooled once per request) and the trainer's B-row batch (the
    user's last ``history`` events replicated) give the model's own ``predict`` on the trainer's
    replicated batch, for students with and without history, a user with a long history and one
    never seen; the canary keeps the split."""
    from opengem.features.memory import MemorySequenceStore
    from opengem.model.registry import LoadedModel
    from opengem.serving.scoring import AdCandidate, RankQuery, StudentScorer, canary_check, featurize

    s = MemorySequenceStore()
    events = [e for b in Simulator(SimConfig(seed=9, n_users=5)).batches(3_000) for e in b]
    s.apply(events, (0, 0))
    fc = preset("tiny").features
    heavy = Counter(e.user_id for e in events).most_common(1)[0][0]
    for hist in (0, 1, 7, 256):
        m = StudentLearner(StudentConfig(features=fc, surface="feed", history=hist, hidden=(16,)), seed=hist).model
        m.eval()
        sc = StudentScorer(LoadedModel(version="t", kind="student", model=m, meta={}, path=None))
        canary_check(sc)
        assert sc.shared
        for user in (heavy, 10**12):
            q = RankQuery(user_id=user, surface="feed", candidates=tuple(AdCandidate(ad_id=a) for a in range(1, 9)),
                          ts_ms=max(e.ts for e in events) + 1)
            rb = featurize(q, s, m.cfg)
            assert (rb.history_events > 0) == (user == heavy)
            assert sc.batch(rb).seq_lengths.tolist() == [min(hist, rb.history_events)] * 8
            with torch.inference_mode():
                want = m.predict(rb.replicated())
            got = sc.probs(rb)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            sc.shared = False
            torch.testing.assert_close(sc.probs(rb), want, atol=ATOL, rtol=0)
            sc.shared = True
            if hist and user == heavy:
                assert got[:, 0].std() > 0
    with_reps = StudentLearner(StudentConfig(features=fc, repr_dim=4, hidden=(8,)), seed=0).model
    with pytest.raises(ValueError, match="representation store"):
        StudentScorer(LoadedModel(version="t", kind="student", model=with_reps, meta={}, path=None))


def test_opengem_serve_student_command(world, tmp_path):
    """``opengem serve --student SURFACE`` as a process: the surface answers with the student."""
    import os
    import re
    import signal
    import subprocess
    import sys

    conf = tmp_path / "serve.toml"
    conf.write_text(f'data_dir = "{world["data"]}"\n[kafka]\npartitions = {P}\n[serve]\nport = 0\n'
                    "metrics_port = -1\npoll_s = 0.2\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENGEM_BOOTSTRAP"}
    env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen([sys.executable, "-m", "opengem.cli", "serve", "--config", str(conf), "--student", SURFACE],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = p.stdout.readline()
        deadline = time.monotonic() + 120
        while "gRPC" not in line and time.monotonic() < deadline and p.poll() is None:
            line = p.stdout.readline()
        port = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        assert port, line
        assert f"{SURFACE}: student {world['version']}" in line
        with RankClient(f"127.0.0.1:{port.group(1)}") as c:
            c.wait_ready(30)
            # The server's first requests warm it up: on a loaded machine they took over the client's
            # default 2 s (DEADLINE_EXCEEDED at load 7, before and after issue 6's changes).
            r = c.rank(1, SURFACE, [1, 2], timeout_s=60)
            assert (r.model_kind, r.model_version) == ("student", world["version"])
            assert c.rank(1, "feed", [1], timeout_s=60).model_kind == "gem"
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
