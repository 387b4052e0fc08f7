"""Record value codecs: JSON and Arrow round trips, dispatch, bad input, and the
vectorized Arrow validator agreeing with the row validator row for row."""

from __future__ import annotations

import json
import string

import numpy as np
import pyarrow as pa
import pytest
from strategies import events, ids, opt, printable_ascii  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opengem.stream import codec
from opengem.stream.codec import (
    ARROW_CONTENT_TYPE,
    EVENT_SCHEMA,
    JSON_CONTENT_TYPE,
    batch_to_events,
    check_columns,
    decode,
    decode_arrow_columns,
    dicts_to_batch,
    encode_arrow,
    encode_batch,
    encode_json,
    events_to_batch,
    events_to_table,
    read_arrow,
    sniff,
)
from opengem.stream.events import (
    AD_FORMATS,
    AD_KINDS,
    DEFAULT_MAX_FUTURE_MS,
    DEFAULT_SURFACES,
    DEVICES,
    FIELDS,
    KINDS,
    MAX_ID,
    MIN_TS_MS,
    Event,
    EventError,
    parse_json,
    validate,
)

NOW = 1_700_000_000_000

def ev(i: int, kind: str = "impression", **kw) -> Event:
    ad = kind in AD_KINDS
    base = dict(event_id=f"e{i}", user_id=i, ts=NOW - i, surface="feed", kind=kind, item_id=100 + i, is_ad=ad,
                request_id=f"r{i}" if ad else None)
    return Event(**{**base, **kw})


SAMPLE = [
    ev(0, age_bucket=3, country="US", device="ios", ad_format="video", advertiser_id=9, category=4, hour=5, p_click=0.1,
       p_conversion=0.01),
    ev(1, "click", surface="reels"),
    ev(2, "conversion", country="FR"),
    ev(3, "like", surface="stories", device="web"),
    ev(4, "view", hour=0, category=0),
]


# --------------------------------------------------------------------------- round trips


@given(st.lists(events(), min_size=1, max_size=20))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_round_trip_arrow_and_json(es):
    assert decode(encode_arrow(es), now_ms=NOW) == es
    assert decode(encode_json(es), now_ms=NOW) == es


def test_round_trip_sample_and_compression():
    for compression in (None, "zstd", "lz4"):
        raw = encode_arrow(SAMPLE, compression=compression)
        assert raw[:4] == b"\xff\xff\xff\xff"
        assert decode(raw, now_ms=NOW) == SAMPLE
    assert events_to_table(SAMPLE).schema.equals(EVENT_SCHEMA)
    assert batch_to_events(events_to_batch(SAMPLE)) == SAMPLE


def test_encode_json_single_object_or_array():
    assert json.loads(encode_json(SAMPLE[:1])) == SAMPLE[0].to_dict()
    assert json.loads(encode_json(SAMPLE)) == [e.to_dict() for e in SAMPLE]
    assert decode(encode_json(SAMPLE[:1]), now_ms=NOW) == SAMPLE[:1]


def test_schema_types():
    assert tuple(EVENT_SCHEMA.names) == FIELDS
    for name in ("surface", "kind", "device", "ad_format", "country"):
        assert pa.types.is_dictionary(EVENT_SCHEMA.field(name).type)
    for name in ("user_id", "item_id", "ts", "advertiser_id"):
        assert EVENT_SCHEMA.field(name).type == pa.int64()
    assert EVENT_SCHEMA.field("is_ad").type == pa.bool_()
    assert EVENT_SCHEMA.field("p_click").type == pa.float64()
    assert ARROW_CONTENT_TYPE == b"application/vnd.apache.arrow.stream" and JSON_CONTENT_TYPE == b"application/json"


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("raw", [b"{}", b"[]", b"  \n\t\r[1]", b"\n{"])
def test_sniff_json(raw):
    assert sniff(raw) == "json"


@pytest.mark.parametrize("raw", [b"", b"hello", b"5", b'"x"', b"\xef\xbb\xbf{}", b"\xff\xff\xff", b"\x00\x00\x00\x00", b"PAR1"])
def test_bad_format(raw):
    with pytest.raises(EventError) as ei:
        decode(raw)
    assert ei.value.reason == "bad_format"


