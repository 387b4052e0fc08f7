"""The online label joiner: impressions + clicks + conversions -> labelled examples.

Every impression waits, in its Kafka partition's *event time*, for its click
and conversion (matched by ``request_id``):

* click window, from the impression: a click with
  ``click.ts <= impression.ts + click_window_ms`` labels ``click = 1``;
* conversion window, from the click (post-click attribution): a conversion
  with ``click.ts <= conversion.ts <= click.ts + conversion_window_ms`` labels
  ``conversion = 1``. A conversion that never matched a click is counted as
  ``unattributed_conversion`` and labels nothing.

Watermark and closing. Per partition, ``watermark = max event ts seen -
allowed_lateness_ms`` (every event counts, organic ones too). An open
impression has a *deadline*: ``impression.ts + click_window_ms`` while it has
no click, ``click.ts + conversion_window_ms`` once clicked; it closes as soon
as ``watermark >= deadline``, or at once when its conversion is attributed
(nothing is left to wait for). Closing emits one :class:`Example`. Events are
applied one at a time, and after each one every due impression closes, so the
result never depends on how records are batched.

Everything else is counted (:meth:`LabelJoiner.counters`), never dropped
silently:

=========================  ====================================================
counter                    meaning
=========================  ====================================================
impressions                distinct impressions accepted (= examples + pending)
examples                   closed impressions (one example each)
clicks / conversions       attributed ones (they set a label)
duplicate_impression       request_id already pending or recently closed
duplicate_click            a second click for an impression (counts once)
duplicate_conversion       a second conversion for an impression
click_outside_window       click later than the click window (label stays 0)
conversion_outside_window  conversion later than the conversion window
unattributed_conversion    conversion with no matching click
late_click                 in-window click for an impression whose example was emitted
late_conversion            in-window conversion (after a click, late or not) whose
                           example was emitted
orphan_click               click whose impression was never seen
orphan_conversion          conversion whose impression was never seen
missing_request_id         ad event without request_id (the validator forbids it)
=========================  ====================================================

Late vs orphan: closed request_ids leave a *tombstone* for
``tombstone_retention_ms`` of event time (default 2x the longest window),
then are garbage-collected. A click or conversion that matches neither an open
impression nor a tombstone waits in a small *early* buffer until the watermark
passes its own ts (its impression, which cannot be later than it, might still
arrive out of order within the allowed lateness); if the impression does not
come by then it is an orphan.

Durability and exactly-once effect (the worker's contract)::

    j = LabelJoiner("/data/joiner-0")          # RocksDB, one per worker or per shard
    start = j.applied_offset(p)                 # resume consuming partition p at start + 1
    for rec in records_of_partition_p:          # one record, or a batch ending at rec.offset
        j.process(p, rec.offset, rec.events)    # atomic; offset <= applied_offset(p): no-op
        for ex in j.outbox(p):                  # closed, not yet known to be produced
            produce("opengem.examples", key=ex.example_id, value=ex.to_json())
        (after the producer's acks) j.ack(ids)  # removes them from the outbox
        commit Kafka offset rec.offset + 1      # optional: applied_offset is the truth

Each :meth:`LabelJoiner.process` call writes one RocksDB ``WriteBatch``
holding everything it changed -- open impressions, tombstones, the early
buffer, the partition's counters and watermark, the outbox of newly closed
examples and the partition's applied offset -- synced to the WAL by default
(``JoinerConfig.sync``). After a crash at any point the joiner is exactly at
the end of some record it knows (``applied_offset``); replaying older records
is a no-op, so the worker may resume from the consumer group's committed
offset or from ``applied_offset + 1``. On start the worker re-produces
whatever is still in the outbox: example production is at-least-once of a
deterministic set, and consumers dedup by ``example_id`` (= request_id).

Memory: the open impressions of a partition (a few per ad impression and click
window, plus clicked ones for the conversion window) live in a dict and a
deadline heap, loaded from RocksDB on first use of the partition after a
restart; RocksDB holds the durable copy. Tombstones live only in RocksDB (one
multi-get per call for the impressions, a get per unmatched click /
conversion), so a long retention costs disk, not RAM.

Key layout (raw bytes, ``<p>`` = partition in decimal, ``<rid>`` = request_id)::

    M                       {"format": 2}
    S/<p>                   JSON {"offset", "max_ts", "counters"}
    P/<p>/<rid>             open impression: <Bqq (2, click ts, held conversion ts) + the impression's
                            attributes (:data:`_NUM` + length-prefixed surface, ad_format, country, device)
    E/<p>/<rid>             early buffer: JSON [[kind, ts], ...]
    B/<p>/<seq be64>        outbox: the examples one process() call closed, each as <II (length of rid,
                            of value) + rid + value; value: <Bqq (2, click ts, conversion ts) + the
                            impression's attributes (absent values: ts -2**63, ints -1, floats NaN,
                            strings length 255). ack() deletes a box once all of its examples are acked,
                            and rewrites it without the acked ones when only some are.
    O/<p>/<rid>             outbox of format 2 (one key per example, same value): still read and acked
    T/<p>/<rid>             tombstone: <Bqq flags (clicked, converted, late click), impression ts, click ts or -1
    X/<p>/<expire be64><rid>  tombstone expiry index (range-deleted by the GC)

Format 1 (JSON open impressions and outbox values) is still read: a value's
first byte tells the two apart (``[`` / ``{`` vs 2). Format 2 kept the outbox one
key per example (``O/``): a put at close and a delete at ack for every example,
the joiner's largest share of RocksDB writes; format 3 writes one box per call.
Both are read, new entries are written as format 3, and the store is marked
format 3 on open (an older version then refuses it rather than miss the boxes).
"""

from __future__ import annotations

import heapq
import json
import operator
import os
import struct
from dataclasses import MISSING, dataclass, fields
from json.encoder import encode_basestring_ascii as _esc
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from opengem.stream.events import Event

FORMAT_VERSION = 3
_READABLE_FORMATS = (1, 2, 3)
_MIN = 60_000
_HOUR = 60 * _MIN


