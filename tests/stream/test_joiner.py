"""Tests of the online label joiner (opengem.stream.joiner), on a real RocksDB."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections import defaultdict

import pytest

from opengem.stream.events import Event
from opengem.stream.joiner import COUNTERS, Example, JoinerConfig, LabelJoiner

T0 = 1_767_225_600_000
# Small windows: click 1 s, conversion 5 s after the click, lateness 100 ms.
CFG = JoinerConfig(click_window_ms=1000, conversion_window_ms=5000, allowed_lateness_ms=100, sync=False)


def imp(rid, t, user=1, **kw):
    return Event(event_id=f"i-{rid}-{t}", user_id=user, ts=T0 + t, surface="feed", kind="impression",
                 item_id=1_000_000_007, is_ad=True, request_id=rid, age_bucket=2, country="US",
                 device="ios", ad_format="video", advertiser_id=3, category=4, hour=5,
                 p_click=0.1, p_conversion=0.01, **kw)


def ad(kind, rid, t, user=1):
    return Event(event_id=f"{kind[:2]}-{rid}-{t}", user_id=user, ts=T0 + t, surface="feed", kind=kind,
                 item_id=1_000_000_007, is_ad=True, request_id=rid)


def click(rid, t, user=1):
    return ad("click", rid, t, user)


def conv(rid, t, user=1):
    return ad("conversion", rid, t, user)


def org(t, user=1):
    return Event(event_id=f"o-{t}", user_id=user, ts=T0 + t, surface="feed", kind="view", item_id=5, is_ad=False)


@pytest.fixture
def joiner(tmp_path):
    j = LabelJoiner(tmp_path / "j", CFG)
    yield j
    j.close()


def run(j, events, p=0):
    """Each event as its own record; returns all examples emitted."""
    out = []
    for e in events:
        off = j.applied_offset(p)
        out += j.process(p, 0 if off is None else off + 1, [e])
    return out


def by_id(examples):
    return {e.example_id: e for e in examples}


def nonzero(c):
    return {k: v for k, v in c.items() if v}


# ---------------------------------------------------------------- the join rules


def test_click_inside_window_then_conversion_window_closes(joiner):
    out = run(joiner, [imp("a", 0), click("a", 900), org(900 + 5000 + 99)])
    assert out == [] and joiner.pending() == 1  # watermark = 5899 < deadline 5900
    out = run(joiner, [org(6000)])  # watermark 5900 >= deadline
    (ex,) = out
    assert (ex.click, ex.conversion, ex.click_ts, ex.conversion_ts) == (1, 0, T0 + 900, None)
    assert (ex.ts, ex.surface, ex.user_id, ex.item_id, ex.advertiser_id, ex.ad_format, ex.category) == (
        T0, "feed", 1, 1_000_000_007, 3, "video", 4)
    assert (ex.age_bucket, ex.country, ex.device, ex.hour, ex.p_click, ex.p_conversion) == (2, "US", "ios", 5, 0.1, 0.01)
    assert nonzero(joiner.counters()) == {"impressions": 1, "examples": 1, "clicks": 1}
    assert joiner.pending() == 0


def test_click_outside_window(joiner):
    out = run(joiner, [imp("a", 0), click("a", 1001), org(2000)])
    (ex,) = out
    assert (ex.click, ex.click_ts, ex.conversion) == (0, None, 0)
    assert nonzero(joiner.counters()) == {"impressions": 1, "examples": 1, "click_outside_window": 1}


def test_unclicked_impression_closes_at_click_deadline(joiner):
    assert run(joiner, [imp("a", 0), org(1099)]) == []
    (ex,) = run(joiner, [org(1100)])
    assert ex.click == 0 and ex.conversion == 0


def test_conversion_inside_window_closes_at_once(joiner):
    (ex,) = run(joiner, [imp("a", 0), click("a", 500), conv("a", 5500)])
    assert (ex.click, ex.conversion, ex.conversion_ts) == (1, 1, T0 + 5500)
    assert nonzero(joiner.counters()) == {"impressions": 1, "examples": 1, "clicks": 1, "conversions": 1}


def test_conversion_outside_window(joiner):
    out = run(joiner, [imp("a", 0), click("a", 500), conv("a", 5501), org(9000)])
    (ex,) = out
    assert (ex.click, ex.conversion) == (1, 0)
    assert joiner.counters()["conversion_outside_window"] == 1
    assert joiner.counters()["conversions"] == 0


def test_conversion_without_click_is_unattributed(joiner):
    (ex,) = run(joiner, [imp("a", 0), conv("a", 300), org(2000)])
    assert (ex.click, ex.conversion) == (0, 0)
    assert nonzero(joiner.counters()) == {"impressions": 1, "examples": 1, "unattributed_conversion": 1}


def test_duplicate_click_counts_once(joiner):
    (ex,) = run(joiner, [imp("a", 0), click("a", 100), click("a", 200), org(10_000)])
    assert ex.click_ts == T0 + 100
    c = joiner.counters()
    assert c["clicks"] == 1 and c["duplicate_click"] == 1


def test_duplicate_impression(joiner):
    run(joiner, [imp("a", 0), imp("a", 10), org(2000), imp("a", 2000)])
    c = joiner.counters()
    assert c["impressions"] == 1 and c["examples"] == 1 and c["duplicate_impression"] == 2


def test_late_click_and_conversion_after_close(joiner):
    (ex,) = run(joiner, [imp("a", 0), org(1100)])
    assert ex.click == 0
    # Arrive after the example was emitted (ts within the window, but too late for the watermark).
    assert run(joiner, [click("a", 500), conv("a", 600), click("a", 700), click("c", 900)]) == []
    c = joiner.counters()
    assert c["late_click"] == 1 and c["late_conversion"] == 1 and c["duplicate_click"] == 1
    assert c["orphan_click"] == 1 and c["examples"] == 1
    # A clicked example: a late second click is a duplicate, a late conversion is late.
    run(joiner, [imp("b", 2000), click("b", 2100), org(7200)])
    run(joiner, [click("b", 2200), conv("b", 7000), conv("b", 7001)])
    c = joiner.counters()
    assert c["duplicate_click"] == 2 and c["late_conversion"] == 2 and c["duplicate_conversion"] == 1
    # Late but outside the windows: counted as such, not as late.
    run(joiner, [imp("d", 8000), click("d", 8100), org(13_300), imp("e", 8000)])
    run(joiner, [conv("d", 13_101), click("e", 9001)])
    c = joiner.counters()
    assert c["conversion_outside_window"] == 1 and c["click_outside_window"] == 1
    assert c["late_conversion"] == 2 and c["late_click"] == 1


def test_late_conversion_without_any_click_is_unattributed(joiner):
    run(joiner, [imp("a", 0), org(1100), conv("a", 900)])
    assert joiner.counters()["unattributed_conversion"] == 1
    assert joiner.counters()["late_conversion"] == 0


def test_orphans(joiner):
    assert run(joiner, [click("x", 0), conv("y", 10)]) == []
    assert joiner.counters()["orphan_click"] == 0  # could still be early (watermark -100)
    run(joiner, [org(110)])
    c = joiner.counters()
    assert c["orphan_click"] == 1 and c["orphan_conversion"] == 1 and c["impressions"] == 0
    # An event already below the watermark with no impression is an orphan at once.
    run(joiner, [click("z", 5)])
    assert joiner.counters()["orphan_click"] == 2


def test_out_of_order_within_lateness(joiner):
    # The click arrives before its impression; the impression is itself 80 ms behind max ts.
    run(joiner, [org(1000), click("a", 1050), imp("a", 920), conv("a", 1060)])
    (ex,) = joiner.outbox()
    assert (ex.click, ex.conversion, ex.ts, ex.click_ts) == (1, 1, T0 + 920, T0 + 1050)
    # Conversion before its click in arrival order, both within lateness.
    out = run(joiner, [imp("b", 2000), conv("b", 2300), click("b", 2200)])
    (ex,) = out
    assert (ex.click, ex.conversion, ex.conversion_ts) == (1, 1, T0 + 2300)
    assert joiner.counters()["unattributed_conversion"] == 0
    assert joiner.counters()["orphan_click"] == 0


def test_impression_older_than_watermark_closes_immediately(joiner):
    run(joiner, [org(5000)])
    (ex,) = run(joiner, [imp("a", 1000)])  # deadline 2000 <= watermark 4900
    assert ex.click == 0 and joiner.pending() == 0


def test_watermark_is_per_partition(joiner):
    run(joiner, [imp("a", 0)], p=0)
    run(joiner, [org(100_000)], p=1)
    assert joiner.pending(0) == 1 and joiner.outbox() == []
    assert joiner.watermark(1) == T0 + 100_000 - 100
    run(joiner, [org(100_000)], p=0)
    assert [e.example_id for e in joiner.outbox(0)] == ["a"]
    assert joiner.counters(0)["examples"] == 1 and joiner.counters(1)["examples"] == 0


def test_tombstones_are_garbage_collected(tmp_path):
    cfg = JoinerConfig(click_window_ms=1000, conversion_window_ms=1000, allowed_lateness_ms=0,
                       tombstone_retention_ms=10_000, gc_interval_ms=1000, sync=False)
    with LabelJoiner(tmp_path / "j", cfg) as j:
        run(j, [imp("a", 0), org(1000), click("a", 500)])
        assert j.counters()["late_click"] == 1
        run(j, [org(20_000), click("a", 500)])  # tombstone gone: an orphan now
        c = j.counters()
        assert c["late_click"] == 1 and c["orphan_click"] == 1
        assert not any(True for k in j._db.keys() if k.startswith((b"T/", b"X/")))


def test_batching_does_not_change_results(tmp_path):
    evs = [imp("a", 0), click("b", 50), imp("b", 10), click("a", 300), org(1500), imp("c", 1500),
           conv("a", 4000), conv("c", 1600), click("c", 1700), org(9000), click("a", 400)]
    results = []
    for k, size in enumerate((1, 2, 3, len(evs))):
        with LabelJoiner(tmp_path / str(k), CFG) as j:
            for i in range(0, len(evs), size):
                j.process(0, i, evs[i:i + size])
            results.append((sorted(e.to_json() for e in j.outbox()), j.counters()))
    assert all(r == results[0] for r in results)


# ---------------------------------------------------------------- outbox, offsets, restarts


def test_outbox_and_ack(joiner):
    run(joiner, [imp("a", 0), imp("b", 1), org(5000)])
    assert sorted(e.example_id for e in joiner.outbox()) == ["a", "b"]
    joiner.ack(["a", "nope"])
    assert [e.example_id for e in joiner.outbox()] == ["b"]


def _keys(path, prefix):
    from rocksdict import AccessType, Options, Rdict

    db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        return [k for k in db.keys() if k.startswith(prefix)]
    finally:
        db.close()


def test_outbox_boxes_partial_ack_and_reopen(tmp_path):
    """The outbox is one box per process() call: a partial ack rewrites the box with the rest,
    a full ack deletes it; after a reopen the outbox is exactly the unacked examples, in close order."""
    path = tmp_path / "j"
    with LabelJoiner(path, CFG) as j:
        j.process(0, 0, [imp("a", 0), imp("b", 1), imp("c", 2)])
        first = j.process(0, 1, [org(5000)])  # closes a, b, c: one box
        j.process(0, 2, [imp("d", 6000), imp("e", 6001)])
        second = j.process(0, 3, [org(9000)])  # closes d, e: a second box
        assert [e.example_id for e in first] == ["a", "b", "c"] and [e.example_id for e in second] == ["d", "e"]
        assert j.ack(["b", "d", "e", "nope", "b"]) == {"b", "d", "e"}
        want = [e for e in first if e.example_id != "b"]
        assert j.outbox() == want
    assert len(_keys(path, b"B/")) == 1  # the second box is gone, the first holds a and c
    with LabelJoiner(path, CFG) as j:
        assert j.outbox() == want
        assert j.ack(["c", "a"]) == {"a", "c"} and j.outbox() == []
        assert j.process(0, 4, [imp("f", 9000), org(12000)])[0].example_id == "f"
    assert len(_keys(path, b"B/")) == 1 and _keys(path, b"O/") == []
    with LabelJoiner(path, CFG) as j:
        assert [e.example_id for e in j.outbox()] == ["f"]
        j.ack(["f"])
    assert _keys(path, b"B/") == []


def test_outbox_of_format_2_is_read_and_acked(tmp_path):
    """Format 2 kept one O/ key per example: such entries load, ack and stay apart from the boxes."""
    from rocksdict import Options, Rdict

    from opengem.stream import joiner as J

    path = tmp_path / "j"
    with LabelJoiner(path, CFG) as j:  # a format-2 store: its outbox entries moved to O/ keys
        run(j, [imp("x", 0), imp("y", 1), org(5000)])
        exs = by_id(j.outbox())
    db = Rdict(str(path), Options(raw_mode=True))
    for k, v in list(db.items()):
        if k.startswith(b"B/0/"):
            for rid, value, _ in J._decode_box(v):
                db.put(b"O/0/" + rid.encode(), value)
            db.delete(k)
    db.put(b"M", b'{"format":2}')
    db.close()
    with LabelJoiner(path, CFG) as j:
        assert by_id(j.outbox()) == exs
        j.ack(["x"])
        run(j, [imp("z", 6000), org(9000)])
        assert [e.example_id for e in j.outbox()] == ["y", "z"]
    assert _keys(path, b"O/") == [b"O/0/y"] and len(_keys(path, b"B/")) == 1
    with LabelJoiner(path, CFG) as j:
        assert [e.example_id for e in j.outbox()] == ["y", "z"]
        j.ack(["y", "z"])
    assert _keys(path, b"O/") == [] and _keys(path, b"B/") == []


class _FailingWrite:
    """The joiner's Rdict, except that write() fails (a full disk)."""

    def __init__(self, db):
        self._real = db

    def write(self, *a, **kw):
        raise OSError("disk full")

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_failed_ack_leaves_the_outbox(tmp_path):
    """An ack whose write fails changes nothing, in memory or on disk; the next one works."""
    with LabelJoiner(tmp_path / "j", CFG) as j:
        run(j, [imp("a", 0), imp("b", 1), org(5000)])
        real = j._db
        j._db = _FailingWrite(real)
        try:
            with pytest.raises(OSError):
                j.ack(["a"])
        finally:
            j._db = real
        assert sorted(e.example_id for e in j.outbox()) == ["a", "b"]
        assert j.ack(["a"]) == {"a"} and [e.example_id for e in j.outbox()] == ["b"]
    with LabelJoiner(tmp_path / "j", CFG) as j:
        assert [e.example_id for e in j.outbox()] == ["b"]


