"""The opengem event: one schema for producers, the stream worker and tests.

An event is one user action on one surface, ads or organic. On the wire it is
JSON, one object per Kafka record (any producer can send that), a JSON array of
objects, or a columnar batch (Arrow IPC stream, see :mod:`opengem.stream.codec`)
written by opengem's own producer and the simulator.

Fields (ARCHITECTURE.md):

==============  ========  ======================================================
field           type      rule
==============  ========  ======================================================
event_id        str       required, 1..64 printable ASCII chars; unique
user_id         int       required, 0 <= id < 2**63 (replay hashes string ids)
ts              int       required, ms since epoch, >= 2000-01-01 and not more
                          than ``max_future_ms`` after the validator's clock
surface         str       required, one of the configured surfaces
kind            str       required, one of :data:`KINDS`
item_id         int       required, 0 <= id < 2**63 (ad or organic content)
is_ad           bool      required; true exactly for ad kinds
request_id      str|None  required (1..64 chars) for ad kinds, absent/null for
                          organic kinds; links click/conversion to impression
age_bucket      int|None  0..7
country         str|None  two upper-case letters (ISO 3166-1 alpha-2 style)
device          str|None  one of :data:`DEVICES`
ad_format       str|None  one of :data:`AD_FORMATS` (ad kinds only)
advertiser_id   int|None  0 <= id < 2**63 (ad kinds only)
category        int|None  0 <= c < 2**31 (content / ad category)
hour            int|None  0..23, local hour of the user
p_click         float     simulator ground truth on impressions: true P(click)
p_conversion    float     simulator ground truth on impressions: true
                          P(conversion | impression). Never a model feature.
==============  ========  ======================================================

Unknown fields are rejected (a typo should not silently drop an attribute).
:func:`validate` returns an :class:`Event` or raises :class:`EventError` whose
``reason`` is a short machine-readable code (used as a metric label and in the
dead-letter record) and whose message says precisely what was wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

AD_KINDS = ("impression", "click", "conversion")
ORGANIC_KINDS = ("view", "like", "share", "comment", "follow")
KINDS = AD_KINDS + ORGANIC_KINDS
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}

DEFAULT_SURFACES = ("feed", "stories", "reels", "messaging")
DEVICES = ("ios", "android", "web", "other")
AD_FORMATS = ("image", "video", "carousel", "collection")

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
DEFAULT_MAX_FUTURE_MS = 24 * 3600 * 1000  # clock skew tolerated
MAX_ID = 2**63 - 1
MAX_STR = 64
MAX_RECORD_BYTES = 1 << 20  # a single JSON record larger than this is rejected


class EventError(ValueError):
    """A record that is not a valid event. ``reason`` is a low-cardinality code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: int
    ts: int
    surface: str
    kind: str
    item_id: int
    is_ad: bool
    request_id: str | None = None
    age_bucket: int | None = None
    country: str | None = None
    device: str | None = None
    ad_format: str | None = None
    advertiser_id: int | None = None
    category: int | None = None
    hour: int | None = None
    p_click: float | None = None
    p_conversion: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, without the optional fields that are None."""
        return {k: v for k in FIELDS if (v := getattr(self, k)) is not None}

    def to_json(self) -> bytes:
        return _json_encode(self.to_dict()).encode()


FIELDS = tuple(f.name for f in dataclasses.fields(Event))
_json_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
REQUIRED = ("event_id", "user_id", "ts", "surface", "kind", "item_id", "is_ad")
_FIELD_SET = frozenset(FIELDS)


def _int(d: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool) -> int | None:
    v = d.get(name)
    if v is None:
        if required:
            raise EventError("missing_field", f"{name} is required")
        return None
    # bool is a subclass of int in Python; JSON true is not an id.
    if isinstance(v, bool) or not isinstance(v, int):
        raise EventError("bad_type", f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise EventError("out_of_range", f"{name}={v} outside [{lo}, {hi}]")
    return v


def _str(d: Mapping[str, Any], name: str, *, required: bool, choices: Iterable[str] | None = None) -> str | None:
    v = d.get(name)
    if v is None:
        if required:
            raise EventError("missing_field", f"{name} is required")
        return None
    if not isinstance(v, str):
        raise EventError("bad_type", f"{name} must be a string, got {type(v).__name__}")
    if not 1 <= len(v) <= MAX_STR:
        raise EventError("out_of_range", f"{name} must have 1..{MAX_STR} characters, got {len(v)}")
    if not (v.isascii() and v.isprintable()):
        raise EventError("bad_value", f"{name} must be printable ASCII")
    if choices is not None and v not in choices:
        raise EventError("unknown_value", f"{name}={v!r} not one of {sorted(choices)}")
    return v


def _prob(d: Mapping[str, Any], name: str) -> float | None:
    v = d.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EventError("bad_type", f"{name} must be a number, got {type(v).__name__}")
    # An int is compared exactly: math.isfinite(10**400) would raise OverflowError.
    if not (0 <= v <= 1 if isinstance(v, int) else math.isfinite(v) and 0.0 <= v <= 1.0):
        raise EventError("out_of_range", f"{name}={v} is not a probability")
    return float(v)


def validate(
    d: Any,
    *,
    surfaces: Iterable[str] = DEFAULT_SURFACES,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> Event:
    """Check one decoded JSON value and return the :class:`Event`.

    ``surfaces``: the configured surfaces. ``now_ms``: the validator's clock
    (default: wall clock); ``ts`` may not exceed ``now_ms + max_future_ms``.
    Raises :class:`EventError` with a precise reason on the first problem.
    """
    if not isinstance(d, dict):
        raise EventError("not_an_object", f"event must be a JSON object, got {type(d).__name__}")
    unknown = d.keys() - _FIELD_SET
    if unknown:
        raise EventError("unknown_field", f"unknown fields {sorted(map(str, unknown))[:5]}")
    event_id = _str(d, "event_id", required=True)
    user_id = _int(d, "user_id", 0, MAX_ID, required=True)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    ts = _int(d, "ts", MIN_TS_MS, MAX_ID, required=True)
    if ts > now + max_future_ms:
        raise EventError("future_ts", f"ts={ts} is {(ts - now) / 3.6e6:.1f} h ahead of the clock (max {max_future_ms / 3.6e6:.1f} h)")
    surface = _str(d, "surface", required=True, choices=frozenset(surfaces))
    kind = _str(d, "kind", required=True, choices=KIND_INDEX)
    item_id = _int(d, "item_id", 0, MAX_ID, required=True)
    is_ad = d.get("is_ad")
    if is_ad is None:
        raise EventError("missing_field", "is_ad is required")
    if not isinstance(is_ad, bool):
        raise EventError("bad_type", f"is_ad must be a boolean, got {type(is_ad).__name__}")
    ad_kind = kind in AD_KINDS
    if is_ad != ad_kind:
        raise EventError("inconsistent", f"kind={kind!r} requires is_ad={ad_kind}")
    request_id = _str(d, "request_id", required=ad_kind)
    if not ad_kind and request_id is not None:
        raise EventError("inconsistent", f"organic kind {kind!r} must not carry request_id")
    ad_format = _str(d, "ad_format", required=False, choices=AD_FORMATS)
    advertiser_id = _int(d, "advertiser_id", 0, MAX_ID, required=False)
    if not ad_kind and (ad_format is not None or advertiser_id is not None):
        raise EventError("inconsistent", f"organic kind {kind!r} must not carry ad attributes")
    country = _str(d, "country", required=False)
    if country is not None and not (len(country) == 2 and country.isalpha() and country.isupper()):
        raise EventError("bad_value", f"country={country!r} must be two upper-case letters")
    p_click = _prob(d, "p_click")
    p_conversion = _prob(d, "p_conversion")
    if (p_click is not None or p_conversion is not None) and kind != "impression":
        raise EventError("inconsistent", "p_click / p_conversion belong on impressions only")
    return Event(
        event_id=event_id,
        user_id=user_id,
        ts=ts,
        surface=surface,
        kind=kind,
        item_id=item_id,
        is_ad=is_ad,
        request_id=request_id,
        age_bucket=_int(d, "age_bucket", 0, 7, required=False),
        country=country,
        device=_str(d, "device", required=False, choices=DEVICES),
        ad_format=ad_format,
        advertiser_id=advertiser_id,
        category=_int(d, "category", 0, 2**31 - 1, required=False),
        hour=_int(d, "hour", 0, 23, required=False),
        p_click=p_click,
        p_conversion=p_conversion,
    )


def parse_json(raw: bytes | str, **kw: Any) -> list[Event]:
    """Decode one JSON record (an object or an array of objects) and validate it.

    All-or-nothing: if any element is invalid the whole record is rejected, so a
    dead-lettered record can be replayed as it is once fixed. Raises EventError.
    """
    if len(raw) > MAX_RECORD_BYTES:
        raise EventError("too_large", f"record of {len(raw)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        obj = json.loads(raw)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and the int-digits
    # limit of Python >= 3.11 ("Exceeds the limit (4300 digits)...").
    except (ValueError, RecursionError) as e:
        raise EventError("bad_json", f"not JSON: {str(e)[:120]}") from None
    if isinstance(obj, list):
        if not obj:
            raise EventError("empty_batch", "empty JSON array")
        out = []
        for i, o in enumerate(obj):
            try:
                out.append(validate(o, **kw))
            except EventError as e:
                raise EventError(e.reason, f"element {i}: {e.message}") from None
        return out
    return [validate(obj, **kw)]
