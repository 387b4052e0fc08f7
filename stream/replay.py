"""``opengem replay FILE``: a Parquet or CSV interaction log as opengem events.

A :class:`ColumnMapping` names the source columns (``parse_mapping`` reads it
from a CLI string such as
``"user=uid,item=ad,time=ts,surface=placement,click=clk,conversion=conv,attr.country=geo,time_unit=s"``).
The file is streamed in chunks of ``batch_rows`` rows (Parquet row groups via
``ParquetFile.iter_batches``, CSV blocks via ``pyarrow.csv.open_csv``), never
loaded whole; every event goes through :func:`opengem.stream.events.validate`.

Row semantics
-------------
* Ids: an integer passes through (and must be in ``0 .. 2**63-1``); a string
  that spells a base-10 integer is that integer (as a CSV reader would infer
  it, so a CSV and a Parquet copy of one log give the same ids); any other
  string is hashed: the first 8 bytes of BLAKE2b of its UTF-8, masked to 63
  bits (stable across runs and machines, unlike Python's ``hash``).
* Labelled rows (the mapping names ``click`` and/or ``conversion`` columns, as
  in public CTR datasets): a row is a logged ad impression; it becomes an
  ``impression`` event, plus a ``click`` event when the click label is 1, plus
  a ``conversion`` event when the conversion label is 1 (also without a click:
  post-view conversions exist). The three share one request_id (the
  ``request`` column, else ``replay-<stem>-<row>``). Timestamps: impression at
  the row's time, click at +1 ms, conversion at +2 ms, so that ordering by
  ``ts`` keeps impression < click < conversion (the joiner sees the impression
  first) while staying within a few ms of the logged time. p_click /
  p_conversion attributes, if mapped, go on the impression only. Labels are
  0/1, true/false (any case), t/f, yes/no; an empty label is a broken row.
* Otherwise the row's ``kind`` column (or ``default_kind``) decides; ``is_ad``
  comes from its column or from the kind. An ad kind takes its request_id from
  the ``request`` column, else ``replay-<stem>-<row>`` (then a click cannot be
  joined to its impression: map a request column for logs of separate rows).
  Organic kinds never carry a request_id (the column is ignored for them).
* Time: ``time_unit`` "s" / "ms" / "us" for numbers (fractions allowed, rounded
  to the ms) or "iso" for ISO-8601 strings (no offset = UTC). A Parquet
  timestamp or date column is used as is, whatever ``time_unit`` says.
* A float NaN in the source is a null (pandas writes missing values so).
* event_id = ``replay-<stem>-<row>-<k>``: ``row`` is the 0-based index of the
  data row in the file, ``k`` 0 for the impression / the row's event, 1 for
  the click, 2 for the conversion. Re-running a replay yields the same ids,
  so downstream de-duplication makes it idempotent. ``stem`` is the file name
  without its format suffixes; one longer than 32 characters or with
  characters other than ``[A-Za-z0-9._-]`` becomes its first 23 cleaned
  characters + ``~`` + 8 hex digits of its hash (event_id has 64 characters at
  most). Two logs replayed into one topic need different stems.

Broken rows (a missing user, an unparseable time, an unknown surface, an
out-of-range value, ...) are counted by reason in :class:`ReplayReport`, the
first :data:`FIRST_ERRORS` are kept with their row number, and the replay goes
on; if any event of a row is invalid the whole row is dropped. A CSV line with
the wrong number of fields is skipped by the parser and counted as
``bad_csv_row`` with row number -1 (the streaming parser does not know its
position; the message quotes it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from opengem.stream.events import AD_KINDS, DEFAULT_SURFACES, KIND_INDEX, Event, EventError, validate

TIME_UNITS = ("s", "ms", "us", "iso")
# Event fields a source column may fill through ``attr.<field>=<column>``, and
# how the source value is read.
ATTRIBUTE_FIELDS = {
    "age_bucket": int,
    "country": str,
    "device": str,
    "ad_format": str,
    "advertiser_id": int,
    "category": int,
    "hour": int,
    "p_click": float,
    "p_conversion": float,
}
FIRST_ERRORS = 10
CSV_BLOCK_BYTES = 1 << 20  # bytes of CSV parsed at a time (pyarrow's default)
_MAX_MESSAGE = 200
_INT_RE = re.compile(r"[+-]?[0-9]{1,4000}")  # bounded: int() refuses > 4300 digits
_TRUE = frozenset({"1", "true", "t", "yes", "y", "1.0"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "0.0"})
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".txt", ".gz", ".bz2", ".zst", ".lz4")


@dataclass(frozen=True)
class ColumnMapping:
    """Names of the source columns; None = absent."""

    user: str
    item: str
    time: str
    surface: str | None = None
    kind: str | None = None
    label_click: str | None = None
    label_conversion: str | None = None
    request: str | None = None
    is_ad: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()  # (event field, source column), e.g. ("country", "geo")
    time_unit: str = "ms"  # "s" | "ms" | "us" | "iso" (ISO-8601 strings)
    default_surface: str = "feed"
    default_kind: str = "impression"

    def __post_init__(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit={self.time_unit!r} not one of {TIME_UNITS}")
        if self.default_kind not in KIND_INDEX:
            raise ValueError(f"default_kind={self.default_kind!r} not one of {list(KIND_INDEX)}")
        names = [f for f, _ in self.attributes]
        unknown = [f for f in names if f not in ATTRIBUTE_FIELDS]
        if unknown:
            raise ValueError(f"attributes {unknown} are not event attributes {list(ATTRIBUTE_FIELDS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"an attribute is mapped twice: {names}")
        if self.labelled and (self.kind is not None or self.is_ad is not None):
            raise ValueError("label columns make every row an ad impression: do not map kind / is_ad as well")

    @property
    def labelled(self) -> bool:
        return self.label_click is not None or self.label_conversion is not None

    def source_columns(self) -> list[str]:
        """The distinct source columns this mapping reads, in a stable order."""
        cols = [self.user, self.item, self.time, self.surface, self.kind, self.label_click, self.label_conversion,
                self.request, self.is_ad, *(c for _, c in self.attributes)]
        return list(dict.fromkeys(c for c in cols if c is not None))


_SPEC_KEYS = {
    "user": "user",
    "item": "item",
    "time": "time",
    "surface": "surface",
    "kind": "kind",
    "click": "label_click",
    "label_click": "label_click",
    "conversion": "label_conversion",
    "label_conversion": "label_conversion",
    "request": "request",
    "is_ad": "is_ad",
    "time_unit": "time_unit",
    "default_surface": "default_surface",
    "default_kind": "default_kind",
}


def parse_mapping(spec: str) -> ColumnMapping:
    """A :class:`ColumnMapping` from ``key=value`` pairs separated by commas.

    Keys: user, item, time (required), surface, kind, click, conversion,
    request, is_ad, ``attr.<field>`` (see :data:`ATTRIBUTE_FIELDS`), time_unit,
    default_surface, default_kind. Column names cannot contain ``,`` or ``=``.
    Raises ValueError on an unknown or repeated key.
    """
    kw: dict[str, Any] = {}
    attributes: list[tuple[str, str]] = []
    seen: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"mapping item {part!r} is not key=value")
        if key in seen:
            raise ValueError(f"mapping key {key!r} given twice")
        seen.add(key)
        if key.startswith("attr."):
            attributes.append((key[5:], value))
        elif key in _SPEC_KEYS:
            if _SPEC_KEYS[key] in kw:
                raise ValueError(f"mapping key {key!r} given twice")
            kw[_SPEC_KEYS[key]] = value
        else:
            raise ValueError(f"unknown mapping key {key!r}; known: {sorted(_SPEC_KEYS)} and attr.<field>")
    missing = [k for k in ("user", "item", "time") if k not in kw]
    if missing:
        raise ValueError(f"mapping needs {missing}")
    return ColumnMapping(**kw, attributes=tuple(attributes))


@dataclass
class ReplayReport:
    rows: int = 0  # data rows read (including broken ones)
    events: int = 0  # valid events produced
    bad_rows: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_errors: list[tuple[int, str]] = field(default_factory=list)  # (row number, "reason: message")

    def bad(self, row: int, error: EventError) -> None:
        self.bad_rows += 1
        self.reasons[error.reason] += 1
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append((row, f"{error.reason}: {error.message[:_MAX_MESSAGE]}"))

    def snapshot(self) -> ReplayReport:
        return dataclasses.replace(self, reasons=Counter(self.reasons), first_errors=list(self.first_errors))


# --------------------------------------------------------------------------- values


@lru_cache(maxsize=1 << 18)
def hash_id(s: str) -> int:
    """A string id as a stable non-negative int64: BLAKE2b-64 masked to 63 bits."""
    digest = hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def _null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _missing(name: str, col: str) -> EventError:
    return EventError("missing_field", f"{name} is required: column {col!r} is empty")


def _to_id(v: Any, name: str, col: str) -> int:
    if _null(v):
        raise _missing(name, col)
    if isinstance(v, bool):
        raise EventError("bad_id", f"{name}: column {col!r} holds a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        return int(s) if _INT_RE.fullmatch(s) else hash_id(v)
    if isinstance(v, bytes):
        return hash_id(v.decode("utf-8", "surrogateescape"))
    raise EventError("bad_id", f"{name}: column {col!r} value {_short(v)} is not an id")


def _to_int(v: Any, name: str, col: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
        return int(v.strip())
    raise EventError("bad_type", f"{name}: column {col!r} value {_short(v)} is not an integer")


def _to_float(v: Any, name: str, col: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise EventError("bad_type", f"{name}: column {col!r} value {_short(v)} is not a number")


def _to_str(v: Any, name: str, col: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise EventError("bad_type", f"{name}: column {col!r} value {_short(v)} is not a string")


def _to_bool(v: Any, name: str, col: str, reason: str) -> bool:
    if _null(v):
        raise EventError(reason, f"{name}: column {col!r} is empty")
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise EventError(reason, f"{name}: column {col!r} value {_short(v)} is not 0/1")


def _to_ms(v: Any, unit: str, col: str) -> int:
    """A time value as ms since the epoch (see the module docstring)."""
    if _null(v):
        raise _missing("ts", col)
    if isinstance(v, datetime):
        dt = v if v.tzinfo is not None else v.replace(tzinfo=timezone.utc)
        return (dt - _EPOCH) // _MS
    if unit == "iso":
        if not isinstance(v, str):
            raise EventError("bad_time", f"column {col!r} value {_short(v)} is not an ISO-8601 string")
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            raise EventError("bad_time", f"column {col!r} value {_short(v)} is not an ISO-8601 time") from None
        return _to_ms(dt, unit, col)
    x: int | float
    if isinstance(v, bool):
        raise EventError("bad_time", f"column {col!r} holds a boolean")
    if isinstance(v, (int, float)):
        x = v
    elif isinstance(v, str):
        s = v.strip()
        if _INT_RE.fullmatch(s):
            x = int(s)
        else:
            try:
                x = float(s)
            except ValueError:
                raise EventError("bad_time", f"column {col!r} value {_short(v)} is not a number of {unit}") from None
    else:
        raise EventError("bad_time", f"column {col!r} value {_short(v)} is not a time")
    if isinstance(x, float):
        if not math.isfinite(x):
            raise EventError("bad_time", f"column {col!r} value {_short(v)} is not finite")
        return round(x * _SCALE[unit])
    if unit == "s":
        return x * 1000
    if unit == "us":
        return x // 1000
    return x


_MS = datetime.resolution * 1000  # timedelta(milliseconds=1)
_SCALE = {"s": 1000.0, "ms": 1.0, "us": 0.001}


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def stem_token(path: str | Path) -> str:
    """The file's stem as it appears in event_ids (see the module docstring)."""
    stem = Path(path).name
    while True:
        lowered = stem.lower()
        suffix = next((s for s in _SUFFIXES if lowered.endswith(s) and len(stem) > len(s)), None)
        if suffix is None:
            break
        stem = stem[: -len(suffix)]
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", stem)
    if clean == stem and len(stem) <= 32:
        return stem
    return f"{clean[:23]}~{hashlib.blake2b(stem.encode('utf-8', 'surrogateescape'), digest_size=4).hexdigest()}"