def test_decode_json_reasons_pass_through():
    with pytest.raises(EventError) as ei:
        decode(b"[]")
    assert ei.value.reason == "empty_batch"
    with pytest.raises(EventError) as ei:
        decode(b"{not json")
    assert ei.value.reason == "bad_json"
    assert decode(b"  " + SAMPLE[3].to_json(), now_ms=NOW) == [SAMPLE[3]]


# --------------------------------------------------------------------------- bad arrow


def _reason(raw, **kw):
    with pytest.raises(EventError) as ei:
        decode(raw, now_ms=NOW, **kw)
    return ei.value.reason


def test_bad_arrow():
    good = encode_arrow(SAMPLE)
    assert _reason(b"\xff\xff\xff\xff") == "bad_arrow"
    assert _reason(b"\xff\xff\xff\xff" + b"\x10\x00\x00\x00" + b"garbage!" * 4) == "bad_arrow"
    assert _reason(good[: len(good) // 2]) == "bad_arrow"
    assert _reason(good[:-8] + b"\x01" * 8) in ("bad_arrow", "too_large")  # corrupt tail, EOS missing or data broken


def test_invalid_utf8_is_bad_arrow():
    offsets = pa.py_buffer(np.array([0, 2], dtype=np.int32).tobytes())
    bad = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])
    batch = events_to_batch(SAMPLE[:1])
    batch = batch.set_column(0, "event_id", bad)
    assert _reason(encode_batch(batch)) == "bad_arrow"


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_flipped_bytes_only_raise_event_error(data):
    raw = bytearray(encode_arrow(SAMPLE))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(raw), now_ms=NOW)
    except EventError:
        pass


def _with_schema(fields, columns):
    schema = pa.schema(fields)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
    return sink.getvalue().to_pybytes()


def test_bad_schema():
    batch = events_to_batch(SAMPLE)
    fields, cols = list(EVENT_SCHEMA), batch.columns
    # a column missing
    assert _reason(_with_schema(fields[1:], cols[1:])) == "bad_schema"
    # an extra column
    extra = pa.field("colour", pa.string())
    assert _reason(_with_schema(fields + [extra], cols + [pa.array(["red"] * len(SAMPLE))])) == "bad_schema"
    # a wrong type: user_id int32, surface a plain string, p_click float32
    for name, typ in (("user_id", pa.int32()), ("surface", pa.string()), ("p_click", pa.float32())):
        i = FIELDS.index(name)
        f2 = fields[:i] + [pa.field(name, typ)] + fields[i + 1 :]
        c2 = cols[:i] + [cols[i].cast(typ)] + cols[i + 1 :]
        with pytest.raises(EventError) as ei:
            decode(_with_schema(f2, c2), now_ms=NOW)
        assert ei.value.reason == "bad_schema" and name in ei.value.message
    # a duplicated column
    assert _reason(_with_schema(fields + [fields[0]], cols + [cols[0]])) == "bad_schema"


def test_column_order_and_several_batches_are_accepted():
    batch = events_to_batch(SAMPLE)
    order = list(reversed(range(len(FIELDS))))
    raw = _with_schema([EVENT_SCHEMA.field(i) for i in order], [batch.column(i) for i in order])
    assert decode(raw, now_ms=NOW) == SAMPLE
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, EVENT_SCHEMA) as w:
        w.write_batch(events_to_batch(SAMPLE[:2]))
        w.write_batch(events_to_batch(SAMPLE[2:]))
    assert decode(sink.getvalue().to_pybytes(), now_ms=NOW) == SAMPLE


def test_too_large(monkeypatch):
    raw = encode_arrow(SAMPLE)
    monkeypatch.setattr(codec, "MAX_ARROW_RECORD_BYTES", len(raw) - 1)
    assert _reason(raw) == "too_large"