@dataclass(frozen=True)
class JoinerConfig:
    # Click attribution window from the impression; clicks come within seconds to minutes.
    click_window_ms: int = 30 * _MIN
    # Post-click conversion window, the industry-standard 1-day click-through attribution.
    conversion_window_ms: int = 24 * _HOUR
    # Watermark = max ts seen - this: events are mostly ts-ordered within a partition.
    allowed_lateness_ms: int = 60_000
    # Tombstones of closed request_ids are kept this long in event time (None: 2x the longest window).
    tombstone_retention_ms: int | None = None
    # Tombstone garbage collection runs at most once per this much event time.
    gc_interval_ms: int = 60_000
    # fsync the WAL on every process() call, so the worker may commit Kafka offsets right after.
    sync: bool = True

    def __post_init__(self) -> None:
        for name in ("click_window_ms", "conversion_window_ms", "allowed_lateness_ms", "gc_interval_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.tombstone_retention_ms is not None and self.tombstone_retention_ms < 0:
            raise ValueError("tombstone_retention_ms must be >= 0")

    @property
    def retention_ms(self) -> int:
        if self.tombstone_retention_ms is not None:
            return self.tombstone_retention_ms
        return 2 * max(self.click_window_ms, self.conversion_window_ms)


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled impression, the value of an ``opengem.examples`` record."""

    request_id: str
    ts: int  # the impression's event time (ms)
    surface: str
    user_id: int
    item_id: int
    advertiser_id: int | None
    ad_format: str | None
    category: int | None
    age_bucket: int | None
    country: str | None
    device: str | None
    hour: int | None
    click: int  # 0/1
    conversion: int  # 0/1 (post-click, within the conversion window)
    click_ts: int | None
    conversion_ts: int | None
    # Simulator ground truth, for oracle evaluation only -- never a model feature.
    p_click: float | None = None
    p_conversion: float | None = None

    @property
    def example_id(self) -> str:
        return self.request_id

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(EXAMPLE_FIELDS, _example_values(self)))

    def to_json(self) -> bytes:
        """The JSON object (all fields, None as null): byte for byte what ``json.dumps(self.to_dict(),
        separators=(",", ":"))`` gives, through one %-format (~2.5x faster: examples are encoded per batch)."""
        try:
            return (_EXAMPLE_FMT % (
                _rid(self.request_id), _num(self.ts), _str(self.surface), _num(self.user_id), _num(self.item_id),
                _num(self.advertiser_id), _str(self.ad_format), _num(self.category), _num(self.age_bucket),
                _str(self.country), _str(self.device), _num(self.hour), _num(self.click), _num(self.conversion),
                _num(self.click_ts), _num(self.conversion_ts), _num(self.p_click), _num(self.p_conversion),
            )).encode()
        except _SlowPath:
            return _enc(self.to_dict()).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Example":
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("example must be a JSON object")
        unknown = d.keys() - _EXAMPLE_SET
        if unknown:
            raise ValueError(f"unknown example fields {sorted(unknown)}")
        return cls(**d)


def encode_example_records(examples: Sequence[Example], max_bytes: int = 512 << 10) -> list[bytes]:
    """Examples as JSON-array records of at most ~``max_bytes`` each (Kafka's default
    message limit is 1 MiB; one example is ~400 bytes)."""
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 2
    for ex in examples:
        j = ex.to_json()
        if cur and size + len(j) + 1 > max_bytes:
            out.append(b"[" + b",".join(cur) + b"]")
            cur, size = [], 2
        cur.append(j)
        size += len(j) + 1
    if cur:
        out.append(b"[" + b",".join(cur) + b"]")
    return out


def encode_example_batches(examples: Sequence[Example], max_bytes: int = 512 << 10) -> list[bytes]:
    """Examples as Arrow IPC stream records (:func:`example_schema`, one RecordBatch each) of
    at most ~``max_bytes``: what the worker sends by default (``WorkerConfig.examples_format``).

    Measured on 128k examples: 0.27 s and 15 MB against the JSON arrays' 0.60 s and 43 MB
    (:func:`encode_example_records`), and the consumers decode them without a JSON parse.
    Values Arrow's column types refuse (a bool label, a str where an int belongs) make the
    whole call fall back to JSON records, whose encoder names the bad value.
    """
    import pyarrow as pa

    if not examples:
        return []
    schema = example_schema()
    try:
        cols = zip(*map(_example_values, examples))
        arrays = [pa.array(c, type=f.type.value_type).dictionary_encode() if pa.types.is_dictionary(f.type)
                  else pa.array(c, type=f.type) for f, c in zip(schema, cols)]
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return encode_example_records(examples, max_bytes)
    rb = pa.RecordBatch.from_arrays(arrays, schema=schema)
    rows = max(1, max_bytes // 160)  # ~120 bytes per example in IPC (int64 columns, dictionaries per record)
    out = []
    for start in range(0, rb.num_rows, rows):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            w.write_batch(rb.slice(start, rows))
        out.append(sink.getvalue().to_pybytes())
    return out


def example_schema() -> Any:
    """The Arrow schema of an examples record: one column per :class:`Example` field, in order;
    ints as int64 whatever their range, the four low-cardinality strings dictionary-encoded."""
    global _EXAMPLE_SCHEMA
    if _EXAMPLE_SCHEMA is None:
        import pyarrow as pa

        t = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
        dict_str = pa.dictionary(pa.int32(), pa.string())
        _EXAMPLE_SCHEMA = pa.schema(
            [(f, dict_str if f in ("surface", "ad_format", "country", "device") else t[_FIELD_KIND[f]])
             for f in EXAMPLE_FIELDS])
    return _EXAMPLE_SCHEMA


_EXAMPLE_SCHEMA = None


def _column_fits(name: str, t: Any) -> bool:
    """Whether an examples record's column of Arrow type ``t`` reads as field ``name``'s values
    (any int width for ints, ints for floats, plain or dictionary strings, all-null where None is allowed)."""
    import pyarrow as pa

    kind = _FIELD_KIND[name]
    if pa.types.is_null(t):
        return _FIELD_OPTIONAL[name]
    if pa.types.is_dictionary(t):
        t = t.value_type
    if kind == "str":
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if kind == "float":
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    return pa.types.is_integer(t)


def _decode_example_batches(raw: bytes) -> list[Example]:
    import pyarrow as pa

    from opengem.stream.codec import _pylist

    out: list[Example] = []
    try:
        reader = pa.ipc.open_stream(raw)
        batches = list(reader)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"examples record is not a readable Arrow IPC stream: {e}") from None
    names = reader.schema.names
    unknown = set(names) - _EXAMPLE_SET
    if unknown:
        raise ValueError(f"unknown example fields {sorted(unknown)}")
    missing = [f for f in _EXAMPLE_REQUIRED if f not in names]
    if missing:
        raise ValueError(f"examples record lacks the fields {missing}")
    bad = [f"{f.name}: {f.type}" for f in reader.schema if not _column_fits(f.name, f.type)]
    if bad:
        raise ValueError(f"examples record has columns of the wrong type ({', '.join(bad)})")
    for rb in batches:
        n = rb.num_rows
        cols = [_pylist(rb.column(names.index(f))) if f in names else [None] * n for f in EXAMPLE_FIELDS]
        out.extend(map(_new_example, zip(*cols)))
    return out


def decode_examples(raw: bytes | str) -> list[Example]:
    """An ``opengem.examples`` record: one JSON example object, a JSON array of them, or an
    Arrow IPC stream of them (:func:`encode_example_batches`; told apart by its first bytes)."""
    from opengem.stream.codec import ARROW_MAGIC

    if isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:4]) == ARROW_MAGIC:
        return _decode_example_batches(bytes(raw))
    d = json.loads(raw)
    items = d if isinstance(d, list) else [d]
    out = []
    for x in items:
        if not isinstance(x, dict):
            raise ValueError("example must be a JSON object")
        unknown = x.keys() - _EXAMPLE_SET
        if unknown:
            raise ValueError(f"unknown example fields {sorted(unknown)}")
        out.append(Example(**x))
    return out


EXAMPLE_FIELDS = tuple(f.name for f in fields(Example))
_EXAMPLE_SET = frozenset(EXAMPLE_FIELDS)
_EXAMPLE_REQUIRED = tuple(f.name for f in fields(Example) if f.default is MISSING)
# Each field's value type ("int", "float", "str") and whether it may be None, from its annotation.
_FIELD_KIND = {f.name: str(f.type).split(" ")[0] for f in fields(Example)}
_FIELD_OPTIONAL = {f.name: "None" in str(f.type) for f in fields(Example)}
_example_values = operator.attrgetter(*EXAMPLE_FIELDS)
_enc = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_EXAMPLE_FMT = "{" + ",".join(f"{_enc(f)}:%s" for f in EXAMPLE_FIELDS) + "}"
# Example(*values) without the frozen dataclass's __init__ (one object.__setattr__ per field):
# the slots' descriptors set directly, ~2.5x faster; the joiner makes one per impression.
_EXAMPLE_SETTERS = tuple(Example.__dict__[f].__set__ for f in EXAMPLE_FIELDS)


def _new_example(values: Iterable[Any]) -> Example:
    e = object.__new__(Example)
    for s, v in zip(_EXAMPLE_SETTERS, values):
        s(e, v)
    return e


class _SlowPath(Exception):
    """A value the %-format of Example.to_json does not write exactly as json does."""


_STR_JSON: dict[str | None, str] = {None: "null"}
_INF = float("inf")


def _str(v: Any) -> str:
    """A str (or None) field as json writes it (small cache: surfaces, formats, countries, devices)."""
    r = _STR_JSON.get(v) if type(v) is str or v is None else None
    if r is None:
        if type(v) is not str:
            raise _SlowPath
        r = _enc(v)
        if len(_STR_JSON) < 4096 and len(v) <= 16:
            _STR_JSON[v] = r
    return r


def _rid(v: Any) -> str:
    if type(v) is not str:
        raise _SlowPath
    return _esc(v)


def _num(v: Any) -> str:
    """An int / float (or None) field as json writes it."""
    t = type(v)
    if t is int:
        return int.__repr__(v)
    if v is None:
        return "null"
    if t is float and -_INF < v < _INF:
        return float.__repr__(v)
    raise _SlowPath
_BE8 = struct.Struct(">Q")
_BOX_ENTRY = struct.Struct("<II")  # an outbox box's entry: length of the rid, of the value
_NO_TS = -(2**62)  # max_ts of a partition that has seen no event

COUNTERS = (
    "impressions", "examples", "clicks", "conversions",
    "duplicate_impression", "duplicate_click", "duplicate_conversion",
    "click_outside_window", "conversion_outside_window", "unattributed_conversion",
    "late_click", "late_conversion", "orphan_click", "orphan_conversion", "missing_request_id",
)

# Tombstone: flags, impression ts, click ts (-1: none). Flags:
_CLICKED, _CONVERTED, _LATE_CLICK = 1, 2, 4
_TOMB = struct.Struct("<Bqq")


# Packed values (format 2). An impression's attributes, written once when it opens:
# ts, user_id, item_id, advertiser_id (-1: none), category (-1), age_bucket (-1), hour (-1),
# p_click, p_conversion (NaN: none), then surface, ad_format, country, device, each a length
# byte (255: none) + UTF-8.
_NUM = struct.Struct("<qqqqqbbdd")
# The same record as a numpy dtype (packed, no padding), to pack a batch's impressions at once;
# the event columns in its order, with the value written for a null.
_NUM_DT = np.dtype([("ts", "<i8"), ("user", "<i8"), ("item", "<i8"), ("adv", "<i8"), ("cat", "<i8"),
                    ("age", "i1"), ("hour", "i1"), ("pc", "<f8"), ("pv", "<f8")])
assert _NUM_DT.itemsize == _NUM.size
_NUM_COLUMNS = (("ts", "ts", 0), ("user_id", "user", 0), ("item_id", "item", 0), ("advertiser_id", "adv", -1),
                ("category", "cat", -1), ("age_bucket", "age", -1), ("hour", "hour", -1),
                ("p_click", "pc", float("nan")), ("p_conversion", "pv", float("nan")))
_HDR = struct.Struct("<Bqq")  # 2, then P: click ts, held conversion ts; O: click ts, conversion ts
_V2 = 2
_NONE_TS = -(2**63)
_NAN = float("nan")
_STRS_ENC: dict[tuple, bytes] = {}
_STRS_DEC: dict[bytes, tuple] = {}


def _enc_strs(key: tuple) -> bytes:
    """(surface, ad_format, country, device) -> length-prefixed bytes (cached: few distinct)."""
    b = _STRS_ENC.get(key)
    if b is None:
        parts = []
        for v in key:
            if v is None:
                parts.append(b"\xff")
            else:
                raw = v.encode()
                if len(raw) >= 255:
                    raise ValueError(f"string attribute too long for the joiner: {v[:40]!r}...")
                parts.append(bytes([len(raw)]) + raw)
        b = b"".join(parts)
        if len(_STRS_ENC) < 65536:
            _STRS_ENC[key] = b
    return b


def _dec_strs(b: bytes) -> tuple:
    t = _STRS_DEC.get(b)
    if t is None:
        out, i = [], 0
        for _ in range(4):
            n = b[i]
            if n == 255:
                out.append(None)
                i += 1
            else:
                out.append(b[i + 1 : i + 1 + n].decode())
                i += 1 + n
        t = tuple(out)
        if len(_STRS_DEC) < 65536:
            _STRS_DEC[b] = t
    return t


def _opt(v: int | None) -> int:
    return -1 if v is None else v


def _pack_attrs(ts: int, user: int, item: int, adv: int | None, cat: int | None, age: int | None,
                hour: int | None, pc: float | None, pv: float | None, surface: str, fmt: str | None,
                country: str | None, device: str | None) -> bytes:
    return _NUM.pack(ts, user, item, _opt(adv), _opt(cat), _opt(age), _opt(hour),
                     _NAN if pc is None else pc, _NAN if pv is None else pv) + \
        _enc_strs((surface, fmt, country, device))


def _event_attrs(e: Event) -> bytes:
    return _pack_attrs(e.ts, e.user_id, e.item_id, e.advertiser_id, e.category, e.age_bucket, e.hour,
                       e.p_click, e.p_conversion, e.surface, e.ad_format, e.country, e.device)


def _example(rid: str, attrs: bytes, click_ts: int | None, conversion_ts: int | None) -> Example:
    ts, user, item, adv, cat, age, hour, pc, pv = _NUM.unpack_from(attrs)
    surface, fmt, country, device = _dec_strs(attrs[_NUM.size:])
    return _new_example((rid, ts, surface, user, item, None if adv < 0 else adv, fmt, None if cat < 0 else cat,
                         None if age < 0 else age, country, device, None if hour < 0 else hour,
                         0 if click_ts is None else 1, 0 if conversion_ts is None else 1, click_ts, conversion_ts,
                         None if pc != pc else pc, None if pv != pv else pv))


def _ts_or_none(v: int) -> int | None:
    return None if v == _NONE_TS else v


def _ts_or_sentinel(v: int | None) -> int:
    return _NONE_TS if v is None else v


class _Open:
    """An open impression: its ts, packed attributes and what it has seen so far."""

    __slots__ = ("ts", "attrs", "click_ts", "held_conv", "deadline")

    def __init__(self, ts: int, attrs: bytes, click_ts: int | None, held_conv: int | None, deadline: int):
        self.ts = ts
        self.attrs = attrs
        self.click_ts = click_ts
        self.held_conv = held_conv  # ts of a conversion seen before any click, not yet attributed
        self.deadline = deadline

    def encode(self) -> bytes:
        if self.click_ts is None and self.held_conv is None:
            return _HDR_FRESH + self.attrs
        return _HDR.pack(_V2, _ts_or_sentinel(self.click_ts), _ts_or_sentinel(self.held_conv)) + self.attrs


_HDR_FRESH = _HDR.pack(_V2, _NONE_TS, _NONE_TS)  # no click, no held conversion / no labels


def _decode_open(v: bytes) -> tuple[int, bytes, int | None, int | None]:
    """A P value -> (ts, attrs, click_ts, held_conv); format 1 (JSON) too."""
    if v[0] == _V2:
        _, c, h = _HDR.unpack_from(v)
        attrs = v[_HDR.size:]
        return _NUM.unpack_from(attrs)[0], attrs, _ts_or_none(c), _ts_or_none(h)
    vals, click_ts, held = json.loads(v)
    ev = Event(*vals)
    return ev.ts, _event_attrs(ev), click_ts, held


def _decode_outbox(rid: str, v: bytes) -> Example:
    if v[0] == _V2:
        _, c, conv = _HDR.unpack_from(v)
        return _example(rid, v[_HDR.size:], _ts_or_none(c), _ts_or_none(conv))
    return Example.from_json(v)


class _AdColumns:
    """The joiner's view of a run of events: kind, request_id and ts per event, plus the
    packed attributes of each impression (None for the other kinds)."""

    __slots__ = ("kinds", "rids", "ts", "attrs")

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.rids: list[str | None] = []
        self.ts: list[int] = []
        self.attrs: list[bytes | None] = []

    def add(self, events: Any) -> "_AdColumns":
        """``events``: a sequence of Events, or a validated event RecordBatch (:mod:`opengem.stream.codec`)."""
        import pyarrow as pa

        if isinstance(events, pa.Table):
            for rb in events.to_batches():
                self._add_batch(rb)
            return self
        if isinstance(events, pa.RecordBatch):
            self._add_batch(events)
            return self
        kinds, rids, tss, attrs = self.kinds, self.rids, self.ts, self.attrs
        for e in events:
            k = e.kind
            rid = e.request_id
            ts = e.ts
            a = _event_attrs(e) if k == "impression" else None
            kinds.append(k)
            rids.append(rid)
            tss.append(ts)
            attrs.append(a)
        return self

    def _add_batch(self, batch: Any) -> None:
        import pyarrow as pa

        from opengem.stream.codec import _ints, _pylist

        if batch.num_rows == 0:
            return
        col = lambda b, name: b.column(b.schema.get_field_index(name))  # noqa: E731
        kinds = _pylist(col(batch, "kind"))
        n = len(kinds)
        imp = [i for i, k in enumerate(kinds) if k == "impression"]
        attrs: list[bytes | None] = [None] * n
        if imp:
            sub = batch.take(pa.array(imp, pa.int64())) if len(imp) < n else batch
            # The numeric part of every impression's attributes in one array of _NUM records
            # (what _pack_attrs packs one by one), then the cached string part per row.
            num = np.empty(len(imp), _NUM_DT)
            for name, field, none in _NUM_COLUMNS:
                values, null = _ints(col(sub, name))
                num[field] = values
                if null.any():
                    num[field][null] = none
            raw = num.tobytes()
            S = _NUM.size
            enc = _enc_strs
            strs = zip(*(_pylist(col(sub, name)) for name in ("surface", "ad_format", "country", "device")))
            for j, (i, key) in enumerate(zip(imp, strs)):
                attrs[i] = raw[j * S:(j + 1) * S] + enc(key)
        self.kinds += kinds
        self.rids += _pylist(col(batch, "request_id"))
        self.ts += _pylist(col(batch, "ts"))
        self.attrs += attrs


class _Partition:
    """In-memory state of one partition (a cache of what RocksDB holds durably)."""

    def __init__(self, p: int):
        self.p = p
        pb = str(p).encode()
        self.k_state = b"S/" + pb
        self.k_open = b"P/" + pb + b"/"
        self.k_early = b"E/" + pb + b"/"
        self.k_out = b"O/" + pb + b"/"
        self.k_box = b"B/" + pb + b"/"
        self.k_tomb = b"T/" + pb + b"/"
        self.k_exp = b"X/" + pb + b"/"
        self.offset: int | None = None
        self.max_ts = _NO_TS
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.open: dict[str, _Open] = {}
        self.heap: list[tuple[int, str]] = []  # (deadline, rid); stale entries skipped
        self.early: dict[str, list[list]] = {}  # rid -> [[kind, ts], ...]
        self.early_heap: list[tuple[int, str]] = []  # (ts, rid)
        self.outbox: dict[str, Example] = {}
        # The outbox on disk: box seq -> {rid: its encoded entry}; rid -> box seq (-1: an O/ key).
        self.boxes: dict[int, dict[str, bytes]] = {}
        self.box_of: dict[str, int] = {}
        self.next_box = 0
        self.next_gc = -(2**62)
        self.gc_from = 0  # tombstone expiries below this were collected in this process


def _decode_box(v: bytes) -> list[tuple[str, bytes, bytes]]:
    """An outbox box -> (rid, outbox value, the entry's bytes) per example."""
    out, i, n = [], 0, len(v)
    H = _BOX_ENTRY.size
    while i < n:
        a, b = _BOX_ENTRY.unpack_from(v, i)
        j = i + H + a
        out.append((v[i + H:j].decode(), v[j:j + b], v[i:j + b]))
        i = j + b
    if i != n:
        raise ValueError("joiner state corrupt: an outbox box ends inside an entry")
    return out


def _box(part: _Partition, entries: list[tuple[str, bytes]], wb: WriteBatch) -> None:
    """Put the examples one call closed into a new box (in ``wb``; memory follows at once --
    the caller drops the partition's memory if the write fails)."""
    if not entries:
        return
    box = dict(entries)
    stale = [rid for rid in box if rid in part.box_of]  # a request_id closed again while still unacked
    if stale:
        _unbox(part, stale, wb)
    seq = part.next_box
    part.next_box += 1
    wb.put(part.k_box + _BE8.pack(seq), b"".join(box.values()))
    part.boxes[seq] = box
    for rid in box:
        part.box_of[rid] = seq


def _unbox(part: _Partition, rids: Iterable[str], wb: WriteBatch) -> None:
    """Take ``rids`` out of the outbox on disk (in ``wb``): O/ keys deleted, boxes deleted once
    empty, else rewritten with the rest. The boxes in memory follow at once."""
    touched: set[int] = set()
    for rid in rids:
        seq = part.box_of.pop(rid, None)
        if seq is None:
            continue
        if seq < 0:
            wb.delete(part.k_out + rid.encode())
        else:
            del part.boxes[seq][rid]
            touched.add(seq)
    for seq in touched:
        key = part.k_box + _BE8.pack(seq)
        rest = part.boxes[seq]
        if rest:
            wb.put(key, b"".join(rest.values()))
        else:
            del part.boxes[seq]
            wb.delete(key)


def _iter_prefix(db: Rdict, prefix: bytes, start: bytes | None = None) -> Iterable[tuple[bytes, bytes]]:
    it = db.iter()
    it.seek(start or prefix)
    while it.valid():
        k = it.key()
        if not k.startswith(prefix):
            break
        yield k, it.value()
        it.next()


class LabelJoiner:
    """Joins one worker's partitions; state in the RocksDB at ``path``.

    One process, one thread: RocksDB locks ``path`` and the in-memory caches assume a single writer.

    ``process(partition, offset, events) -> list[Example]`` (newly closed);
    ``outbox(partition=None)`` / ``ack(example_ids)``: the produce-then-ack queue;
    ``applied_offset(partition)``; ``counters(partition=None)``; ``pending(partition=None)``;
    ``watermark(partition)``; ``flush_all(partition=None)``; ``close()``.
    """

    def __init__(self, path: str | os.PathLike, cfg: JoinerConfig = JoinerConfig()):
        self.cfg = cfg
        self.path = str(path)
        Path(self.path).mkdir(parents=True, exist_ok=True)
        o = Options(raw_mode=True)
        o.create_if_missing(True)
        self._db = Rdict(self.path, o)
        self._wopts = WriteOptions()
        self._wopts.sync = cfg.sync
        meta = self._db.get(b"M")
        have = None if meta is None else json.loads(meta)["format"]
        if have is not None and have not in _READABLE_FORMATS:
            raise ValueError(f"joiner state at {self.path} has format {have}, this version reads {_READABLE_FORMATS}")
        # New, or format 1 or 2: their values and O/ outbox entries stay readable, new ones are format 3.
        if have != FORMAT_VERSION:
            self._db.put(b"M", _enc({"format": FORMAT_VERSION}).encode(), self._wopts)
        # Persisted per-partition headers (offset, watermark, counters); the rest loads lazily.
        self._states: dict[int, dict] = {}
        for k, v in _iter_prefix(self._db, b"S/"):
            self._states[int(k[2:])] = json.loads(v)
        self._parts: dict[int, _Partition] = {}
        self._closed = False

    # ------------------------------------------------------------------ state loading

    def _part(self, p: int) -> _Partition:
        part = self._parts.get(p)
        if part is None:
            part = self._parts[p] = self._load(p)
        return part

    def _load(self, p: int) -> _Partition:
        if not isinstance(p, int) or p < 0:
            raise ValueError(f"partition must be an int >= 0, got {p!r}")
        part = _Partition(p)
        st = self._states.get(p)
        if st is not None:
            part.offset = st["offset"]
            part.max_ts = st["max_ts"]
            part.counters.update(st["counters"])
        cw, vw = self.cfg.click_window_ms, self.cfg.conversion_window_ms
        n = len(part.k_open)
        for k, v in _iter_prefix(self._db, part.k_open):
            ts, attrs, click_ts, held = _decode_open(v)
            dl = ts + cw if click_ts is None else click_ts + vw
            rid = k[n:].decode()
            part.open[rid] = _Open(ts, attrs, click_ts, held, dl)
            part.heap.append((dl, rid))
        heapq.heapify(part.heap)
        n = len(part.k_early)
        for k, v in _iter_prefix(self._db, part.k_early):
            rid = k[n:].decode()
            lst = part.early[rid] = json.loads(v)
            part.early_heap.append((min(t for _, t in lst), rid))
        heapq.heapify(part.early_heap)
        n = len(part.k_out)
        for k, v in _iter_prefix(self._db, part.k_out):
            rid = k[n:].decode()
            part.outbox[rid] = _decode_outbox(rid, v)
            part.box_of[rid] = -1
        n = len(part.k_box)
        for k, v in _iter_prefix(self._db, part.k_box):
            seq = _BE8.unpack(k[n:])[0]
            box = part.boxes[seq] = {}
            for rid, value, piece in _decode_box(v):
                part.outbox[rid] = _decode_outbox(rid, value)
                part.box_of[rid] = seq
                box[rid] = piece
            part.next_box = seq + 1
        return part

    def _all_parts(self, partition: int | None) -> list[_Partition]:
        if partition is not None:
            return [self._part(partition)]
        return [self._part(p) for p in sorted(set(self._states) | set(self._parts))]

    # ------------------------------------------------------------------ queries

    def applied_offset(self, partition: int) -> int | None:
        """The last offset applied for ``partition`` (None: nothing yet)."""
        part = self._parts.get(partition)
        if part is not None:
            return part.offset
        st = self._states.get(partition)
        return None if st is None else st["offset"]

    def partitions(self) -> list[int]:
        return sorted(set(self._states) | set(self._parts))

    def watermark(self, partition: int) -> int | None:
        part = self._part(partition)
        return None if part.max_ts == _NO_TS else part.max_ts - self.cfg.allowed_lateness_ms

    def counters(self, partition: int | None = None) -> dict[str, int]:
        """Persisted counters (see the module docstring), summed over partitions by default."""
        out = dict.fromkeys(COUNTERS, 0)
        for part in self._all_parts(partition):
            for k, v in part.counters.items():
                out[k] += v
        return out

    def pending(self, partition: int | None = None) -> int:
        """Open impressions (waiting for their windows to close)."""
        return sum(len(part.open) for part in self._all_parts(partition))

    def outbox(self, partition: int | None = None) -> list[Example]:
        """Closed examples not yet acknowledged as produced, in close order (after a restart,
        entries a format-2 joiner wrote come first, in request_id order)."""
        return [ex for part in self._all_parts(partition) for ex in part.outbox.values()]

    def ack(self, example_ids: Sequence[str]) -> set[str]:
        """Remove produced examples from the outbox (one durable write); returns the ids removed.

        Unknown ids (already acked: a re-send) are ignored."""
        wb = WriteBatch(raw_mode=True)
        found: dict[_Partition, list[str]] = {}
        parts = self._all_parts(None)
        for rid in example_ids:
            for part in parts:
                if rid in part.outbox:
                    found.setdefault(part, []).append(rid)
                    break
        if found:
            try:
                for part, rids in found.items():
                    _unbox(part, rids, wb)
                self._db.write(wb, self._wopts)
            except BaseException:
                for part in found:  # the boxes in memory may be ahead of RocksDB: reload on next use
                    self._parts.pop(part.p, None)
                raise
            for part, rids in found.items():
                for rid in rids:
                    part.outbox.pop(rid, None)
        return {rid for rids in found.values() for rid in rids}

    # ------------------------------------------------------------------ the join

    def process(self, partition: int, offset: int, events: Any) -> list[Example]:
        """Apply the events of one Kafka record (or of records ending at ``offset``) atomically.

        ``events``: a sequence of Events, or a validated event ``pyarrow.RecordBatch``
        (:mod:`opengem.stream.codec`; read column-wise, no Event objects), or a list of
        such parts (:meth:`process_parts`). Open impressions, tombstones, the early
        buffer, counters, watermark, the outbox of newly closed examples and the
        applied offset go into ONE WriteBatch. Returns the newly closed examples
        (also in :meth:`outbox`). A call with ``offset <= applied_offset(partition)``
        is a no-op (replay).
        """
        return self.process_parts(partition, offset, [events])

    def process_parts(self, partition: int, offset: int, parts: Sequence[Any]) -> list[Example]:
        """:meth:`process` of the concatenation of ``parts`` (each Events or a RecordBatch)."""
        part = self._part(partition)
        if part.offset is not None and offset <= part.offset:
            return []
        cols = _AdColumns()
        for x in parts:
            cols.add(x)
        wb = WriteBatch(raw_mode=True)
        run = _Run(self, part, wb, cols)
        try:
            run.apply(cols)
            part.offset = offset
            _box(part, run.box, wb)
            self._write_state(part, wb)
            self._db.write(wb, self._wopts)
        except BaseException:
            # Memory may be ahead of RocksDB: forget it, reload on next use.
            self._parts.pop(partition, None)
            raise
        for ex in run.closed:
            part.outbox[ex.request_id] = ex
        return run.closed

    def flush_all(self, partition: int | None = None) -> list[Example]:
        """Close every open impression now, whatever the watermark (tests, end of a finite stream).

        Not for an ordinary shutdown: impressions still inside their windows would be
        labelled with what is known so far. One durable write per partition; offsets unchanged.
        """
        out = []
        for part in self._all_parts(partition):
            wb = WriteBatch(raw_mode=True)
            run = _Run(self, part, wb, _AdColumns())
            try:
                for dl, rid in sorted((r.deadline, rid) for rid, r in part.open.items()):
                    run.close(rid, part.open[rid])
                for ts, rid in sorted(part.early_heap):
                    run.expire_early(rid)
                part.heap.clear()
                part.early_heap.clear()
                _box(part, run.box, wb)
                self._write_state(part, wb)
                self._db.write(wb, self._wopts)
            except BaseException:
                self._parts.pop(part.p, None)
                raise
            for ex in run.closed:
                part.outbox[ex.request_id] = ex
            out += run.closed
        return out

    def _write_state(self, part: _Partition, wb: WriteBatch) -> None:
        st = {"offset": part.offset, "max_ts": part.max_ts, "counters": part.counters}
        raw = _enc(st)
        wb.put(part.k_state, raw.encode())
        self._states[part.p] = json.loads(raw)

    def sync_wal(self) -> None:
        """fsync the write-ahead log: every process() so far survives a power loss."""
        if not self._closed:
            self._db.flush_wal(True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._parts.clear()
            self._db.close()

    def __enter__(self) -> "LabelJoiner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Run:
    """One process() call: applies events to a partition's memory and fills the WriteBatch."""

    def __init__(self, joiner: LabelJoiner, part: _Partition, wb: WriteBatch, cols: _AdColumns):
        cfg = joiner.cfg
        self.db = joiner._db
        self.part = part
        self.wb = wb
        self.cw = cfg.click_window_ms
        self.vw = cfg.conversion_window_ms
        self.lateness = cfg.allowed_lateness_ms
        self.retention = cfg.retention_ms
        self.gc_interval = max(1, cfg.gc_interval_ms)
        self.c = part.counters
        self.closed: list[Example] = []
        self.box: list[tuple[str, bytes]] = []  # (rid, outbox entry) of each example closed, for _box
        self.tombs: dict[str, tuple[int, int, int] | None] = {}  # tombstones changed in this run (None: deleted)
        self.prefetched: dict[str, tuple[int, int, int]] = {}
        # Impressions that are not open may be duplicates of closed ones: one multi-get.
        op = part.open
        rids = [r for k, r in zip(cols.kinds, cols.rids)
                if k == "impression" and r is not None and r not in op]
        if rids:
            kt = part.k_tomb
            vals = self.db.get([kt + r.encode() for r in rids])
            self.prefetched = {r: _TOMB.unpack(v) for r, v in zip(rids, vals) if v is not None}

    # -- tombstones

    def tomb(self, rid: str, prefetched: bool = False) -> tuple[int, int, int] | None:
        """(flags, impression ts, click ts or -1) of a closed request_id, or None."""
        if rid in self.tombs:
            return self.tombs[rid]
        if prefetched:
            return self.prefetched.get(rid)
        v = self.db.get(self.part.k_tomb + rid.encode())
        return None if v is None else _TOMB.unpack(v)

    def set_tomb(self, rid: str, tomb: tuple[int, int, int]) -> None:
        self.tombs[rid] = tomb
        self.wb.put(self.part.k_tomb + rid.encode(), _TOMB.pack(*tomb))

    # -- the event loop

    def apply(self, cols: _AdColumns) -> None:
        part = self.part
        lateness = self.lateness
        max_ts = part.max_ts
        wm = max_ts - lateness
        heap = part.heap
        early_heap = part.early_heap
        on_imp, on_click, on_conv = self.on_impression, self.on_click, self.on_conversion
        # An impression with a new request_id and nothing waiting for it (almost all of them)
        # is opened here, without on_impression's call and checks.
        op, early, tombs, pre = part.open, part.early, self.tombs, self.prefetched
        put, k_open, cw, push = self.wb.put, part.k_open, self.cw, heapq.heappush
        fresh = 0
        try:
            for k, rid, ts, attrs in zip(cols.kinds, cols.rids, cols.ts, cols.attrs):
                if ts > max_ts:
                    max_ts = part.max_ts = ts
                    wm = ts - lateness
                if k == "impression":
                    if rid is not None and rid not in op and rid not in tombs and rid not in pre and rid not in early:
                        fresh += 1
                        dl = ts + cw
                        op[rid] = _Open(ts, attrs, None, None, dl)
                        push(heap, (dl, rid))
                        put(k_open + rid.encode(), _HDR_FRESH + attrs)
                    else:
                        on_imp(rid, ts, attrs, wm)
                elif k == "click":
                    on_click(rid, ts, wm)
                elif k == "conversion":
                    on_conv(rid, ts, wm)
                if heap and heap[0][0] <= wm:
                    self.close_due(wm)
                if early_heap and early_heap[0][0] <= wm:
                    self.expire_due(wm)
                if wm >= part.next_gc:
                    self.gc(wm)
        finally:
            self.c["impressions"] += fresh

    def on_impression(self, rid: str | None, ts: int, attrs: bytes, wm: int) -> None:
        part, c = self.part, self.c
        if rid is None:
            c["missing_request_id"] += 1
            return
        if rid in part.open or self.tomb(rid, prefetched=True) is not None:
            c["duplicate_impression"] += 1
            return
        c["impressions"] += 1
        rec = _Open(ts, attrs, None, None, ts + self.cw)
        part.open[rid] = rec
        heapq.heappush(part.heap, (rec.deadline, rid))
        early = part.early.pop(rid, None)
        if early is None:
            self.wb.put(part.k_open + rid.encode(), _HDR_FRESH + attrs)
            return
        self.wb.delete(part.k_early + rid.encode())
        self.wb.put(part.k_open + rid.encode(), rec.encode())
        for kind, ts in sorted(early, key=lambda x: (x[1], x[0] != "click")):
            (self.on_click if kind == "click" else self.on_conversion)(rid, ts, wm)

    def on_click(self, rid: str | None, ts: int, wm: int) -> None:
        part, c = self.part, self.c
        if rid is None:
            c["missing_request_id"] += 1
            return
        rec = part.open.get(rid)
        if rec is None:
            self.unmatched(rid, "click", ts)
            return
        if rec.click_ts is not None:
            c["duplicate_click"] += 1
            return
        if ts > rec.ts + self.cw:
            c["click_outside_window"] += 1
            return
        c["clicks"] += 1
        rec.click_ts = ts
        rec.deadline = ts + self.vw
        held = rec.held_conv
        if held is not None and ts <= held:
            rec.held_conv = None
            if held <= rec.deadline:
                self.attribute(rid, rec, held)
                return
            c["conversion_outside_window"] += 1
        heapq.heappush(part.heap, (rec.deadline, rid))
        self.wb.put(part.k_open + rid.encode(), rec.encode())

    def on_conversion(self, rid: str | None, ts: int, wm: int) -> None:
        part, c = self.part, self.c
        if rid is None:
            c["missing_request_id"] += 1
            return
        rec = part.open.get(rid)
        if rec is None:
            self.unmatched(rid, "conversion", ts)
            return
        if rec.click_ts is None:
            # Maybe its click is still on the way (out of order); attributed if it comes.
            if rec.held_conv is None:
                rec.held_conv = ts
                self.wb.put(part.k_open + rid.encode(), rec.encode())
            else:
                c["duplicate_conversion"] += 1
            return
        if rec.click_ts <= ts <= rec.deadline:
            self.attribute(rid, rec, ts)
        elif ts < rec.click_ts:
            c["unattributed_conversion"] += 1
        else:
            c["conversion_outside_window"] += 1

    def attribute(self, rid: str, rec: _Open, ts: int) -> None:
        self.c["conversions"] += 1
        self.close(rid, rec, ts)

    def unmatched(self, rid: str, kind: str, ts: int) -> None:
        """A click / conversion without an open impression: late, duplicate or (maybe) early."""
        c = self.c
        tomb = self.tomb(rid)
        if tomb is not None:
            flags, imp_ts, click_ts = tomb
            if kind == "click":
                if flags & (_CLICKED | _LATE_CLICK):
                    c["duplicate_click"] += 1
                elif ts > imp_ts + self.cw:
                    c["click_outside_window"] += 1
                else:
                    c["late_click"] += 1
                    self.set_tomb(rid, (flags | _LATE_CLICK, imp_ts, ts))
            elif flags & _CONVERTED:
                c["duplicate_conversion"] += 1
            elif not flags & (_CLICKED | _LATE_CLICK) or ts < click_ts:
                c["unattributed_conversion"] += 1
            elif ts > click_ts + self.vw:
                c["conversion_outside_window"] += 1
            else:
                c["late_conversion"] += 1
                self.set_tomb(rid, (flags | _CONVERTED, imp_ts, click_ts))
            return
        part = self.part
        lst = part.early.get(rid)
        if lst is None:
            lst = part.early[rid] = []
            heapq.heappush(part.early_heap, (ts, rid))
        lst.append([kind, ts])
        self.wb.put(part.k_early + rid.encode(), _enc(lst).encode())

    # -- closing

    def close(self, rid: str, rec: _Open, conversion_ts: int | None = None) -> None:
        part, c = self.part, self.c
        if rec.held_conv is not None:
            c["unattributed_conversion"] += 1
        click_ts = rec.click_ts
        c["examples"] += 1
        del part.open[rid]
        rb = rid.encode()
        wb = self.wb
        wb.delete(part.k_open + rb)
        v = (_HDR_FRESH if click_ts is None else _HDR.pack(_V2, click_ts, _ts_or_sentinel(conversion_ts))) + rec.attrs
        self.box.append((rid, _BOX_ENTRY.pack(len(rb), len(v)) + rb + v))
        flags = (0 if click_ts is None else _CLICKED) | (0 if conversion_ts is None else _CONVERTED)
        tomb = self.tombs[rid] = (flags, rec.ts, -1 if click_ts is None else click_ts)  # set_tomb, inline
        wb.put(part.k_tomb + rb, _TOMB.pack(*tomb))
        expire = max(part.max_ts, rec.ts, click_ts or 0, conversion_ts or 0) + self.retention
        wb.put(part.k_exp + _BE8.pack(max(expire, 0)) + rb, b"")
        self.closed.append(_example(rid, rec.attrs, click_ts, conversion_ts))

    def close_due(self, wm: int) -> None:
        part = self.part
        heap, op = part.heap, part.open
        while heap and heap[0][0] <= wm:
            dl, rid = heapq.heappop(heap)
            rec = op.get(rid)
            if rec is not None and rec.deadline == dl:
                self.close(rid, rec)

    def expire_early(self, rid: str) -> None:
        lst = self.part.early.pop(rid, None)
        if lst is None:
            return
        for kind, _ in lst:
            self.c["orphan_click" if kind == "click" else "orphan_conversion"] += 1
        self.wb.delete(self.part.k_early + rid.encode())

    def expire_due(self, wm: int) -> None:
        h = self.part.early_heap
        while h and h[0][0] <= wm:
            _, rid = heapq.heappop(h)
            self.expire_early(rid)

    def gc(self, wm: int) -> None:
        """Drop tombstones whose expiry <= wm (the index is range-deleted)."""
        part = self.part
        part.next_gc = wm + self.gc_interval
        if wm < part.gc_from:
            return
        prefix = part.k_exp
        n = len(prefix)
        hi = _BE8.pack(max(wm + 1, 0))
        found = False
        for k, _ in _iter_prefix(self.db, prefix, prefix + _BE8.pack(part.gc_from)):
            if k[n:n + 8] >= hi:
                break
            rid = k[n + 8:].decode()
            self.tombs[rid] = None
            self.wb.delete(part.k_tomb + k[n + 8:])
            found = True
        if found:
            self.wb.delete_range(prefix + _BE8.pack(part.gc_from), prefix + hi)
        part.gc_from = max(wm + 1, 0)