# --------------------------------------------------------------------------- rows -> events


class _Converter:
    """One source row (values in ``columns`` order) -> its validated events."""

    def __init__(self, mapping: ColumnMapping, columns: list[str], stem: str, surfaces: Iterable[str], time_unit: str):
        self.m = mapping
        self.stem = stem
        self.surfaces = frozenset(surfaces)
        self.time_unit = time_unit
        pos = {c: i for i, c in enumerate(columns)}
        self.pos = pos
        self.attrs = [(f, pos[c], c, ATTRIBUTE_FIELDS[f]) for f, c in mapping.attributes]

    def _get(self, values: tuple, col: str | None) -> Any:
        return None if col is None else values[self.pos[col]]

    def convert(self, values: tuple, row: int) -> list[Event]:
        m = self.m
        base: dict[str, Any] = {
            "user_id": _to_id(self._get(values, m.user), "user_id", m.user),
            "item_id": _to_id(self._get(values, m.item), "item_id", m.item),
            "ts": _to_ms(self._get(values, m.time), self.time_unit, m.time),
        }
        if m.surface is None:
            base["surface"] = m.default_surface
        else:
            v = self._get(values, m.surface)
            base["surface"] = None if _null(v) else _to_str(v, "surface", m.surface)
        for name, i, col, typ in self.attrs:
            v = values[i]
            if _null(v):
                continue
            if typ is int:
                base[name] = _to_int(v, name, col)
            elif typ is float:
                base[name] = _to_float(v, name, col)
            else:
                base[name] = _to_str(v, name, col)
        request = self._get(values, m.request)
        request_id = None if _null(request) else _to_str(request, "request_id", m.request)
        prefix = f"replay-{self.stem}-{row}"
        if m.labelled:
            clicked = m.label_click is not None and _to_bool(self._get(values, m.label_click), "click", m.label_click, "bad_label")
            converted = m.label_conversion is not None and _to_bool(
                self._get(values, m.label_conversion), "conversion", m.label_conversion, "bad_label"
            )
            shared = {**base, "is_ad": True, "request_id": request_id or prefix}
            out = [self._event({**shared, "event_id": f"{prefix}-0", "kind": "impression"})]
            shared.pop("p_click", None)
            shared.pop("p_conversion", None)
            if clicked:
                out.append(self._event({**shared, "event_id": f"{prefix}-1", "kind": "click", "ts": base["ts"] + 1}))
            if converted:
                out.append(self._event({**shared, "event_id": f"{prefix}-2", "kind": "conversion", "ts": base["ts"] + 2}))
            return out
        if m.kind is None:
            kind = m.default_kind
        else:
            v = self._get(values, m.kind)
            kind = None if _null(v) else _to_str(v, "kind", m.kind)
        ad_kind = kind in AD_KINDS
        is_ad = ad_kind if m.is_ad is None else _to_bool(self._get(values, m.is_ad), "is_ad", m.is_ad, "bad_type")
        event = {**base, "event_id": f"{prefix}-0", "kind": kind, "is_ad": is_ad,
                 "request_id": (request_id or prefix) if ad_kind else None}
        return [self._event(event)]

    def _event(self, d: dict[str, Any]) -> Event:
        return validate(d, surfaces=self.surfaces)