def test_empty_batches():
    assert events_to_batch([]).num_rows == 0
    with pytest.raises(ValueError):
        encode_arrow([])
    with pytest.raises(ValueError):
        encode_json([])
    assert _reason(encode_batch(events_to_batch([]))) == "empty_batch"  # a zero-row batch
    sink = pa.BufferOutputStream()
    pa.ipc.new_stream(sink, EVENT_SCHEMA).close()  # schema, no batch
    assert _reason(sink.getvalue().to_pybytes()) == "empty_batch"
    with pytest.raises(EventError) as ei:
        decode_arrow_columns(encode_batch(events_to_batch([])))
    assert ei.value.reason == "empty_batch"
    assert check_columns(events_to_batch([])) == []


# --------------------------------------------------------------------------- vectorized == row validator

GOOD_ROW = SAMPLE[0].to_dict()
GOOD_ORGANIC = SAMPLE[3].to_dict()

# Rows that fit the column types but break one rule each (the Arrow twin of
# test_events' corpus; type errors cannot happen in a typed column).
BAD_ROWS = [
    *({**GOOD_ROW, f: None} for f in ("event_id", "user_id", "ts", "surface", "kind", "item_id", "is_ad", "request_id")),
    {**GOOD_ROW, "event_id": ""},
    {**GOOD_ROW, "event_id": "x" * 65},
    {**GOOD_ROW, "event_id": "é" * 64},  # 64 characters, 128 bytes: bad_value, not out_of_range
    {**GOOD_ROW, "event_id": "é" * 65},
    {**GOOD_ROW, "event_id": "tab\there"},
    {**GOOD_ROW, "event_id": "del\x7f"},
    {**GOOD_ROW, "user_id": -1},
    {**GOOD_ROW, "item_id": -(2**63)},
    {**GOOD_ROW, "advertiser_id": -3},
    {**GOOD_ROW, "ts": MIN_TS_MS - 1},
    {**GOOD_ROW, "ts": NOW + DEFAULT_MAX_FUTURE_MS + 1},
    {**GOOD_ROW, "ts": MAX_ID},
    {**GOOD_ROW, "surface": "search"},
    {**GOOD_ROW, "surface": ""},
    {**GOOD_ROW, "surface": "fé"},
    {**GOOD_ROW, "kind": "purchase"},
    {**GOOD_ROW, "device": "tv"},
    {**GOOD_ROW, "ad_format": "banner"},
    {**GOOD_ROW, "is_ad": False},
    {**GOOD_ORGANIC, "is_ad": True},
    {**GOOD_ORGANIC, "request_id": "r"},
    {**GOOD_ORGANIC, "request_id": ""},
    {**GOOD_ORGANIC, "ad_format": "image"},
    {**GOOD_ORGANIC, "advertiser_id": 1},
    {**GOOD_ROW, "request_id": "ü"},
    {**GOOD_ROW, "country": "us"},
    {**GOOD_ROW, "country": "USA"},
    {**GOOD_ROW, "country": ""},
    {**GOOD_ROW, "country": "\x00A"},
    {**GOOD_ROW, "p_click": float("nan")},
    {**GOOD_ROW, "p_click": float("-inf")},
    {**GOOD_ROW, "p_conversion": 1.0000001},
    {**GOOD_ROW, "p_conversion": -0.0},  # valid: -0.0 >= 0
    {**GOOD_ROW, "kind": "click", "p_conversion": None},
    {**GOOD_ORGANIC, "p_conversion": 0.5},
    {**GOOD_ROW, "age_bucket": 8},
    {**GOOD_ROW, "age_bucket": -128},
    {**GOOD_ROW, "category": -(2**31)},
    {**GOOD_ROW, "hour": 24},
    {**GOOD_ROW, "hour": 127},
    {**GOOD_ROW, "user_id": -1, "hour": 99},  # first problem wins
    {**GOOD_ORGANIC, "kind": None, "is_ad": None},
]


def _row_errors(rows, **kw):
    out = []
    for i, r in enumerate(rows):
        try:
            validate(r, now_ms=NOW, **kw)
        except EventError as e:
            out.append((i, e.reason, e.message))
    return out


def _col_errors(batch, **kw):
    return [(i, e.reason, e.message) for i, e in check_columns(batch, now_ms=NOW, **kw)]


