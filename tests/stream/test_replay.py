"""Replay of Parquet / CSV interaction logs into events."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opengem.stream import replay as replay_mod
from opengem.stream.events import Event
from opengem.stream.replay import (
    ColumnMapping,
    ReplayReport,
    hash_id,
    parse_mapping,
    replay_file,
    replay_rows,
    stem_token,
)

T0 = 1_700_000_000  # seconds; 2023-11-14


def blake63(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") & (2**63 - 1)


def run(path, mapping, **kw) -> tuple[list[Event], ReplayReport, list[ReplayReport]]:
    events, reports = [], []
    for chunk, report in replay_rows(path, mapping, **kw):
        events.extend(chunk)
        reports.append(report)
    return events, (reports[-1] if reports else ReplayReport()), reports


# --------------------------------------------------------------------------- mapping


def test_parse_mapping():
    m = parse_mapping("user=uid, item=ad,time=ts,surface=placement,click=clk,conversion=conv,attr.country=geo,time_unit=s")
    assert m == ColumnMapping(user="uid", item="ad", time="ts", surface="placement", label_click="clk",
                              label_conversion="conv", attributes=(("country", "geo"),), time_unit="s")
    assert m.labelled and m.source_columns() == ["uid", "ad", "ts", "placement", "clk", "conv", "geo"]
    m = parse_mapping("user=u,item=i,time=t,kind=k,request=r,is_ad=ad,attr.hour=h,attr.device=d,default_surface=reels")
    assert (m.kind, m.request, m.is_ad, m.default_surface, m.labelled) == ("k", "r", "ad", "reels", False)
    assert m.attributes == (("hour", "h"), ("device", "d"))


@pytest.mark.parametrize(
    "spec, word",
    [
        ("user=u,item=i", "time"),
        ("user=u,item=i,time=t,colour=c", "colour"),
        ("user=u,item=i,time=t,user=v", "twice"),
        ("user=u,item=i,time=t,click=c,label_click=d", "twice"),
        ("user=u,item=i,time=t,attr.colour=c", "colour"),
        ("user=u,item=i,time=t,time_unit=minutes", "time_unit"),
        ("user=u,item=i,time=t,default_kind=purchase", "default_kind"),
        ("user=u,item=i,time=t,click=c,kind=k", "kind"),
        ("user=u,item=i,time=t,surface", "key=value"),
    ],
)
def test_parse_mapping_errors(spec, word):
    with pytest.raises(ValueError, match=word):
        parse_mapping(spec)


def test_ids_and_stems():
    assert hash_id("alice") == blake63("alice")
    assert 0 <= hash_id("x" * 1000) < 2**63
    assert stem_token("data/criteo_day_1.csv.gz") == "criteo_day_1"
    assert stem_token("/x/log.parquet") == "log"
    odd = stem_token("/x/journal d'été 2024, partie une très longue.csv")
    assert len(odd) <= 32 and odd.isascii() and "~" in odd
    assert odd == stem_token("/y/journal d'été 2024, partie une très longue.csv")  # stable


# --------------------------------------------------------------------------- CSV, labelled (CTR log)

CSV = "\n".join(
    [
        "uid,ad,ts,placement,clk,conv,geo",
        f"alice,101,{T0},feed,1,0,US",  # 0: impression + click
        f"bob,102,{T0 + 1}.5,reels,0,0,FR",  # 1: impression, fractional seconds
        f",103,{T0 + 2},feed,0,0,US",  # 2: missing user
        f"carol,x9,notatime,feed,1,1,DE",  # 3: bad time
        f"dave,104,{T0 + 3},search,0,0,US",  # 4: unknown surface
        f"erin,105,{T0 + 4},feed,1,1,us",  # 5: bad country
        f"frank,106,{T0 + 5},feed,2,0,US",  # 6: bad label
        f"42,107,{T0 + 6},feed,true,TRUE,",  # 7: impression + click + conversion, numeric user, no country
        f"gina,108,{T0 + 7},feed,0,1,GB",  # 8: impression + post-view conversion
        f"-5,109,{T0 + 8},feed,0,0,GB",  # 9: negative user id
        "only,two",  # a line with the wrong field count
        f"hank,110,{T0 - 10**9},feed,0,0,GB",  # 10: ts before 2000
    ]
) + "\n"
SPEC = "user=uid,item=ad,time=ts,surface=placement,click=clk,conversion=conv,attr.country=geo,time_unit=s"


@pytest.fixture
def ctr_csv(tmp_path):
    path = tmp_path / "ctr-log.csv"
    path.write_text(CSV)
    return path


def test_csv_labelled_rows(ctr_csv):
    events, report, _ = run(ctr_csv, parse_mapping(SPEC))
    by_id = {e.event_id: e for e in events}
    assert sorted(by_id) == sorted(
        ["replay-ctr-log-0-0", "replay-ctr-log-0-1", "replay-ctr-log-1-0", "replay-ctr-log-7-0", "replay-ctr-log-7-1",
         "replay-ctr-log-7-2", "replay-ctr-log-8-0", "replay-ctr-log-8-2"]
    )
    imp, click = by_id["replay-ctr-log-0-0"], by_id["replay-ctr-log-0-1"]
    assert imp == Event(event_id="replay-ctr-log-0-0", user_id=blake63("alice"), ts=T0 * 1000, surface="feed",
                        kind="impression", item_id=101, is_ad=True, request_id="replay-ctr-log-0", country="US")
    assert (click.kind, click.ts, click.request_id, click.user_id, click.item_id, click.country) == (
        "click", T0 * 1000 + 1, imp.request_id, imp.user_id, 101, "US")
    assert by_id["replay-ctr-log-1-0"].ts == (T0 + 1) * 1000 + 500
    row7 = [by_id[f"replay-ctr-log-7-{k}"] for k in range(3)]
    assert [e.kind for e in row7] == ["impression", "click", "conversion"]
    assert [e.ts for e in row7] == [(T0 + 6) * 1000 + k for k in range(3)]
    assert {e.user_id for e in row7} == {42} and {e.country for e in row7} == {None}
    assert by_id["replay-ctr-log-8-2"].kind == "conversion"

    assert report.rows == 12  # 11 parsed data rows + the short line
    assert report.events == len(events) == 8
    assert report.bad_rows == 8
    assert report.reasons == Counter(
        missing_field=1, bad_time=1, unknown_value=1, bad_value=1, bad_label=1, out_of_range=2, bad_csv_row=1
    )
    errors = dict((row, msg) for row, msg in report.first_errors if row >= 0)
    assert errors[2].startswith("missing_field: user_id") and "'uid'" in errors[2]
    assert errors[3].startswith("bad_time:") and "notatime" in errors[3]
    assert errors[4].startswith("unknown_value: surface='search'")
    assert errors[5].startswith("bad_value: country='us'")
    assert errors[6].startswith("bad_label: click")
    assert errors[9].startswith("out_of_range: user_id=-5")
    assert errors[10].startswith("out_of_range: ts=")
    assert (-1, "bad_csv_row: expected 7 fields, got 2: 'only,two'") in report.first_errors


def test_replay_is_idempotent(ctr_csv):
    first, r1, _ = run(ctr_csv, parse_mapping(SPEC))
    again, r2, _ = run(ctr_csv, parse_mapping(SPEC), batch_rows=2)
    assert first == again
    # the short CSV line is reported when its block is parsed: only the order of first_errors may differ
    assert (r1.rows, r1.events, r1.bad_rows, r1.reasons) == (r2.rows, r2.events, r2.bad_rows, r2.reasons)
    assert sorted(r1.first_errors) == sorted(r2.first_errors)


def test_first_errors_are_capped(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("u,i,t\n" + "".join(f"u{k},{k},never\n" for k in range(25)))
    events, report, _ = run(path, parse_mapping("user=u,item=i,time=t"))
    assert events == [] and report.rows == report.bad_rows == 25
    assert [row for row, _ in report.first_errors] == list(range(10))


def test_csv_streams_in_chunks(tmp_path, monkeypatch):
    # Small CSV blocks: type inference on the first block (all integers) must
    # not break the read when a later block holds a string id.
    monkeypatch.setattr(replay_mod, "CSV_BLOCK_BYTES", 256)
    lines = [f"{k},{1000 + k},{T0 + k}" for k in range(200)]
    lines[150] = f"user-150,1150,{T0 + 150}"
    path = tmp_path / "big.csv"
    path.write_text("u,i,t\n" + "\n".join(lines) + "\n")
    chunks = list(replay_rows(path, parse_mapping("user=u,item=i,time=t,time_unit=s"), batch_rows=64))
    assert [len(evs) for evs, _ in chunks] == [64, 64, 64, 8]
    assert [r.rows for _, r in chunks] == [64, 128, 192, 200]
    events = [e for evs, _ in chunks for e in evs]
    assert [e.event_id for e in events] == [f"replay-big-{k}-0" for k in range(200)]
    assert events[150].user_id == blake63("user-150") and events[149].user_id == 149
    assert all(e.kind == "impression" and e.surface == "feed" and e.request_id == f"replay-big-{k}" for k, e in enumerate(events))


def test_tsv_and_header_only(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text(f"u\ti\tt\n7\t8\t{T0}000\n")
    events, report, _ = run(path, parse_mapping("user=u,item=i,time=t"))
    assert [(e.user_id, e.item_id, e.ts) for e in events] == [(7, 8, T0 * 1000)]
    empty = tmp_path / "empty.csv"
    empty.write_text("u,i,t\n")
    events, report, reports = run(empty, parse_mapping("user=u,item=i,time=t"))
    assert events == [] and reports == [] and report.rows == 0


def test_missing_column_is_a_config_error(ctr_csv, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        run(ctr_csv, parse_mapping("user=uid,item=ad,time=nope"))
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"u": [1], "i": [2], "t": [T0 * 1000]}), path)
    with pytest.raises(ValueError, match="nope"):
        run(path, parse_mapping("user=u,item=nope,time=t"))


# --------------------------------------------------------------------------- Parquet, kind column


def test_parquet_kinds_and_attributes(tmp_path):
    ts = [datetime(2023, 11, 14, 12, 0, s, tzinfo=timezone.utc) for s in range(8)]
    table = pa.table(
        {
            "user": pa.array([1, 2, 3, -4, 5, 6, 7, None], pa.int64()),
            "item": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "when": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "what": ["impression", "click", "like", "view", "purchase", "like", "share", "view"],
            "req": ["r1", "r1", "r9", None, None, None, None, None],
            "ad": [True, True, False, False, False, True, False, False],
            "hour": [12.0, 12.0, math.nan, 3.0, 4.0, 5.0, 2.5, 1.0],
            "dev": ["ios", "ios", "web", None, "web", "web", "tv", "web"],
        }
    )
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path, row_group_size=3)
    mapping = ColumnMapping(user="user", item="item", time="when", kind="what", request="req", is_ad="ad",
                            attributes=(("hour", "hour"), ("device", "dev")), time_unit="iso")
    chunks = list(replay_rows(path, mapping, batch_rows=2))
    assert [r.rows for _, r in chunks] == [2, 4, 6, 8]
    events = [e for evs, _ in chunks for e in evs]
    ms = [int(t.timestamp() * 1000) for t in ts]
    assert events == [
        Event("replay-mixed-0-0", 1, ms[0], "feed", "impression", hash_id("a"), True, "r1", hour=12, device="ios"),
        Event("replay-mixed-1-0", 2, ms[1], "feed", "click", hash_id("b"), True, "r1", hour=12, device="ios"),
        # organic: the request column is ignored; NaN hour is null
        Event("replay-mixed-2-0", 3, ms[2], "feed", "like", hash_id("c"), False, device="web"),
    ]
    report = chunks[-1][1]
    assert report.reasons == Counter(out_of_range=1, unknown_value=1, inconsistent=1, bad_type=1, missing_field=1)
    assert [row for row, _ in report.first_errors] == [3, 4, 5, 6, 7]
    assert "device" not in report.first_errors[3][1] and "hour" in report.first_errors[3][1]  # 2.5 is not an hour


@pytest.mark.parametrize(
    "unit, values, expected",
    [
        ("s", [T0, f"{T0}", f"{T0}.25", float(T0) + 0.5], [T0 * 1000, T0 * 1000, T0 * 1000 + 250, T0 * 1000 + 500]),
        ("ms", [T0 * 1000, f"{T0 * 1000}", T0 * 1000 + 0.4], [T0 * 1000, T0 * 1000, T0 * 1000]),
        ("us", [T0 * 10**6 + 999, f"{T0 * 10**6}"], [T0 * 1000, T0 * 1000]),
        ("iso", ["2023-11-14T22:13:20Z", "2023-11-14T23:13:20+01:00", "2023-11-14 22:13:20.123", "2023-11-14"],
         [T0 * 1000, T0 * 1000, T0 * 1000 + 123, (T0 - 80000) * 1000]),
    ],
)
def test_time_units(tmp_path, unit, values, expected):
    path = tmp_path / "t.parquet"
    # a column mixing numbers and strings is written as strings (as a CSV would read it)
    col = pa.array([str(v) for v in values]) if any(isinstance(v, str) for v in values) else pa.array(values)
    pq.write_table(pa.table({"u": list(range(len(values))), "i": [1] * len(values), "t": col}), path)
    events, report, _ = run(path, ColumnMapping(user="u", item="i", time="t", default_kind="view", time_unit=unit))
    assert report.bad_rows == 0, report.first_errors
    assert [e.ts for e in events] == expected


@pytest.mark.parametrize("unit, bad", [("s", "1e400"), ("s", "inf"), ("iso", "yesterday"), ("iso", "14/11/2023"), ("ms", "12:00")])
def test_bad_times(tmp_path, unit, bad):
    path = tmp_path / "t.csv"
    path.write_text(f"u,i,t\n1,2,{bad}\n")
    events, report, _ = run(path, ColumnMapping(user="u", item="i", time="t", time_unit=unit))
    assert events == [] and report.reasons == Counter(bad_time=1)


# --------------------------------------------------------------------------- replay_file


def test_replay_file_sends_valid_events_per_chunk(ctr_csv):
    sent: list[list[Event]] = []
    progress: list[ReplayReport] = []
    report = replay_file(ctr_csv, parse_mapping(SPEC), sent.append, progress.append, batch_rows=4)
    assert [len(b) for b in sent] == [3, 3, 2]  # chunks of rows 0-3, 4-7, 8-10
    assert report == progress[-1] and len(progress) == 3
    assert [r.rows for r in progress] == [5, 9, 12]  # the short line is counted with the first chunk
    assert report.events == sum(map(len, sent)) == 8
    assert all(e.event_id.startswith("replay-ctr-log-") for b in sent for e in b)