def test_example_json_round_trip():
    ex = Example(request_id="r", ts=T0, surface="feed", user_id=1, item_id=2, advertiser_id=None,
                 ad_format="image", category=None, age_bucket=0, country="US", device=None, hour=3,
                 click=1, conversion=0, click_ts=T0 + 5, conversion_ts=None, p_click=0.25)
    assert Example.from_json(ex.to_json()) == ex and ex.example_id == "r"
    with pytest.raises(ValueError):
        Example.from_json(b'{"request_id": "r", "bogus": 1}')


def test_replay_of_applied_offsets_is_a_noop(tmp_path):
    evs = [[imp("a", 0), click("a", 10)], [imp("b", 100)], [org(6000)], [conv("b", 6100)]]
    with LabelJoiner(tmp_path / "j", CFG) as j:
        for off, b in enumerate(evs):
            j.process(3, off + 10, b)
        before = (j.counters(), sorted(e.to_json() for e in j.outbox()), j.pending())
        assert j.applied_offset(3) == 13
        for off, b in enumerate(evs):
            assert j.process(3, off + 10, b) == []
        assert (j.counters(), sorted(e.to_json() for e in j.outbox()), j.pending()) == before
    with LabelJoiner(tmp_path / "j", CFG) as j:
        assert j.applied_offset(3) == 13 and j.applied_offset(0) is None
        for off, b in enumerate(evs):
            assert j.process(3, off + 10, b) == []
        assert (j.counters(), sorted(e.to_json() for e in j.outbox()), j.pending()) == before