def test_corpus_vectorized_agrees_with_row_validator():
    rows = [GOOD_ROW, *BAD_ROWS, GOOD_ORGANIC]
    expected = _row_errors(rows)
    assert len(expected) == len(rows) - 3  # all but the two good rows and -0.0
    assert _col_errors(dicts_to_batch(rows)) == expected
    # through the wire, with the valid rows kept columnar
    valid, errors = decode_arrow_columns(encode_batch(dicts_to_batch(rows)), now_ms=NOW)
    assert [(i, e.reason, e.message) for i, e in errors] == expected
    bad = {i for i, *_ in expected}
    assert batch_to_events(valid) == [validate(r, now_ms=NOW) for i, r in enumerate(rows) if i not in bad]
    # decode() is all-or-nothing with the first row's reason
    i, reason, message = expected[0]
    with pytest.raises(EventError) as ei:
        decode(encode_batch(dicts_to_batch(rows)), now_ms=NOW)
    assert ei.value.reason == reason and ei.value.message == f"element {i}: {message}"


def test_options_agree():
    rows = [{**GOOD_ROW, "surface": "search"}, {**GOOD_ROW, "ts": NOW + 5000}, GOOD_ROW]
    kw = dict(surfaces=("search", "feed"), max_future_ms=1000)
    assert _col_errors(dicts_to_batch(rows), **kw) == _row_errors(rows, **kw)
    assert [i for i, *_ in _row_errors(rows, **kw)] == [1]


def test_sliced_batch_offsets():
    rows = [GOOD_ROW, *BAD_ROWS, GOOD_ORGANIC]
    batch = dicts_to_batch(rows)
    for lo, n in ((3, 7), (1, len(rows) - 1), (10, 0)):
        sub = rows[lo : lo + n]
        assert _col_errors(batch.slice(lo, n)) == _row_errors(sub)


def test_dictionary_null_entry_is_missing():
    batch = events_to_batch(SAMPLE[:2])
    surface = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int16()), pa.array(["feed", None]))
    batch = batch.set_column(FIELDS.index("surface"), "surface", surface)
    errs = check_columns(batch, now_ms=NOW)
    assert [(i, e.reason) for i, e in errs] == [(1, "missing_field")]


# Values of the column types, valid or not, for each field.
ANY_STR = st.text(max_size=70) | st.sampled_from(["", "x" * 64, "x" * 65, "é", "a\x00"])
ANY_I64 = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-1, 0, MAX_ID])
ANY = {
    "event_id": ANY_STR,
    "user_id": ANY_I64,
    "ts": ANY_I64 | st.sampled_from([MIN_TS_MS - 1, MIN_TS_MS, NOW + DEFAULT_MAX_FUTURE_MS, NOW + DEFAULT_MAX_FUTURE_MS + 1]),
    "surface": st.sampled_from(DEFAULT_SURFACES + ("search", "", "Feed", "fé")),
    "kind": st.sampled_from(KINDS + ("purchase", "")),
    "item_id": ANY_I64,
    "is_ad": st.booleans(),
    "request_id": ANY_STR,
    "age_bucket": st.integers(-128, 127),
    "country": st.sampled_from(["US", "us", "USA", "", "ÜS", "1A"]) | st.text(max_size=3),
    "device": st.sampled_from(DEVICES + ("tv", "")),
    "ad_format": st.sampled_from(AD_FORMATS + ("banner",)),
    "advertiser_id": ANY_I64,
    "category": st.integers(-(2**31), 2**31 - 1),
    "hour": st.integers(-128, 127),
    "p_click": st.floats(),
    "p_conversion": st.floats() | st.sampled_from([0.0, 1.0, -0.0, 1e-320]),
}
assert ANY.keys() == set(FIELDS)


@st.composite
def mutated_rows(draw):
    """A valid event's row with 0..3 fields replaced by any value of their type (or null)."""
    row = draw(events()).to_dict()
    for f in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        row[f] = draw(st.none() | ANY[f])
    return row


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_rows(), min_size=1, max_size=25))
def test_vectorized_agrees_with_row_validator(rows):
    assert _col_errors(dicts_to_batch(rows)) == _row_errors(rows)
