"""The trainer daemon in student mode (`opengem train --student SURFACE`): a real examples topic on
the embedded broker, real RocksDB shards (``prepare_stream``), a GEM teacher published through the
registry, versions of kind "student", the teacher reloaded when a newer GEM version appears, the
representation store refreshed, and a restart from the checkpoint."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from opengem.model import checkpoint as ckpt
from opengem.model import registry
from opengem.model.config import preset
from opengem.model.gem import GemModel
from opengem.model.source import Cursor, cursors_from_state
from opengem.model.student import StudentAdapter, StudentConfig, StudentLearner
from opengem.model.train_config import StudentTrainConfig, TrainConfig

TINY = TrainConfig(preset="tiny", batch_size=32, fill_timeout_s=0.05, metrics_port=None, report_every_s=60,
                   checkpoint_every_s=0, publish_every_s=0, keep_versions=50)


def _student(**kw) -> StudentTrainConfig:
    return StudentTrainConfig(**{"history": 16, "hidden": (16, 8), "teacher_poll_s": 0.0, "teacher_wait_s": 0.0,
                                 "adapter_refit_every": 64, **kw})


def _publish_teacher(models: Path, seed: int, surfaces, **meta) -> str:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("tiny"), features=dataclasses.replace(preset("tiny").features,
                                                                           surfaces=tuple(surfaces)))
    return registry.publish(models, GemModel(cfg), {"note": f"teacher seed {seed}", **meta}).name


# --------------------------------------------------------------------------- units


def test_student_config_rejects_bad_values_with_the_key():
    with pytest.raises(ValueError, match="share_tables"):
        StudentTrainConfig(share_tables="shared")
    with pytest.raises(ValueError, match=r"history.*256"):
        StudentTrainConfig(history=300)
    with pytest.raises(ValueError, match="refresh_every_s"):
        StudentTrainConfig(refresh_every_s=0)
    with pytest.raises(ValueError, match="soft_mix"):
        StudentTrainConfig(soft_mix=1.5)


def test_student_learner_resumes_exactly_from_its_state(tmp_path):
    """Model, optimizers, adapter window and fit: a learner restored from ``state()`` (through a
    checkpoint file, loaded weights_only) continues exactly as the one that never stopped."""
    from opengem.model.batch import synthetic_batch

    fc = preset("tiny").features
    cfg = StudentConfig(features=fc, surface="feed", history=8, hidden=(16, 8), distill=True)

    def make(seed):
        return StudentLearner(cfg, adapter=StudentAdapter(2, window=100, refit_every=10), seed=seed)

    def steps(lr, seeds):
        out = []
        for s in seeds:
            b = synthetic_batch(fc, [3, 0, 17, 40, 1, 9], seed=s)
            tp = np.random.default_rng(s).uniform(0.01, 0.5, (6, 2))
            out.append(lr.step(b, torch.ones(6), tp))
        return out

    a = make(0)
    steps(a, range(4))
    path = ckpt.save(tmp_path, 4, {"learner": a.state()}, rank=0, world_size=1)
    state = ckpt.load(path, rank=0, world_size=1)[0]["learner"]
    cont = steps(a, range(4, 8))
    b = make(123)
    b.load_state(state)
    assert b.adapter.fits == state["adapter"]["fits"] > 0
    for x, y in zip(cont, steps(b, range(4, 8))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    np.testing.assert_array_equal(a.adapter.a, b.adapter.a)
    with pytest.raises(ValueError, match="adapter"):
        StudentLearner(cfg, seed=0).load_state(state)


def test_cli_refuses_an_unknown_student_surface(tmp_path, capsys):
    from opengem.cli import main

    assert main(["train", "--student", "nowhere", "--data-dir", str(tmp_path), "--metrics-port", "-1"]) == 2
    assert "not a surface" in capsys.readouterr().err


# --------------------------------------------------------------------------- the daemon


def _trainer(s, tcfg, surface, info, **kw):
    from opengem.model.student_daemon import StudentTrainer

    log: list[str] = []
    return StudentTrainer(s.cfg, tcfg, surface, s.bootstrap, info, echo=log.append, **kw), log


@pytest.mark.integration
def test_student_daemon_publishes_reloads_its_teacher_and_refreshes_representations(make_stream, dist_group):
    s = make_stream(n_events=8_000)
    by_surface = Counter(e.surface for e in s.examples)
    surface = by_surface.most_common(1)[0][0]
    mine = [e for e in s.examples if e.surface == surface]
    assert 100 < len(mine) < len(s.examples)
    data = Path(s.cfg.data_dir)
    v1 = _publish_teacher(data / "models", 1, s.cfg.surfaces)
    tcfg = dataclasses.replace(TINY, batch_size=8, publish_every_steps=3, checkpoint_every_steps=4,
                               student=_student(representations=True, refresh_every_s=120.0,
                                                share_tables="finetune"))
    tr, log = _trainer(s, tcfg, surface, dist_group)
    assert tr.teacher.version == v1 and tr.student_cfg.repr_dim > 0 and tr.student_cfg.d == preset("tiny").d
    # Parameter sharing: the student starts from the teacher's tables.
    torch.testing.assert_close(tr.learner.student.model.sparse.ebc.state_dict(),
                               tr.teacher.model.sparse.ebc.state_dict())

    # Mid-run, the GEM trainer publishes a newer version: the daemon must move to it.
    seen: list[tuple[str, int, bool]] = []  # (teacher version, rows, any representation present)
    step = tr.learner.student.step
    v2 = {}

    def spy(x, weight, tp):
        seen.append((tr.teacher.version, len(weight), bool(x.has_reps.any())))
        assert tp is not None and tp.shape == (len(weight), 2)
        if len(seen) == 4:  # a GEM version that has trained on the whole topic, i.e. ahead of the student
            v2["v"] = _publish_teacher(data / "models", 2, s.cfg.surfaces, topic_id=tr.topic_id,
                                       cursors={str(p): [n, 0] for p, n in hw.items()})
        return step(x, weight, tp)

    from opengem.stream.broker import high_watermarks

    hw = high_watermarks(s.bootstrap, s.cfg.kafka.examples_topic)
    tr.learner.student.step = spy
    stats = tr.run(idle_exit_s=1.5)

    assert len(seen) >= 10
    # Only the student's surface, every one of its examples once.
    assert stats.examples == len(mine) == sum(n for _, n, _ in seen)
    assert stats.sampled_out == len(s.examples) - len(mine)
    # The teacher reloaded right after the newer version appeared, and stayed there.
    versions_seen = [v for v, _, _ in seen]
    assert versions_seen[:4] == [v1] * 4 and versions_seen[4:] == [v2["v"]] * (len(seen) - 4)
    assert tr.teacher.reloads == 1
    # Distilling from a teacher that had already trained past the batch is counted, not hidden.
    assert tr.teacher_ahead == len(seen) - 4
    assert any(f"teacher: gem version {v2['v']}" in line for line in log)
    # Representations were refreshed into the store and read back by later examples.
    assert tr.learner.refresher.refreshes > 0 and tr.learner.refresher.users_written > 0
    assert any(has for _, _, has in seen[len(seen) // 2:])
    assert not seen[0][2]  # nothing before the first refresh

    # Versions of kind "student", for this surface, naming their teacher; the last covers the topic.
    sdir = data / "students" / surface
    names = registry.list_versions(sdir)
    assert len(names) >= 3
    metas = [registry.read_meta(sdir, n) for n in names]
    assert all(m["kind"] == "student" and m["surface"] == surface for m in metas)
    assert metas[0]["teacher_version"] == v1 and metas[-1]["teacher_version"] == v2["v"]
    last = registry.load(sdir)
    assert last.kind == "student" and last.model.cfg.surface == surface and last.model.cfg.repr_dim > 0
    assert last.meta["teacher_ahead_batches"] == len(seen) - 4
    assert last.meta["cursors"] == {str(p): [hw[p], 0] for p in sorted(hw)}
    assert last.meta["progressive"]["click"]["n"] == len(mine)
    assert last.meta["representations_dir"] == str(data / "representations" / surface)
    # The published student is the trained one (its serving head's predictions).
    from opengem.model.data import examples_batch
    from opengem.model.student import student_inputs

    from opengem.features.representations import RepresentationStore
    from opengem.features.sharded import ShardedReader

    with ShardedReader(data, 2, topic=s.cfg.kafka.events_topic, secondary_root=data / "chk") as r, \
            RepresentationStore(data / "representations" / surface, last.model.cfg.repr_dim,
                                secondary_dir=data / "chk-reps") as reps:
        _, present = reps.get([e.user_id for e in mine], [e.ts for e in mine])
        assert present.mean() > 0.3, present.mean()
        exs = [e for e, p in zip(mine, present) if p][-12:] + [e for e, p in zip(mine, present) if not p][-4:]
        b = examples_batch(exs, r, last.model.cfg)
        x = student_inputs(b, [e.user_id for e in exs], [e.ts for e in exs], reps)
        assert x.has_reps.tolist() == [True] * 12 + [False] * 4
        torch.testing.assert_close(last.model.predict(x), tr.learner.student.predict(x), rtol=0, atol=1e-6)
    # The GEM versions were never touched; the student's checkpoints live apart from GEM's.
    assert registry.list_versions(data / "models") == [v1, v2["v"]]
    assert ckpt.latest(data / "train" / "students" / surface / "checkpoints") is not None
    assert ckpt.latest(data / "train" / "checkpoints") is None


@pytest.mark.integration
def test_student_daemon_resumes_from_its_checkpoint(make_stream, dist_group):
    s = make_stream(n_events=6_000)
    surface = Counter(e.surface for e in s.examples).most_common(1)[0][0]
    mine = {e.example_id for e in s.examples if e.surface == surface}
    data = Path(s.cfg.data_dir)
    _publish_teacher(data / "models", 1, s.cfg.surfaces)
    tcfg = dataclasses.replace(TINY, batch_size=16, checkpoint_every_steps=4, publish_every_steps=5,
                               student=_student(representations=True, refresh_every_s=60.0))

    first, _ = _trainer(s, tcfg, surface, dist_group)
    first._finish = lambda: None  # a crash: no final checkpoint
    ids1: list[str] = []
    step1 = first._learn
    first._learn = lambda unit: ids1.extend(it.example.example_id for it in unit.items) or step1(unit)
    first.run(lambda: first.stats.steps >= 10)  # the step after a checkpoint: it is trained again
    saved = ckpt.latest(data / "train" / "students" / surface / "checkpoints")
    state, man = ckpt.load(saved, rank=0, world_size=1)
    assert man["model"] == "student" and man["surface"] == surface
    assert state["learner"]["student"]["adapter"]["fits"] >= 0

    assert state["learner"]["refresh"]["refreshes"] > 0
    second, log = _trainer(s, tcfg, surface, dist_group)
    assert any(f"resumed from checkpoint {saved.name}" in line for line in log)
    r1, r2 = state["learner"]["refresh"], second.learner.refresher.state()
    assert r2["last_ts"] == r1["last_ts"] and r2["refreshes"] == r1["refreshes"]
    assert {d["user_id"] for d in r2["recent"]} == {d["user_id"] for d in r1["recent"]}
    assert second.stats.examples == state["examples"] < len(ids1) < len(mine)
    ids2: list[str] = []
    step2 = second._learn
    second._learn = lambda unit: ids2.extend(it.example.example_id for it in unit.items) or step2(unit)
    stats = second.run(idle_exit_s=1.5)
    # The restart resumed at the checkpoint's cursors: what came after it was trained again, nothing
    # was skipped, nothing of another surface.
    assert set(ids1) & set(ids2) and set(ids1) | set(ids2) == mine
    assert stats.examples == len(mine)
    from opengem.stream.broker import high_watermarks

    hw = high_watermarks(s.bootstrap, s.cfg.kafka.examples_topic)
    state, _ = ckpt.load(ckpt.latest(data / "train" / "students" / surface / "checkpoints"), rank=0, world_size=1)
    assert cursors_from_state(state["cursors"]) == {p: Cursor(hw[p], 0) for p in hw}
    # A checkpoint of another student configuration is refused with a clear message.
    other = dataclasses.replace(tcfg, student=dataclasses.replace(tcfg.student, hidden=(32,)))
    with pytest.raises(ckpt.CheckpointError, match="another model configuration"):
        _trainer(s, other, surface, dist_group)


@pytest.mark.integration
def test_opengem_train_student_as_a_process(make_stream, tmp_path):
    """The command line: ``[train.student]`` from the TOML file, ``--student`` naming the surface."""
    import json
    import os
    import subprocess
    import sys

    s = make_stream(n_events=5_000)
    surface = Counter(e.surface for e in s.examples).most_common(1)[0][0]
    data = Path(s.cfg.data_dir)
    v1 = _publish_teacher(data / "models", 1, s.cfg.surfaces)
    k = s.cfg.kafka
    conf = tmp_path / "train.toml"
    conf.write_text("\n".join([
        f'data_dir = "{data}"', "[kafka]", f'events_topic = "{k.events_topic}"',
        f'examples_topic = "{k.examples_topic}"', f'dlq_topic = "{k.dlq_topic}"', f"partitions = {k.partitions}",
        "[train]", 'preset = "tiny"', "batch_size = 16", "publish_every_s = 0", "publish_every_steps = 4",
        "checkpoint_every_s = 0", "checkpoint_every_steps = 4",
        "[train.student]", "history = 8", "hidden = [16]", "representations = true", "refresh_every_s = 60.0", "soft_mix = 0.5",
        "teacher_wait_s = 0.0"]) + "\n")
    env = {k_: v for k_, v in os.environ.items() if k_ not in ("OPENGEM_BOOTSTRAP", "OPENGEM_FAILPOINT")}
    out = subprocess.run([sys.executable, "-m", "opengem.cli", "train", "--config", str(conf), "--bootstrap",
                          s.bootstrap, "--metrics-port", "-1", "--student", surface, "--idle-exit", "2"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"student for {surface}" in out.stdout and f"teacher {v1}" in out.stdout
    assert "soft targets 0.5 on the served head" in out.stdout  # [train.student] soft_mix reached the model
    n = sum(e.surface == surface for e in s.examples)
    assert f"{n:,} examples" in out.stdout.splitlines()[-1]
    loaded = registry.load(data / "students" / surface)
    assert loaded.kind == "student" and loaded.meta["teacher_version"] == v1
    assert loaded.meta["representation_refreshes"] > 0
    assert json.loads(json.dumps(loaded.meta["student"]))["history"] == 8
    # The same command without a teacher anywhere: a clear error, not a traceback.
    out = subprocess.run([sys.executable, "-m", "opengem.cli", "train", "--config", str(conf), "--bootstrap",
                          s.bootstrap, "--metrics-port", "-1", "--student", surface, "--idle-exit", "1",
                          "--data-dir", str(tmp_path / "empty")], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 2 and "no usable published teacher" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_hierarchical_transfer_a_student_teaches_a_student(make_stream, dist_group, tmp_path):
    """GEM -> a per-domain intermediate (this daemon) -> a final student taught by the intermediate's
    published versions; an intermediate that reads representations is refused with the reason."""
    s = make_stream(n_events=5_000)
    surface = Counter(e.surface for e in s.examples).most_common(1)[0][0]
    n = sum(e.surface == surface for e in s.examples)
    data = Path(s.cfg.data_dir)
    _publish_teacher(data / "models", 1, s.cfg.surfaces)
    mid_cfg = dataclasses.replace(TINY, batch_size=16, publish_every_steps=5, student=_student(hidden=(32, 16)))
    mid, _ = _trainer(s, mid_cfg, surface, dist_group)
    mid.run(idle_exit_s=1.5)
    mid_dir = data / "students" / surface
    mid_version = registry.latest_version(mid_dir)
    final_cfg = dataclasses.replace(TINY, batch_size=16, publish_every_steps=5, group_id="final",
                                    student=_student(teacher_dir=str(mid_dir), models_dir=str(tmp_path / "final"),
                                                     checkpoint_dir=str(tmp_path / "final-ckpt")))
    final, _ = _trainer(s, final_cfg, surface, dist_group)
    assert final.teacher.current.kind == "student"
    stats = final.run(idle_exit_s=1.5)
    assert stats.examples == n
    meta = registry.load(tmp_path / "final").meta
    assert (meta["teacher_kind"], meta["teacher_version"]) == ("student", mid_version)
    assert meta["adapter"]["fits"] > 0  # the intermediate's targets went through the adapter

    from opengem.model.student_daemon import StudentModeError

    reads_reps = StudentLearner(dataclasses.replace(registry.load(mid_dir).model.cfg, repr_dim=8), seed=0).model
    registry.publish(tmp_path / "mid-reps", reads_reps, {"surface": surface})
    bad = dataclasses.replace(final_cfg, student=dataclasses.replace(final_cfg.student,
                                                                     teacher_dir=str(tmp_path / "mid-reps")))
    with pytest.raises(StudentModeError, match="reads GEM representations"):
        _trainer(s, bad, surface, dist_group)
    no_gem = dataclasses.replace(final_cfg, student=dataclasses.replace(final_cfg.student, representations=True))
    with pytest.raises(StudentModeError, match="need a GEM teacher"):
        _trainer(s, no_gem, surface, dist_group)
