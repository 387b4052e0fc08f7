"""The continuous trainer: learner state, checkpoints, cursors, point-in-time reads, the daemon end to end.

Integration tests use the session's embedded broker, real RocksDB shards
written by the worker's ingest code (``prepare_stream``) and, for the crash
tests, the real ``opengem train`` process killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from opengem.model import checkpoint as ckpt
from opengem.model import registry
from opengem.model.batch import synthetic_batch
from opengem.model.source import Cursor, DedupWindow, assign_partitions, cursors_from_state, cursors_to_state
from opengem.model.train_config import TrainConfig
from opengem.model.trainer import OnlineLearner, Trainer, model_config

TINY = TrainConfig(preset="tiny", batch_size=64, fill_timeout_s=0.05, metrics_port=None, report_every_s=60,
                   checkpoint_every_s=0, publish_every_s=0)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPENGEM_BOOTSTRAP", None)
    env.pop("OPENGEM_FAILPOINT", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- units


def test_partitions_are_split_among_ranks_and_too_few_is_an_error():
    assert assign_partitions(4, 0, 2) == [0, 2] and assign_partitions(4, 1, 2) == [1, 3]
    assert assign_partitions(3, 0, 1) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot feed"):
        assign_partitions(1, 0, 2)


def test_dedup_window_forgets_the_oldest_and_cursors_round_trip():
    w = DedupWindow(3, ["a", "b"])
    for i in "cde":
        w.add(i)
    assert "a" not in w and "b" not in w and all(i in w for i in "cde")
    assert w.ids() == ["c", "d", "e"]
    cur = {1: Cursor(10, 3), 0: Cursor(5, 0)}
    state = cursors_to_state(cur)
    assert json.loads(json.dumps(state)) == {"0": [5, 0], "1": [10, 3]}
    assert cursors_from_state(state) == cur


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="start"):
        TrainConfig(start="middle")


def _steps(learner: OnlineLearner, cfg, seeds) -> list[torch.Tensor]:
    out = []
    for s in seeds:
        b = synthetic_batch(cfg, [3, 0, 40, 300, 7, 1], seed=s)
        out.append(learner.step(b, torch.tensor([1.0, 1, 1, 1, 1, 0])))
    return out


def test_resuming_from_a_checkpoint_equals_never_stopping(tmp_path, dist_group):
    cfg = model_config(TINY, ("feed", "stories", "reels", "messaging"))
    a = OnlineLearner("gem", cfg, TINY, dist_group)
    _steps(a, cfg, range(3))
    path = ckpt.save(tmp_path, 3, {"learner": a.state(), "step": 3}, rank=0, world_size=1, keep=2)
    cont = _steps(a, cfg, range(3, 6))

    b = OnlineLearner("gem", cfg, TINY, dist_group, seed=123)  # other initial weights: all must be overwritten
    state, man = ckpt.load(path, rank=0, world_size=1)
    assert man["step"] == 3
    b.load_state(state["learner"])
    resumed = _steps(b, cfg, range(3, 6))
    for x, y in zip(cont, resumed):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # The prediction is made before the update: a batch's own labels never shape its score.
    first = _steps(b, cfg, [99])[0]
    again = OnlineLearner("gem", cfg, TINY, dist_group, seed=123)
    again.load_state(state["learner"])
    _steps(again, cfg, range(3, 6))
    torch.testing.assert_close(again.predict(synthetic_batch(cfg, [3, 0, 40, 300, 7, 1], seed=99)), first)


def test_the_published_model_scores_like_the_trained_one(tmp_path, dist_group):
    cfg = model_config(TINY, ("feed", "stories", "reels", "messaging"))
    learner = OnlineLearner("gem", cfg, TINY, dist_group)
    _steps(learner, cfg, range(4))
    registry.publish(tmp_path, learner.unsharded(), {"step": 4})
    loaded = registry.load(tmp_path)
    b = synthetic_batch(cfg, [5, 0, 200, 17], seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.predict(b), learner.predict(b), rtol=1e-5, atol=1e-6)


def test_checkpoints_are_atomic_and_bound_to_their_world_size(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save(tmp_path, step, {"x": torch.full((3,), float(step))}, rank=0, world_size=1, keep=2)
    assert ckpt.complete(tmp_path) == ["000000000003", "000000000004"]
    # What a crash mid-write leaves: a hidden temporary, never picked as latest.
    (tmp_path / ".tmp-000000000005").mkdir()
    (tmp_path / ".tmp-000000000005" / "rank0000.pt").write_bytes(b"\x00half")
    assert ckpt.latest(tmp_path).name == "000000000004"
    state, _ = ckpt.load(ckpt.latest(tmp_path), rank=0, world_size=1)
    assert state["x"].tolist() == [4.0, 4.0, 4.0]
    assert ckpt.remove_partial(tmp_path) == [".tmp-000000000005"]
    with pytest.raises(ckpt.CheckpointError, match="same --nproc_per_node"):
        ckpt.load(ckpt.latest(tmp_path), rank=0, world_size=2)
    # A file that is not tensors/plain data is refused by weights_only loading.
    (tmp_path / "000000000004" / "rank0000.pt").write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(tmp_path / "000000000004", rank=0, world_size=1)


# --------------------------------------------------------------------------- the daemon, in process


def _count_before(data_dir: Path, topic: str, partitions: int, examples, max_len: int) -> np.ndarray:
    """History lengths read straight from the shards (opened read-only after the trainer stopped)."""
    from opengem.features.sharded import ShardedReader

    with ShardedReader(data_dir, partitions, topic=topic, secondary_root=data_dir / "check") as r:
        seqs = r.read_batch([e.user_id for e in examples], before_ts=[e.ts for e in examples], max_len=max_len)
        full = r.read_batch([e.user_id for e in examples], before_ts=None, max_len=None)
    later = np.zeros(len(examples), np.int64)
    row = np.repeat(np.arange(len(examples)), full.lengths)
    np.add.at(later, row, full.ts >= np.array([e.ts for e in examples])[row])
    return seqs.lengths, later


@pytest.mark.integration
def test_every_example_is_trained_once_from_point_in_time_histories(make_stream, dist_group, monkeypatch):
    from opengem.model import trainer as trainer_mod
    from opengem.stream.broker import high_watermarks

    s = make_stream(n_events=20_000, resend_every=5)
    ids = [e.example_id for e in s.examples]
    assert len(set(ids)) == len(ids) > 300
    built = []  # (examples, batch) of every step

    def spy(examples, reader, cfg):
        b = trainer_mod.examples_batch.__wrapped__(examples, reader, cfg)
        built.append((list(examples), b))
        return b

    spy.__wrapped__ = trainer_mod.examples_batch
    monkeypatch.setattr(trainer_mod, "examples_batch", spy)
    tcfg = dataclasses.replace(TINY, publish_every_steps=7, checkpoint_every_steps=5)
    tr = Trainer(s.cfg, tcfg, s.bootstrap, dist_group, echo=lambda m: None)
    stats = tr.run(idle_exit_s=1.5)
    # Every distinct example exactly once; the re-sent records were recognised.
    assert stats.examples == len(ids)
    assert stats.duplicates > 0
    # Point in time: each example's row holds exactly the user's events strictly before the
    # impression (as many as the store has, up to the model's max_len) -- although the store
    # holds later events for most of these users.
    got: dict[str, int] = {}
    for exs, b in built:
        for e, n in zip(exs, b.seq_lengths.tolist()):
            if e.request_id:  # padding rows have no id
                got.setdefault(e.example_id, n)
    assert sorted(got) == sorted(ids)
    expect, later = _count_before(Path(s.cfg.data_dir), s.cfg.kafka.events_topic, 2, s.examples,
                                  tr.model_cfg.pyramid.max_len)
    assert [got[e.example_id] for e in s.examples] == expect.tolist()
    assert (later > 0).mean() > 0.5
    # The last version and checkpoint cover the whole topic.
    hw = high_watermarks(s.bootstrap, s.cfg.kafka.examples_topic)
    loaded = registry.load(Path(s.cfg.data_dir) / "models")
    assert loaded.meta["cursors"] == {str(p): [hw[p], 0] for p in sorted(hw)}
    assert loaded.meta["progressive"]["click"]["n"] == len(ids)
    state, _ = ckpt.load(ckpt.latest(Path(s.cfg.data_dir) / "train" / "checkpoints"), rank=0, world_size=1)
    assert cursors_from_state(state["cursors"]) == {p: Cursor(hw[p], 0) for p in hw}


def _record_rows(tr: Trainer) -> list[tuple[str, float]]:
    """(example id, loss weight) of every real row the trainer's learner steps on."""
    rows: list[tuple[str, float]] = []
    items: list = []
    train, step = tr._train, tr.learner.step

    def _train(unit, t0):
        items[:] = unit.items
        return train(unit, t0)

    def _step(batch, weight):
        assert weight[len(items):].eq(0).all()  # padding rows weigh nothing
        rows.extend((it.example.example_id, w) for it, w in zip(items, weight.tolist()))
        return step(batch, weight)

    tr._train, tr.learner.step = _train, _step
    return rows


