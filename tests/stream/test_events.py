"""The event schema: every malformed field is rejected with a precise reason.

A corpus with one bad record per rule of ``opengem.stream.events`` (each case
asserts the reason code and that the message names the field), then
hypothesis properties: valid events round-trip through JSON, arbitrary input
only ever raises EventError, and a wrong-typed field is always rejected.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from strategies import events, ids, opt, printable_ascii  # noqa: F401
from hypothesis import strategies as st

from opengem.stream.events import (
    AD_FORMATS,
    AD_KINDS,
    DEFAULT_MAX_FUTURE_MS,
    DEFAULT_SURFACES,
    DEVICES,
    FIELDS,
    KINDS,
    MAX_ID,
    MAX_RECORD_BYTES,
    MIN_TS_MS,
    REQUIRED,
    Event,
    EventError,
    parse_json,
    validate,
)

NOW = 1_700_000_000_000  # the validator's clock in every test

IMPRESSION = {
    "event_id": "ev-1",
    "user_id": 42,
    "ts": NOW - 1000,
    "surface": "feed",
    "kind": "impression",
    "item_id": 7,
    "is_ad": True,
    "request_id": "req-1",
    "age_bucket": 3,
    "country": "US",
    "device": "ios",
    "ad_format": "video",
    "advertiser_id": 11,
    "category": 5,
    "hour": 13,
    "p_click": 0.05,
    "p_conversion": 0.001,
}
LIKE = {"event_id": "ev-2", "user_id": 42, "ts": NOW, "surface": "reels", "kind": "like", "item_id": 9, "is_ad": False}


def with_(base: dict, **changes) -> dict:
    d = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_DROP = object()


def check(record, **kw) -> Event:
    return validate(record, now_ms=NOW, **kw)


def test_base_records_are_valid():
    assert check(IMPRESSION).to_dict() == IMPRESSION
    assert check(LIKE).to_dict() == LIKE
    assert parse_json(json.dumps(IMPRESSION).encode(), now_ms=NOW) == [check(IMPRESSION)]


# (record, reason, a word the message must contain — the field, normally)
CASES = {}
for _f in REQUIRED:
    CASES[f"missing {_f}"] = (with_(IMPRESSION, **{_f: _DROP}), "missing_field", _f)
    CASES[f"null {_f}"] = (with_(IMPRESSION, **{_f: None}), "missing_field", _f)
CASES.update(
    {
        "ad kind without request_id": (with_(IMPRESSION, request_id=_DROP), "missing_field", "request_id"),
        "click without request_id": (with_(IMPRESSION, kind="click", request_id=None, p_click=_DROP, p_conversion=_DROP), "missing_field", "request_id"),
        # wrong type, one per field
        "event_id int": (with_(IMPRESSION, event_id=5), "bad_type", "event_id"),
        "user_id str": (with_(IMPRESSION, user_id="42"), "bad_type", "user_id"),
        "user_id float": (with_(IMPRESSION, user_id=42.0), "bad_type", "user_id"),
        "ts float": (with_(IMPRESSION, ts=float(NOW)), "bad_type", "ts"),
        "ts str": (with_(IMPRESSION, ts="2023-11-14T22:13:20Z"), "bad_type", "ts"),
        "surface int": (with_(IMPRESSION, surface=1), "bad_type", "surface"),
        "kind list": (with_(IMPRESSION, kind=["impression"]), "bad_type", "kind"),
        "item_id str": (with_(IMPRESSION, item_id="7"), "bad_type", "item_id"),
        "is_ad int": (with_(IMPRESSION, is_ad=1), "bad_type", "is_ad"),
        "is_ad str": (with_(IMPRESSION, is_ad="true"), "bad_type", "is_ad"),
        "request_id int": (with_(IMPRESSION, request_id=7), "bad_type", "request_id"),
        "age_bucket str": (with_(IMPRESSION, age_bucket="3"), "bad_type", "age_bucket"),
        "country int": (with_(IMPRESSION, country=840), "bad_type", "country"),
        "device bool": (with_(IMPRESSION, device=True), "bad_type", "device"),
        "ad_format dict": (with_(IMPRESSION, ad_format={"x": 1}), "bad_type", "ad_format"),
        "advertiser_id float": (with_(IMPRESSION, advertiser_id=11.0), "bad_type", "advertiser_id"),
        "category str": (with_(IMPRESSION, category="shoes"), "bad_type", "category"),
        "hour float": (with_(IMPRESSION, hour=13.5), "bad_type", "hour"),
        "p_click str": (with_(IMPRESSION, p_click="0.05"), "bad_type", "p_click"),
        "p_conversion list": (with_(IMPRESSION, p_conversion=[0.1]), "bad_type", "p_conversion"),
        # JSON true is not a number
        "user_id bool": (with_(IMPRESSION, user_id=True), "bad_type", "user_id"),
        "item_id bool": (with_(IMPRESSION, item_id=False), "bad_type", "item_id"),
        "ts bool": (with_(IMPRESSION, ts=True), "bad_type", "ts"),
        "age_bucket bool": (with_(IMPRESSION, age_bucket=True), "bad_type", "age_bucket"),
        "hour bool": (with_(IMPRESSION, hour=False), "bad_type", "hour"),
        "p_click bool": (with_(IMPRESSION, p_click=True), "bad_type", "p_click"),
        # ids out of range
        "user_id 2**63": (with_(IMPRESSION, user_id=2**63), "out_of_range", "user_id"),
        "item_id 2**64": (with_(IMPRESSION, item_id=2**64), "out_of_range", "item_id"),
        "advertiser_id 2**63": (with_(IMPRESSION, advertiser_id=MAX_ID + 1), "out_of_range", "advertiser_id"),
        "user_id negative": (with_(IMPRESSION, user_id=-1), "out_of_range", "user_id"),
        "item_id negative": (with_(IMPRESSION, item_id=-7), "out_of_range", "item_id"),
        "advertiser_id negative": (with_(IMPRESSION, advertiser_id=-1), "out_of_range", "advertiser_id"),
        "category negative": (with_(IMPRESSION, category=-1), "out_of_range", "category"),
        "category 2**31": (with_(IMPRESSION, category=2**31), "out_of_range", "category"),
        "age_bucket 8": (with_(IMPRESSION, age_bucket=8), "out_of_range", "age_bucket"),
        "age_bucket negative": (with_(IMPRESSION, age_bucket=-1), "out_of_range", "age_bucket"),
        "hour 24": (with_(IMPRESSION, hour=24), "out_of_range", "hour"),
        # time
        "ts before 2000": (with_(IMPRESSION, ts=MIN_TS_MS - 1), "out_of_range", "ts"),
        "ts zero": (with_(IMPRESSION, ts=0), "out_of_range", "ts"),
        "ts seconds not ms": (with_(IMPRESSION, ts=NOW // 1000), "out_of_range", "ts"),
        "ts far future": (with_(IMPRESSION, ts=NOW + DEFAULT_MAX_FUTURE_MS + 1), "future_ts", "ts"),
        "ts in us": (with_(IMPRESSION, ts=NOW * 1000), "future_ts", "ts"),
        # strings
        "event_id empty": (with_(IMPRESSION, event_id=""), "out_of_range", "event_id"),
        "event_id too long": (with_(IMPRESSION, event_id="x" * 65), "out_of_range", "event_id"),
        "event_id control char": (with_(IMPRESSION, event_id="a\nb"), "bad_value", "event_id"),
        "event_id non-ascii": (with_(IMPRESSION, event_id="évènement"), "bad_value", "event_id"),
        "request_id empty": (with_(IMPRESSION, request_id=""), "out_of_range", "request_id"),
        # enumerations
        "unknown surface": (with_(IMPRESSION, surface="search"), "unknown_value", "surface"),
        "surface wrong case": (with_(IMPRESSION, surface="Feed"), "unknown_value", "surface"),
        "unknown kind": (with_(IMPRESSION, kind="purchase"), "unknown_value", "kind"),
        "unknown device": (with_(IMPRESSION, device="tv"), "unknown_value", "device"),
        "unknown ad_format": (with_(IMPRESSION, ad_format="banner"), "unknown_value", "ad_format"),
        # consistency
        "impression not is_ad": (with_(IMPRESSION, is_ad=False), "inconsistent", "is_ad"),
        "like is_ad": (with_(LIKE, is_ad=True), "inconsistent", "is_ad"),
        "organic with request_id": (with_(LIKE, request_id="req-1"), "inconsistent", "request_id"),
        "organic with ad_format": (with_(LIKE, ad_format="image"), "inconsistent", "ad attributes"),
        "organic with advertiser_id": (with_(LIKE, advertiser_id=3), "inconsistent", "ad attributes"),
        "p_click on click": (with_(IMPRESSION, kind="click", p_conversion=_DROP), "inconsistent", "p_click"),
        "p_conversion on like": (with_(LIKE, p_conversion=0.5), "inconsistent", "p_conversion"),
        # country
        "country lower case": (with_(IMPRESSION, country="us"), "bad_value", "country"),
        "country three letters": (with_(IMPRESSION, country="USA"), "bad_value", "country"),
        "country digit": (with_(IMPRESSION, country="U1"), "bad_value", "country"),
        "country empty": (with_(IMPRESSION, country=""), "out_of_range", "country"),
        "country non-ascii": (with_(IMPRESSION, country="ÜS"), "bad_value", "country"),
        # probabilities
        "p_click nan": (with_(IMPRESSION, p_click=float("nan")), "out_of_range", "p_click"),
        "p_click inf": (with_(IMPRESSION, p_click=float("inf")), "out_of_range", "p_click"),
        "p_click negative": (with_(IMPRESSION, p_click=-0.01), "out_of_range", "p_click"),
        "p_conversion above 1": (with_(IMPRESSION, p_conversion=1.5), "out_of_range", "p_conversion"),
        "p_click huge int": (with_(IMPRESSION, p_click=10**400), "out_of_range", "p_click"),
        # shape
        "unknown field": (with_(IMPRESSION, colour="red"), "unknown_field", "colour"),
        "typo of a field": (with_(IMPRESSION, user_ld=42), "unknown_field", "user_ld"),
        "not an object (list)": ([IMPRESSION], "not_an_object", "list"),
        "not an object (str)": ("ev-1", "not_an_object", "str"),
        "not an object (null)": (None, "not_an_object", "NoneType"),
    }
)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_record_rejected_with_reason(name):
    record, reason, word = CASES[name]
    with pytest.raises(EventError) as ei:
        check(record)
    assert ei.value.reason == reason, ei.value
    assert word in ei.value.message, ei.value
    assert str(ei.value).startswith(reason + ": ")


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("not an object (list)")])
def test_bad_record_rejected_through_json(name):
    record, reason, word = CASES[name]
    if name == "p_click huge int":  # JSON has the literal, parse_json must not overflow
        raw = json.dumps(with_(IMPRESSION, p_click=0.5)).replace("0.5", "1" + "0" * 400).encode()
    else:
        raw = json.dumps(record).encode()
    with pytest.raises(EventError) as ei:
        parse_json(raw, now_ms=NOW)
    assert ei.value.reason == reason
    assert word in ei.value.message


def test_surfaces_are_configuration():
    rec = with_(IMPRESSION, surface="search")
    assert check(rec, surfaces=("feed", "search")).surface == "search"
    with pytest.raises(EventError, match="unknown_value: surface"):
        check(IMPRESSION, surfaces=("search",))


def test_max_future_is_configurable():
    rec = with_(IMPRESSION, ts=NOW + 10_000)
    assert check(rec, max_future_ms=10_000).ts == NOW + 10_000
    with pytest.raises(EventError) as ei:
        check(rec, max_future_ms=9_999)
    assert ei.value.reason == "future_ts"


@pytest.mark.parametrize(
    "raw, reason, word",
    [
        (b"5", "not_an_object", "int"),
        (b'"ev"', "not_an_object", "str"),
        (b"null", "not_an_object", "NoneType"),
        (b"[1]", "not_an_object", "element 0"),
        (b'{"event_id": ', "bad_json", "JSON"),
        (b"{'event_id': 'x'}", "bad_json", "JSON"),
        (b"\xff\xfe\x00garbage", "bad_json", "JSON"),
        (bytes(range(256)), "bad_json", "JSON"),
        (b"1" * 5000, "bad_json", "JSON"),  # int digits limit: a ValueError, not JSONDecodeError
        (b"[" * 100_000 + b"]" * 100_000, "bad_json", "JSON"),  # nesting
        (b"", "bad_json", "JSON"),
        (b" " * (MAX_RECORD_BYTES + 1), "too_large", "bytes"),
        (b"[]", "empty_batch", "empty"),
    ],
)
def test_bad_json_records(raw, reason, word):
    with pytest.raises(EventError) as ei:
        parse_json(raw, now_ms=NOW)
    assert ei.value.reason == reason
    assert word in ei.value.message


def test_array_with_one_bad_element_rejects_the_record():
    raw = json.dumps([IMPRESSION, LIKE, with_(LIKE, hour=99)]).encode()
    with pytest.raises(EventError) as ei:
        parse_json(raw, now_ms=NOW)
    assert ei.value.reason == "out_of_range"
    assert "element 2" in ei.value.message and "hour" in ei.value.message
    assert parse_json(json.dumps([IMPRESSION, LIKE]).encode(), now_ms=NOW) == [check(IMPRESSION), check(LIKE)]


# --------------------------------------------------------------------------- properties

@settings(deadline=None)  # correctness, not speed: a loaded shared machine misses deadlines
@given(events())
def test_valid_event_round_trips_through_json(e):
    assert parse_json(e.to_json(), now_ms=NOW) == [e]
    assert check(e.to_dict()) == e


@settings(deadline=None)  # correctness, not speed: a loaded shared machine misses deadlines
@given(st.lists(events(), min_size=1, max_size=5))
def test_valid_array_round_trips(es):
    raw = json.dumps([e.to_dict() for e in es]).encode()
    assert parse_json(raw, now_ms=NOW) == es


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4), max_leaves=20)
# Objects over the real field names reach deeper into the validator than random keys.
event_like = st.dictionaries(st.sampled_from(FIELDS + ("extra",)), json_values, max_size=len(FIELDS) + 1)


def _only_event_error(raw):
    try:
        out = parse_json(raw, now_ms=NOW)
    except EventError:
        return
    assert isinstance(out, list) and all(isinstance(e, Event) for e in out)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values | event_like | st.lists(event_like, max_size=3))
def test_arbitrary_json_only_raises_event_error(value):
    _only_event_error(json.dumps(value).encode())


@settings(deadline=None)  # correctness, not speed: a loaded shared machine misses deadlines
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_event_error(raw):
    _only_event_error(raw)


@settings(deadline=None)  # correctness, not speed: a loaded shared machine misses deadlines
@given(events(), st.data())
def test_event_with_bytes_flipped_only_raises_event_error(e, data):
    raw = bytearray(e.to_json())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    _only_event_error(bytes(raw))


INT_FIELDS = {"user_id", "ts", "item_id", "age_bucket", "advertiser_id", "category", "hour"}
STR_FIELDS = {"event_id", "surface", "kind", "request_id", "country", "device", "ad_format"}
PROB_FIELDS = {"p_click", "p_conversion"}
containers = st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
WRONG = {
    **{f: st.text() | st.floats() | st.booleans() | containers for f in INT_FIELDS},
    **{f: st.integers() | st.floats() | st.booleans() | containers for f in STR_FIELDS},
    **{f: st.text() | st.booleans() | containers for f in PROB_FIELDS},
    "is_ad": st.integers() | st.floats() | st.text() | containers,
}
assert WRONG.keys() == set(FIELDS)


@settings(deadline=None)  # correctness, not speed: a loaded shared machine misses deadlines
@given(events(), st.sampled_from(FIELDS), st.data())
def test_one_wrong_typed_field_is_rejected(e, field, data):
    d = e.to_dict()
    d[field] = data.draw(WRONG[field], label=field)
    with pytest.raises(EventError) as ei:
        check(d)
    assert ei.value.reason == "bad_type"
    assert field in ei.value.message
    with pytest.raises(EventError) as ei:
        parse_json(json.dumps(d).encode(), now_ms=NOW)
    assert ei.value.reason == "bad_type"