# --------------------------------------------------------------------------- sources


class _Source:
    """Batches of the mapped columns of a Parquet or CSV file, streamed."""

    def __init__(self, path: str | Path, columns: list[str], batch_rows: int):
        self.path = str(path)
        self.columns = columns
        self.batch_rows = batch_rows
        self._skipped: list[str] = []  # CSV lines with the wrong field count
        self._lock = threading.Lock()
        with open(self.path, "rb") as f:
            self.is_parquet = f.read(4) == b"PAR1"

    def _check(self, available: list[str]) -> None:
        missing = [c for c in self.columns if c not in available]
        if missing:
            raise ValueError(f"{self.path}: columns {missing} not in the file; it has {available[:50]}")

    def batches(self) -> Iterator[pa.RecordBatch]:
        if self.is_parquet:
            pf = pq.ParquetFile(self.path)
            self._check(pf.schema_arrow.names)
            yield from pf.iter_batches(batch_size=self.batch_rows, columns=self.columns)
            return
        lowered = self.path.lower()
        delimiter = "\t" if ".tsv" in lowered else ","
        parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=self._on_invalid)
        # Every mapped column is read as a string: type inference on the first
        # block would make a later block with an odd value fail the whole read.
        convert = pacsv.ConvertOptions(
            include_columns=self.columns,
            column_types={c: pa.string() for c in self.columns},
            strings_can_be_null=True,
        )
        try:
            reader = pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=parse,
                convert_options=convert,
            )
        except KeyError:  # ArrowKeyError: an include_column is not in the header
            header = pacsv.open_csv(self.path, parse_options=parse).schema.names
            self._check(header)
            raise
        yield from reader

    def _on_invalid(self, row: Any) -> str:
        with self._lock:
            self._skipped.append(
                f"expected {row.expected_columns} fields, got {row.actual_columns}: {_short(row.text)}"
            )
        return "skip"

    def drain_skipped(self, report: ReplayReport) -> bool:
        with self._lock:
            skipped, self._skipped = self._skipped, []
        for message in skipped:
            report.rows += 1
            report.bad(-1, EventError("bad_csv_row", message))
        return bool(skipped)


