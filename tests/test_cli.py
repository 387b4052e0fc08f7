"""The `opengem` command as a user runs it: separate processes, real broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

OPENGEM = [sys.executable, "-m", "opengem.cli"]


def _env():
    env = dict(os.environ)
    env.pop("OPENGEM_BOOTSTRAP", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_demo_runs_and_reports_events_flowing(tmp_path):
    r = subprocess.run(OPENGEM + ["demo", "--duration", "6", "--rate", "5000", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"summary: ([\d,]+) events produced, ([\d,]+) consumed back", r.stdout)
    assert m, r.stdout
    produced, consumed = (int(x.replace(",", "")) for x in m.groups())
    assert produced > 5000 and consumed > 0.5 * produced
    for surface in ("feed", "stories", "reels", "messaging"):
        assert surface in r.stdout
    assert "impression" in r.stdout and "click" in r.stdout
    assert re.search(r"ranking server up on 127\.0\.0\.1:\d+ in [\d.]+s", r.stdout), r.stdout[:2000]


def test_broker_then_simulate_in_separate_processes(tmp_path):
    b = subprocess.Popen(OPENGEM + ["broker", "--data-dir", str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "broker.json").exists():
            assert b.poll() is None, b.stdout.read()
            assert time.monotonic() < deadline, "broker did not start"
            time.sleep(0.1)
        r = subprocess.run(OPENGEM + ["simulate", "--events", "20000", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120, env=_env())
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(r"sent 2\d,\d{3} events", r.stdout), r.stdout
    finally:
        b.send_signal(signal.SIGINT)
        b.wait(timeout=20)
    assert b.returncode == 0
    assert not (tmp_path / "broker.json").exists()


def test_simulate_without_kafka_explains_what_to_do(tmp_path):
    r = subprocess.run(OPENGEM + ["simulate", "--events", "10", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 2
    assert "opengem broker" in r.stderr and "--bootstrap" in r.stderr


def test_simulate_to_parquet(tmp_path):
    out = tmp_path / "s.parquet"
    r = subprocess.run(OPENGEM + ["simulate", "--events", "5000", "--parquet", str(out)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    import pyarrow.parquet as pq

    assert pq.read_metadata(out).num_rows >= 5000


def test_replay_reports_broken_rows_and_sends_the_rest(tmp_path, broker):
    from opengem.stream.broker import ensure_topics, high_watermarks

    topic = "opengem.events"
    ensure_topics(broker.bootstrap, [topic], 4)
    before = sum(high_watermarks(broker.bootstrap, topic).values())
    f = tmp_path / "log.csv"
    f.write_text(
        "uid,ad,t,clicked,placement\n"
        "u1,100,1767225600,1,feed\n"
        "u2,101,1767225601,0,reels\n"
        ",102,1767225602,0,feed\n"            # missing user
        "u3,103,yesterday,0,feed\n"           # bad time
        "u4,104,1767225604,0,billboard\n"     # unknown surface
        "u5,105,1767225605,0,stories\n"
    )
    r = subprocess.run(OPENGEM + ["replay", str(f), "--format", "json", "--bootstrap", broker.bootstrap,
                                  "--mapping", "user=uid,item=ad,time=t,time_unit=s,click=clicked,surface=placement"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 bad rows skipped" in r.stdout, r.stdout
    assert "row " in r.stdout and "surface" in r.stdout
    # 3 good rows → 3 impressions + 1 click
    assert "→ 4 events" in r.stdout, r.stdout
    after = sum(high_watermarks(broker.bootstrap, topic).values())
    assert after - before == 4


def test_compact_packs_the_shards_and_reads_stay_the_same(tmp_path):
    """`opengem compact`: the worker's shards shrink (tails merged and packed), every user's
    history reads the same afterwards, and a shard held by a writer is refused with the reason."""
    import numpy as np

    from opengem.features.store import SequenceStore
    from opengem.stream.simulator import SimConfig, Simulator
    from tests.ingest_testing import ingest_json

    events = [e for b in Simulator(SimConfig(seed=3)).batches(6_000, batch_size=2000) for e in b]
    ingest_json(tmp_path, events, partitions=2)
    paths = sorted((tmp_path / "shards" / "opengem.events").glob("p*/store"))
    assert len(paths) == 2

    def snapshot(tag):
        out = {}
        for path in paths:  # a reader in the server's way: a RocksDB secondary
            r = SequenceStore.open_reader(str(path), str(tmp_path / f"secondary-{tag}-{path.parent.name}"))
            try:
                users = r.user_ids()
                out[path.parent.name] = (users, [r.read(int(u), max_len=4096) for u in users])
            finally:
                r.close()
        return out

    before = snapshot("before")
    r = subprocess.run(OPENGEM + ["compact", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"total: ([\d,]+) events in 2 shards, ([\d.]+) bytes/event", r.stdout)
    assert m, r.stdout
    assert int(m.group(1).replace(",", "")) == len(events)
    assert 0 < float(m.group(2)) < 18
    after = snapshot("after")
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k][0], after[k][0])
        assert len(before[k][0]) > 10
        for a, b in zip(before[k][1], after[k][1]):
            for col in ("ts", "item_id", "surface", "kind", "category", "advertiser_id"):
                np.testing.assert_array_equal(getattr(a, col), getattr(b, col), err_msg=col)

    writer = SequenceStore(str(paths[0]))  # a running worker holds its shard's LOCK
    try:
        r = subprocess.run(OPENGEM + ["compact", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                           timeout=120, env=_env())
    finally:
        writer.close()
    assert r.returncode == 2 and "stop the stream worker" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(OPENGEM + ["compact", "--data-dir", str(tmp_path / "none")], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 2 and "no shards" in r.stderr