@pytest.mark.integration
def test_downsampling_trains_every_positive_and_replays_the_same_negatives(make_stream, dist_group):
    from opengem.model.sampling import hash_unit

    s = make_stream(n_events=10_000)
    r, seed = 0.2, 5
    positive = {e.example_id for e in s.examples if e.click or e.conversion}
    negative = {e.example_id for e in s.examples} - positive
    expected = positive | {i for i in negative if hash_unit(i, seed) < r}
    assert len(positive) > 20 and len(expected) < 0.5 * len(s.examples)
    tcfg = dataclasses.replace(TINY, batch_size=32, negative_rate=r, sample_seed=seed, checkpoint_every_steps=3)

    # A run that "crashes" (no final checkpoint) half-way, then a restart from its last checkpoint.
    first = Trainer(s.cfg, tcfg, s.bootstrap, dist_group, echo=lambda m: None)
    first._finish = lambda: None
    rows1 = _record_rows(first)
    first.run(max_examples=len(expected) // 2)
    second = Trainer(s.cfg, tcfg, s.bootstrap, dist_group, echo=lambda m: None)
    rows2 = _record_rows(second)
    stats = second.run(idle_exit_s=1.5)

    ids1, ids2 = [i for i, _ in rows1], [i for i, _ in rows2]
    assert len(set(ids1)) == len(ids1) and len(set(ids2)) == len(ids2)
    assert set(ids1) & set(ids2)  # the stretch after the checkpoint was trained again ...
    assert set(ids1) | set(ids2) == expected  # ... with the same negatives: every positive, nothing else
    assert stats.sampled_out > 0
    for i, w in rows1 + rows2:
        assert w == pytest.approx(1.0 if i in positive else 1 / r)
    # Progressive validation weighs the rows as training does: the window stands for the full stream.
    window = second.window.summary()[("all", "click")]
    assert window["n"] == len(rows2)
    assert window["weight"] == pytest.approx(sum(w for _, w in rows2), rel=1e-6)


# --------------------------------------------------------------------------- the daemon as a process


def write_config(s, path: Path, **train) -> Path:
    """A TOML config naming the test's topics and a small, fast trainer."""
    k = s.cfg.kafka
    t = {"preset": "tiny", "batch_size": 16, "fill_timeout_s": 0.05, "checkpoint_every_s": 0,
         "checkpoint_every_steps": 8, "publish_every_s": 0, "publish_every_steps": 5, "report_every_s": 1.0, **train}
    lines = [f'data_dir = "{s.cfg.data_dir}"', "[kafka]", f'events_topic = "{k.events_topic}"',
             f'examples_topic = "{k.examples_topic}"', f'dlq_topic = "{k.dlq_topic}"',
             f"partitions = {k.partitions}", "[train]"]
    lines += [f"{key} = {json.dumps(v)}" for key, v in t.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_trainer(s, conf: Path, log: Path, *extra: str, failpoint: str | None = None,
                  launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    env = _env()
    if failpoint:
        env["OPENGEM_FAILPOINT"] = failpoint
    cmd = [*(launcher or (sys.executable,)), "-m", "opengem.cli", "train", "--config", str(conf),
           "--bootstrap", s.bootstrap, "--metrics-port", "-1", *extra]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def wait_exit(p: subprocess.Popen, log: Path, timeout: float = 120) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"trainer did not exit; log:\n{log.read_text()[-3000:]}") from None


def trained_total(log_text: str) -> int:
    import re

    found = re.findall(r"trainer stopped: [\d,]+ steps, ([\d,]+) examples", log_text)
    assert found, log_text[-3000:]
    return int(found[-1].replace(",", ""))


def test_the_read_thread_changes_nothing_the_model_sees(make_stream, dist_group, tmp_path):
    """Reading batch k+1 while batch k trains: the same batches in the same order, the same
    predictions bit for bit, and the checkpoints' cursors cover exactly the trained examples."""
    s = make_stream(n_events=8_000)
    runs = {}
    for prefetch in (True, False):
        tag = "thread" if prefetch else "inline"
        tcfg = dataclasses.replace(TINY, batch_size=32, checkpoint_every_steps=3, report_every_s=0.2,
                                   checkpoint_dir=str(tmp_path / f"ckpt-{tag}"), group_id=f"t-{tag}")
        tr = Trainer(s.cfg, tcfg, s.bootstrap, dist_group, echo=lambda m: None, prefetch=prefetch)
        rows = _record_rows(tr)
        probs: list[torch.Tensor] = []
        step = tr.learner.step
        tr.learner.step = lambda b, w: probs.append(step(b, w)) or probs[-1]
        saved: list[tuple[int, dict]] = []
        save = tr.checkpoint

        def checkpoint(save=save, saved=saved, tr=tr):
            saved.append((tr.stats.examples, dict(tr.source.cursors)))
            return save()

        tr.checkpoint = checkpoint
        stats = tr.run(max_examples=len(s.examples) - 40)
        runs[tag] = (rows, torch.cat(probs), saved, stats.examples)
    (rows_t, p_t, saved_t, n_t), (rows_i, p_i, saved_i, n_i) = runs["thread"], runs["inline"]
    assert rows_t == rows_i and len(rows_t) == n_t == n_i
    torch.testing.assert_close(p_t, p_i, rtol=0, atol=0)
    assert len(saved_t) > 3 and saved_t == saved_i  # each checkpoint: the same examples, the same cursors


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_while_training_and_while_checkpointing_loses_and_repeats_nothing(make_stream, tmp_path):
    from opengem.stream.broker import high_watermarks

    s = make_stream(n_events=20_000)
    conf = write_config(s, tmp_path / "train.toml")
    data = Path(s.cfg.data_dir)
    ckdir, models = data / "train" / "checkpoints", data / "models"
    log = tmp_path / "train.log"

    # 1. SIGKILL in the middle of training.
    p = start_trainer(s, conf, log)
    deadline = time.monotonic() + 90
    while True:
        last = ckpt.latest(ckdir)
        if last is not None and int(last.name) >= 16:
            break
        assert p.poll() is None, f"trainer exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    assert p.poll() is None, "the trainer finished before it could be killed: give it more examples"
    p.send_signal(signal.SIGKILL)
    p.wait()
    survived = ckpt.latest(ckdir).name

    # 2. SIGKILL with half of a rank file written (the second checkpoint of this run).
    p = start_trainer(s, conf, log, failpoint="checkpoint.rank_file:2")
    assert wait_exit(p, log) == -signal.SIGKILL
    partial = [d for d in ckdir.iterdir() if d.name.startswith(".tmp-")]
    assert partial and any(f.suffix == ".part" for d in partial for f in d.iterdir())
    after_2 = ckpt.latest(ckdir).name
    assert int(after_2) > int(survived)  # its first checkpoint completed

    # 3. SIGKILL with every file written and synced, before the rename that publishes it.
    p = start_trainer(s, conf, log, failpoint="checkpoint.before_rename")
    assert wait_exit(p, log) == -signal.SIGKILL
    assert ckpt.latest(ckdir).name == after_2
    assert any((d / "manifest.json").exists() for d in ckdir.iterdir() if d.name.startswith(".tmp-"))

    # 4. Run to the end of the topic.
    p = start_trainer(s, conf, log, "--idle-exit", "2")
    assert wait_exit(p, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"resumed from checkpoint {survived}" in text
    assert f"resumed from checkpoint {after_2}" in text
    assert "removed half-written checkpoint" in text
    # Each restart resumed exactly at its checkpoint's cursors: the final count (restored
    # from the checkpoint, plus what came after its cursors) is the number of examples.
    assert trained_total(text) == len(s.examples)
    hw = high_watermarks(s.bootstrap, s.cfg.kafka.examples_topic)
    versions = registry.list_versions(models)
    assert versions
    for v in versions:  # every version that ever became visible is whole
        registry.load(models, v)
    assert registry.load(models).meta["cursors"] == {str(p_): [hw[p_], 0] for p_ in sorted(hw)}
    assert not [d for d in ckdir.iterdir() if d.name.startswith(".tmp-")]


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.mark.integration
def test_two_processes_shard_the_tables_and_split_the_partitions(make_stream, tmp_path):
    """torchrun, 2 ranks, gloo: DMP shards every table across the ranks, each rank trains its own
    example partitions, the published model is the whole one and loads in a single process."""
    from opengem.stream.broker import high_watermarks

    s = make_stream(n_events=12_000, partitions=2)
    conf = write_config(s, tmp_path / "train.toml", checkpoint_every_steps=0, publish_every_steps=0,
                        publish_every_s=30, checkpoint_every_s=30)
    log = tmp_path / "torchrun.log"
    p = start_trainer(s, conf, log, "--idle-exit", "2", launcher=TORCHRUN)
    assert wait_exit(p, log, timeout=240) == 0, log.read_text()[-4000:]
    import re

    text = log.read_text()
    per_rank = [int(n.replace(",", "")) for n in re.findall(r"trainer stopped: [\d,]+ steps, ([\d,]+) examples", text)]
    assert len(per_rank) == 2 and all(n > 0 for n in per_rank), text[-3000:]
    assert sum(per_rank) == len(s.examples)

    data = Path(s.cfg.data_dir)
    last = ckpt.latest(data / "train" / "checkpoints")
    assert ckpt.manifest(last)["world_size"] == 2
    shards = []
    for r in (0, 1):
        state, _ = ckpt.load(last, rank=r, world_size=2)
        shards.append(state["learner"]["model"]["sparse.ec.embeddings.item.weight"]["local_shards"])
        assert set(state["cursors"]) == {str(r)}  # rank r owns partition r
    rows = [sum(sh["tensor"].shape[0] for sh in s_) for s_ in shards]
    full_rows = TINY_ROWS["item"]
    assert sum(rows) == full_rows and all(0 < n < full_rows for n in rows)  # really sharded

    hw = high_watermarks(s.bootstrap, s.cfg.kafka.examples_topic)
    loaded = registry.load(data / "models")
    assert loaded.meta["world_size"] == 2
    assert loaded.meta["cursors"] == {str(p_): [hw[p_], 0] for p_ in sorted(hw)}
    assert loaded.meta["progressive"]["click"]["n"] == len(s.examples)  # rank 0 saw both ranks' predictions
    assert loaded.model.sparse.ec.embeddings["item"].weight.shape[0] == full_rows


TINY_ROWS = {"item": model_config(TINY, ("feed",)).features.item_rows}