def _rechunk(batches: Iterable[pa.RecordBatch], n: int) -> Iterator[pa.Table]:
    """Tables of exactly ``n`` rows (the last one shorter) from batches of any size."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        pending.append(b)
        size += b.num_rows
        while size >= n:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, n)
            pending = table.slice(n).to_batches()
            size -= n
    if size:
        yield pa.Table.from_batches(pending)


def _time_column(col: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """A timestamp / date column as int64 ms since the epoch; None for other types."""
    t = col.type
    if pa.types.is_timestamp(t):
        ints = col.cast(pa.int64())
        if t.unit == "s":
            return pc.multiply(ints, 1000)
        if t.unit == "ms":
            return ints
        return pc.divide(ints, 1000 if t.unit == "us" else 1_000_000)  # integer division
    if pa.types.is_date32(t):
        return pc.multiply(col.cast(pa.int32()).cast(pa.int64()), 86_400_000)
    if pa.types.is_date64(t):
        return col.cast(pa.int64())
    return None


def replay_rows(
    path: str | Path,
    mapping: ColumnMapping,
    *,
    surfaces: Iterable[str] = DEFAULT_SURFACES,
    batch_rows: int = 65536,
) -> Iterator[tuple[list[Event], ReplayReport]]:
    """Stream the file: per chunk of ``batch_rows`` rows, its valid events and
    the report so far (running totals; the last one covers the whole file).

    Raises ValueError before the first chunk when a mapped column is not in the
    file. Broken rows never raise: they are counted in the report.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    columns = mapping.source_columns()
    source = _Source(path, columns, batch_rows)
    surfaces = tuple(surfaces)
    report = ReplayReport()
    stem = stem_token(path)
    row = 0
    for table in _rechunk(source.batches(), batch_rows):
        time_ms = _time_column(table.column(mapping.time))
        unit = mapping.time_unit if time_ms is None else "ms"
        conv = _Converter(mapping, columns, stem, surfaces, unit)
        cols = [(time_ms if c == mapping.time and time_ms is not None else table.column(c)).to_pylist() for c in columns]
        events: list[Event] = []
        for values in zip(*cols):
            try:
                events.extend(conv.convert(values, row))
            except EventError as e:
                report.bad(row, e)
            row += 1
        report.rows += table.num_rows
        report.events += len(events)
        source.drain_skipped(report)
        yield events, report.snapshot()
    if source.drain_skipped(report):
        yield [], report.snapshot()


def replay_file(
    path: str | Path,
    mapping: ColumnMapping,
    send: Callable[[list[Event]], None],
    progress: Callable[[ReplayReport], None] | None = None,
    *,
    surfaces: Iterable[str] = DEFAULT_SURFACES,
    batch_rows: int = 65536,
) -> ReplayReport:
    """Replay ``path``: each chunk's valid events go to ``send`` (e.g. a Kafka
    producer's send), ``progress`` gets the running report after each chunk.
    Returns the final report."""
    report = ReplayReport()
    for events, report in replay_rows(path, mapping, surfaces=surfaces, batch_rows=batch_rows):
        if events:
            send(events)
        if progress is not None:
            progress(report)
    return report