def test_failed_process_leaves_no_partial_state(joiner):
    run(joiner, [imp("a", 0)])
    before = (joiner.counters(), joiner.pending(), joiner.applied_offset(0))
    with pytest.raises(AttributeError):
        joiner.process(0, 5, [imp("b", 10), click("a", 20), "not an event"])
    assert (joiner.counters(), joiner.pending(), joiner.applied_offset(0)) == before
    assert joiner.process(0, 5, [imp("b", 10), click("a", 20)]) == []
    assert joiner.counters()["clicks"] == 1 and joiner.pending() == 2


def _sim_events(n, seed=3):
    from opengem.stream.simulator import SimConfig, Simulator

    return list(Simulator(SimConfig(seed=seed, delayed_conversions_strength=2.0)).events(n))


SIM_CFG = JoinerConfig(click_window_ms=60_000, conversion_window_ms=300_000, allowed_lateness_ms=1000,
                       tombstone_retention_ms=600_000, gc_interval_ms=10_000, sync=False)


def _records(events, n_parts=2, size=500):
    """(partition, offset, events) records: partition by user, like the Kafka key."""
    per = defaultdict(list)
    for e in events:
        per[e.user_id % n_parts].append(e)
    recs = []
    for p, evs in per.items():
        recs += [(p, i // size, evs[i:i + size]) for i in range(0, len(evs), size)]
    recs.sort(key=lambda r: (r[1], r[0]))  # interleave the partitions
    return recs


def _run_all(path, recs):
    with LabelJoiner(path, SIM_CFG) as j:
        for p, off, evs in recs:
            j.process(p, off, evs)
        return by_id(j.outbox()), j.counters(), j.pending(), _buffered(j)


def _buffered(j):
    """Clicks / conversions the joiner holds but has not counted yet (early buffer, held conversions)."""
    n = defaultdict(int)
    for part in j._parts.values():
        for lst in part.early.values():
            for kind, _ in lst:
                n[kind] += 1
        n["conversion"] += sum(rec.held_conv is not None for rec in part.open.values())
    return n


@pytest.fixture(scope="module")
def sim_events():
    return _sim_events(200_000)


@pytest.fixture(scope="module")
def sim_reference(sim_events, tmp_path_factory):
    return _run_all(tmp_path_factory.mktemp("ref") / "j", _records(sim_events))


def test_restart_after_drop_equals_uninterrupted_run(sim_events, sim_reference, tmp_path):
    recs = _records(sim_events)
    half = len(recs) // 2
    j = LabelJoiner(tmp_path / "j", SIM_CFG)
    produced = {}
    for p, off, evs in recs[:half]:
        j.process(p, off, evs)
        if off % 3 == 0:  # the producer acked some, not all, before the "crash"
            ids = [e.example_id for e in j.outbox()]
            produced.update(by_id(j.outbox()))
            j.ack(ids)
    del j  # no close(): the object is simply dropped
    gc.collect()
    j = LabelJoiner(tmp_path / "j", SIM_CFG)
    # The worker resumes somewhat before the applied offsets (uncommitted consumer offsets).
    for p, off, evs in recs[max(0, half - 7):]:
        j.process(p, off, evs)
    produced.update(by_id(j.outbox()))
    ref_examples, ref_counters, ref_pending, _ = sim_reference
    assert produced == ref_examples
    assert j.counters() == ref_counters and j.pending() == ref_pending
    j.close()


def test_restart_after_kill_9(sim_events, sim_reference, tmp_path):
    """A child process applies half the records with sync writes and dies by os._exit."""
    recs = _records(sim_events[:60_000], size=200)
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        import test_joiner as t
        from opengem.stream.joiner import LabelJoiner, JoinerConfig
        import dataclasses
        recs = t._records(t._sim_events(60_000), size=200)
        j = LabelJoiner({str(tmp_path / 'j')!r}, dataclasses.replace(t.SIM_CFG, sync=True))
        for p, off, evs in recs[:len(recs) // 2]:
            j.process(p, off, evs)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with LabelJoiner(tmp_path / "j", SIM_CFG) as j:
        assert j.applied_offset(0) is not None
        for p, off, evs in recs:
            j.process(p, off, evs)
        got = (by_id(j.outbox()), j.counters(), j.pending(), _buffered(j))
    assert got == _run_all(tmp_path / "ref", recs)


def test_simulator_labels_match_ground_truth(sim_events, sim_reference):
    examples, counters, pending, buffered = sim_reference
    cw, vw = SIM_CFG.click_window_ms, SIM_CFG.conversion_window_ms
    imps, clicks, convs = {}, {}, {}
    n_outside = 0
    for e in sim_events:
        if e.kind == "impression":
            imps[e.request_id] = e
        elif e.kind == "click":
            assert e.request_id not in clicks
            clicks[e.request_id] = e.ts
        elif e.kind == "conversion":
            assert e.request_id not in convs
            convs[e.request_id] = e.ts
    truth = {}
    for rid, e in imps.items():
        c = clicks.get(rid)
        clicked = c is not None and c - e.ts <= cw
        n_outside += c is not None and not clicked
        v = convs.get(rid)
        truth[rid] = (int(clicked), int(clicked and v is not None and c <= v <= c + vw))
    assert len(examples) > 20_000
    assert sum(ex.click for ex in examples.values()) > 500
    assert sum(ex.conversion for ex in examples.values()) > 30
    bad = [(rid, (ex.click, ex.conversion), truth[rid]) for rid, ex in examples.items()
           if (ex.click, ex.conversion) != truth[rid]]
    assert not bad[:5]
    for rid, ex in examples.items():
        e = imps[rid]
        assert (ex.ts, ex.user_id, ex.item_id, ex.p_click, ex.p_conversion) == (e.ts, e.user_id, e.item_id, e.p_click, e.p_conversion)
        assert ex.click_ts == (clicks[rid] if ex.click else None)
        assert ex.conversion_ts == (convs[rid] if ex.conversion else None)
    assert counters["impressions"] == len(imps) == counters["examples"] + pending
    assert counters["examples"] == len(examples)
    assert counters["clicks"] == sum(ex.click for ex in examples.values()) + sum(
        1 for rid in imps if rid not in examples and truth[rid][0])
    # Every click outside the window was seen before its impression closed (the stream is ts-ordered).
    assert counters["click_outside_window"] == n_outside
    # The stream is ts-ordered: nothing is late, nothing is duplicated.
    for k in ("late_click", "late_conversion", "orphan_click", "duplicate_impression", "duplicate_click",
              "duplicate_conversion"):
        assert counters[k] == 0, k
    # Every click and conversion event is accounted for exactly once. (Conversions more than the
    # tombstone retention after their impression closed are orphans: the simulator's delays
    # reach a day, the retention here is 10 min.)
    assert counters["clicks"] + counters["click_outside_window"] + buffered["click"] == len(clicks)
    assert (counters["conversions"] + counters["conversion_outside_window"] + counters["unattributed_conversion"]
            + counters["orphan_conversion"] + buffered["conversion"]) == len(convs)
    assert counters["orphan_conversion"] > 0 and counters["conversion_outside_window"] > 0
    assert set(counters) == set(COUNTERS)


# ---------------------------------------------------------------- formats and inputs


def test_example_to_json_is_exactly_json_dumps():
    import json

    cases = [
        dict(request_id="r", ts=T0, surface="feed", user_id=1, item_id=2, advertiser_id=None, ad_format="image",
             category=None, age_bucket=0, country="US", device=None, hour=3, click=1, conversion=0,
             click_ts=T0 + 5, conversion_ts=None, p_click=0.25),
        # non-ASCII and quotes are escaped as json does; tiny / huge floats keep json's repr
        dict(request_id='é"\\\n☃' * 3, ts=0, surface="stories", user_id=2**63 - 1, item_id=0, advertiser_id=7,
             ad_format=None, category=2**31 - 1, age_bucket=None, country=None, device="web", hour=None,
             click=0, conversion=1, click_ts=None, conversion_ts=-5, p_click=1e-300, p_conversion=0.1 + 0.2),
        # values json writes differently from str(): a bool, a numpy-free int subclass (slow path)
        dict(request_id="b", ts=T0, surface="feed", user_id=1, item_id=2, advertiser_id=None, ad_format=None,
             category=None, age_bucket=None, country=None, device=None, hour=None, click=True, conversion=False,
             click_ts=None, conversion_ts=None),
    ]
    for d in cases:
        ex = Example(**d)
        assert ex.to_json() == json.dumps(ex.to_dict(), separators=(",", ":")).encode()
        assert Example.from_json(ex.to_json()).to_dict() == json.loads(json.dumps(ex.to_dict()))
    with pytest.raises(ValueError):  # NaN is not JSON, as before
        Example(**{**cases[0], "p_click": float("nan")}).to_json()


def test_example_arrow_records_round_trip(sim_reference):
    """Arrow IPC example records (the worker's default) decode to the very examples; records stay
    under max_bytes; JSON records still decode; values Arrow refuses fall back to JSON."""
    import dataclasses

    from opengem.stream.joiner import decode_examples, encode_example_batches, encode_example_records

    ref = list(sim_reference[0].values())
    odd = [Example(request_id='é"\\\n☃' * 3, ts=0, surface="stories", user_id=2**63 - 1, item_id=0, advertiser_id=7,
                   ad_format=None, category=2**31 - 1, age_bucket=None, country=None, device="web", hour=None,
                   click=0, conversion=1, click_ts=None, conversion_ts=-5, p_click=1e-300, p_conversion=None)]
    exs = odd + ref
    assert len(ref) > 1000
    recs = encode_example_batches(exs, max_bytes=64 << 10)
    assert len(recs) > 1 and all(r[:4] == b"\xff\xff\xff\xff" and len(r) <= 64 << 10 for r in recs)
    assert [e for r in recs for e in decode_examples(r)] == exs
    assert [e for r in encode_example_records(exs) for e in decode_examples(r)] == exs
    assert encode_example_batches([]) == []
    flagged = [dataclasses.replace(ref[0], click=True)] + ref[1:5]  # a bool label: not an int64
    recs = encode_example_batches(flagged)
    assert recs[0][:1] == b"[" and decode_examples(recs[0]) == flagged
    with pytest.raises(ValueError, match="Arrow IPC"):
        decode_examples(b"\xff\xff\xff\xff" + b"\x00" * 12)

    # Another producer's Arrow records: narrower ints, plain strings, an all-null optional column
    # read as the same examples; a column of the wrong type or a missing required field is refused.
    import pyarrow as pa

    def ipc(rb):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rb.schema) as w:
            w.write_batch(rb)
        return sink.getvalue().to_pybytes()

    plain = [dataclasses.replace(e, p_conversion=None) for e in ref[:50]]
    cols = {f: [getattr(e, f) for e in plain] for f in ("request_id", "ts", "surface", "user_id", "item_id",
                                                         "advertiser_id", "ad_format", "category", "age_bucket",
                                                         "country", "device", "hour", "click", "conversion",
                                                         "click_ts", "conversion_ts", "p_click", "p_conversion")}
    arrays = {f: pa.array(v, pa.int8() if f in ("click", "conversion", "hour") else None) for f, v in cols.items()}
    arrays["p_conversion"] = pa.nulls(len(plain))
    assert decode_examples(ipc(pa.RecordBatch.from_pydict(arrays))) == plain
    with pytest.raises(ValueError, match="wrong type.*ts: string"):
        decode_examples(ipc(pa.RecordBatch.from_pydict({**arrays, "ts": pa.array([str(v) for v in cols["ts"]])})))
    with pytest.raises(ValueError, match="wrong type.*surface: int64"):
        decode_examples(ipc(pa.RecordBatch.from_pydict({**arrays, "surface": pa.array([1] * len(plain))})))
    with pytest.raises(ValueError, match="lacks the fields"):
        decode_examples(ipc(pa.RecordBatch.from_pydict({f: a for f, a in arrays.items() if f != "user_id"})))


def test_record_batch_input_equals_event_input(tmp_path):
    """process() reads a validated RecordBatch column-wise; the result is the Events' result."""
    from opengem.stream.codec import events_to_batch

    import dataclasses

    evs = [e for e in _sim_events(30_000) if e.is_ad]
    assert any(e.kind == "click" for e in evs) and any(e.kind == "conversion" for e in evs)
    # Some impressions without their optional attributes: the batch path packs the nulls
    # (-1 / NaN / no string) column-wise, the Event path value by value.
    optional = dict.fromkeys(("age_bucket", "country", "device", "ad_format", "advertiser_id", "category",
                              "hour", "p_click", "p_conversion"))
    evs = [dataclasses.replace(e, **optional) if e.kind == "impression" and i % 7 == 0 else e
           for i, e in enumerate(evs)]
    out = []
    for k, as_batch in enumerate((False, True)):
        with LabelJoiner(tmp_path / str(k), SIM_CFG) as j:
            for i in range(0, len(evs), 700):
                part = evs[i:i + 700]
                j.process(0, i, events_to_batch(part) if as_batch else part)
            j.flush_all()
            out.append((by_id(j.outbox()), j.counters(), j.pending()))
    assert out[0] == out[1] and len(out[0][0]) > 1000
    assert sum(ex.advertiser_id is None and ex.p_click is None and ex.country is None
               for ex in out[1][0].values()) > 100


def test_state_of_format_1_is_still_read(tmp_path):
    """Open impressions and outbox entries written as JSON (format 1) load, close and ack as before."""
    import json

    from rocksdict import Options, Rdict

    from opengem.stream.events import FIELDS

    a, b = imp("a", 0), imp("b", 10)
    closed = Example(request_id="z", ts=T0, surface="feed", user_id=1, item_id=2, advertiser_id=None,
                     ad_format=None, category=None, age_bucket=None, country=None, device=None, hour=None,
                     click=0, conversion=0, click_ts=None, conversion_ts=None)
    path = tmp_path / "j"
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    db = Rdict(str(path), o)
    db.put(b"M", b'{"format":1}')
    db.put(b"S/0", json.dumps({"offset": 4, "max_ts": T0 + 10, "counters": {"impressions": 3, "examples": 1}}).encode())
    db.put(b"P/0/a", json.dumps([[getattr(a, f) for f in FIELDS], T0 + 20, None]).encode())  # clicked
    db.put(b"P/0/b", json.dumps([[getattr(b, f) for f in FIELDS], None, None]).encode())
    db.put(b"O/0/z", closed.to_json())
    db.close()
    with LabelJoiner(path, CFG) as j:
        assert j.pending() == 2 and j.outbox() == [closed]
        j.ack(["z"])
        j.process(0, 5, [conv("a", 30), org(2000)])
        got = by_id(j.outbox())
    assert set(got) == {"a", "b"}
    assert (got["a"].click, got["a"].conversion, got["a"].click_ts, got["a"].conversion_ts) == (1, 1, T0 + 20, T0 + 30)
    assert (got["b"].click, got["b"].item_id, got["b"].device, got["b"].p_click) == (0, b.item_id, "ios", 0.1)
    with LabelJoiner(path, CFG) as j:  # now format 3, packed values and outbox boxes: the same again after a reopen
        assert by_id(j.outbox()) == got
