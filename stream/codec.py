"""Wire formats of an ``opengem.events`` Kafka record value.

Two formats, told apart by their first bytes (a Kafka header ``content-type``
may carry :data:`JSON_CONTENT_TYPE` or :data:`ARROW_CONTENT_TYPE` for humans and
other tools, but :func:`decode` never trusts it):

* JSON: one event object, or an array of event objects
  (:func:`opengem.stream.events.parse_json`). Starts, after optional JSON
  whitespace, with ``{`` or ``[``. Any producer can write it.
* Columnar batch: an Arrow IPC *stream* (schema message, dictionaries, record
  batches) whose columns are the :class:`~opengem.stream.events.Event` fields
  with the types of :data:`EVENT_SCHEMA`. Every IPC message starts with the
  continuation marker ``0xFFFFFFFF``. Written by opengem's own producer and the
  simulator: one record carries a batch of one partition's events, which is how
  a Python stream worker gets past the per-message cost.

Arrow batches are validated column-wise (:func:`check_columns`, numpy over the
Arrow buffers) with exactly the rules, the order of checks, the reason codes
and the messages of the row validator :func:`opengem.stream.events.validate`;
``tests/stream/test_codec.py`` holds the two to agreement. The fast path
:func:`decode_arrow_columns` keeps the valid rows columnar and returns the
invalid ones' indices with their :class:`EventError`; :func:`decode` is
all-or-nothing like ``parse_json`` and returns :class:`Event` objects.
"""

from __future__ import annotations

import operator
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.json

from opengem.stream.events import (
    AD_FORMATS,
    AD_KINDS,
    DEFAULT_MAX_FUTURE_MS,
    DEFAULT_SURFACES,
    DEVICES,
    FIELDS,
    KIND_INDEX,
    MAX_ID,
    MAX_RECORD_BYTES,
    MAX_STR,
    MIN_TS_MS,
    Event,
    EventError,
    _str,
    parse_json,
)

CONTENT_TYPE_HEADER = "content-type"
ARROW_CONTENT_TYPE = b"application/vnd.apache.arrow.stream"
JSON_CONTENT_TYPE = b"application/json"
ARROW_MAGIC = b"\xff\xff\xff\xff"  # IPC continuation marker, first 4 bytes of a stream
# A columnar record carries many events; Kafka's own message.max.bytes bounds
# it in practice, this bounds what one decode call will allocate.
MAX_ARROW_RECORD_BYTES = 64 << 20

# Dictionary encoding for the low-cardinality strings: a batch of 10k events
# carries each surface name once. int8 indices for the fixed enumerations,
# int16 where the value set is open (configured surfaces, ~250 countries).
_DICT8 = pa.dictionary(pa.int8(), pa.string())
_DICT16 = pa.dictionary(pa.int16(), pa.string())

# Every column is nullable on the wire: a missing required value is a row
# error ("missing_field"), found by the validator like in JSON, not a schema
# error that would reject the whole record.
EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.int64()),
        ("ts", pa.int64()),  # ms since epoch
        ("surface", _DICT16),
        ("kind", _DICT8),
        ("item_id", pa.int64()),
        ("is_ad", pa.bool_()),
        ("request_id", pa.string()),
        ("age_bucket", pa.int8()),
        ("country", _DICT16),
        ("device", _DICT8),
        ("ad_format", _DICT8),
        ("advertiser_id", pa.int64()),
        ("category", pa.int32()),  # 0 <= c < 2**31
        ("hour", pa.int8()),
        # float64, not float32: p_click must round-trip exactly (events ->
        # arrow -> events equal) and it is only 8 bytes x 2 per impression.
        ("p_click", pa.float64()),
        ("p_conversion", pa.float64()),
    ]
)
assert tuple(EVENT_SCHEMA.names) == FIELDS, "EVENT_SCHEMA must follow Event's fields"

_JSON_START = re.compile(rb"[ \t\r\n]*[\[{]")
_row_of = operator.attrgetter(*FIELDS)


# --------------------------------------------------------------------------- encode


def encode_json(events: Sequence[Event]) -> bytes:
    """One JSON object for one event, else a JSON array (compact separators)."""
    if not events:
        raise ValueError("nothing to encode: a record holds at least one event")
    if len(events) == 1:
        return events[0].to_json()
    return b"[" + b",".join(e.to_json() for e in events) + b"]"


def _columns_to_batch(columns: Sequence[Sequence[Any]]) -> pa.RecordBatch:
    arrays = [pa.array(col, type=f.type) for col, f in zip(columns, EVENT_SCHEMA)]
    return pa.RecordBatch.from_arrays(arrays, schema=EVENT_SCHEMA)


def events_to_batch(events: Sequence[Event]) -> pa.RecordBatch:
    """Events as one RecordBatch with :data:`EVENT_SCHEMA` (zero rows allowed).

    Meant for valid events; a value that does not fit its column type (e.g.
    ``age_bucket=300`` in int8) raises ``pyarrow.ArrowInvalid`` (a ValueError).
    """
    if not events:
        return pa.RecordBatch.from_pylist([], schema=EVENT_SCHEMA)
    return _columns_to_batch(list(zip(*map(_row_of, events))))


def events_to_table(events: Sequence[Event]) -> pa.Table:
    return pa.Table.from_batches([events_to_batch(events)], schema=EVENT_SCHEMA)


def dicts_to_batch(rows: Iterable[Mapping[str, Any]]) -> pa.RecordBatch:
    """Row dicts (event-shaped; absent keys are null) as one RecordBatch.

    Unlike :func:`events_to_batch` the rows need not be valid events, only of
    the column types: tests and tools use it to write invalid rows.
    """
    rows = list(rows)
    return _columns_to_batch([[r.get(name) for r in rows] for name in FIELDS])


def encode_batch(batch: pa.RecordBatch | pa.Table, *, compression: str | None = None) -> bytes:
    """An Arrow IPC stream holding ``batch`` (``compression``: None, "lz4" or "zstd")."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, EVENT_SCHEMA, options=options) as writer:
        writer.write(batch)
    return sink.getvalue().to_pybytes()


def encode_arrow(events: Sequence[Event], *, compression: str | None = None) -> bytes:
    """Events as an Arrow IPC stream of one RecordBatch (see :data:`EVENT_SCHEMA`)."""
    if not events:
        raise ValueError("nothing to encode: a record holds at least one event")
    return encode_batch(events_to_batch(events), compression=compression)


def _pylist(col: pa.Array) -> list[Any]:
    """``col.to_pylist()``, several times faster through numpy where exact."""
    if pa.types.is_dictionary(col.type):
        table = np.array(col.dictionary.to_pylist() + [None], dtype=object)
        indices, null = _ints(col.indices)
        indices = indices.astype(np.intp)
        indices[null] = len(table) - 1
        return table[indices].tolist()
    if col.null_count == len(col):
        return [None] * len(col)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        values, null = _ints(col)
        if not null.any():
            return values.tolist()  # numpy scalars -> Python int / float / bool
        out = values.astype(object)  # Python objects, as tolist() would make them
        out[null] = None
        return out.tolist()
    return col.to_pylist()


def batch_to_events(batch: pa.RecordBatch) -> list[Event]:
    """Rows of an already *validated* batch as Events (no checks here)."""
    cols = [_pylist(batch.column(name)) for name in FIELDS]
    return [Event(*row) for row in zip(*cols)]


# --------------------------------------------------------------------------- decode


def sniff(raw: bytes) -> str:
    """``"arrow"`` or ``"json"`` from the first bytes; EventError("bad_format") otherwise."""
    if raw[:4] == ARROW_MAGIC:
        return "arrow"
    if _JSON_START.match(raw):
        return "json"
    raise EventError("bad_format", f"record is neither JSON nor an Arrow IPC stream (starts with {bytes(raw[:8])!r})")


def _schema_problem(schema: pa.Schema) -> str | None:
    names = schema.names
    if len(set(names)) != len(names):
        return f"duplicate columns {sorted({n for n in names if names.count(n) > 1})[:5]}"
    missing = [n for n in FIELDS if n not in names]
    extra = [n for n in names if n not in EVENT_SCHEMA.names]
    if missing or extra:
        return f"missing columns {missing[:5]}, unknown columns {extra[:5]}"
    for f in EVENT_SCHEMA:
        got = schema.field(f.name).type
        if not got.equals(f.type):
            return f"column {f.name} is {got}, expected {f.type}"
    return None


def read_arrow(raw: bytes) -> pa.RecordBatch:
    """Parse an Arrow IPC stream into one fully validated RecordBatch.

    Columns come back in :data:`FIELDS` order (a writer may order them
    otherwise). Several record batches in one stream are concatenated. Raises
    EventError: ``too_large``, ``bad_arrow`` (does not parse, or fails Arrow's
    full validation: offsets, UTF-8, dictionary indices), ``bad_schema``,
    ``empty_batch`` (no rows).
    """
    if len(raw) > MAX_ARROW_RECORD_BYTES:
        raise EventError("too_large", f"record of {len(raw)} bytes exceeds {MAX_ARROW_RECORD_BYTES}")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(raw))
        problem = _schema_problem(reader.schema)
        if problem is not None:
            raise EventError("bad_schema", problem)
        batches = [b for b in reader if b.num_rows]
        for b in batches:  # before anything else touches the data
            b.validate(full=True)
        if len(batches) > 1:  # dictionaries are unified
            batch = pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
        else:
            batch = batches[0] if batches else None
    except EventError:
        raise
    except Exception as e:  # a trust boundary: whatever pyarrow says, it is bad input
        raise EventError("bad_arrow", f"not a valid Arrow IPC stream: {type(e).__name__}: {str(e)[:120]}") from None
    if batch is None:
        raise EventError("empty_batch", "Arrow record holds no rows")
    return batch.select(list(FIELDS))


# Column views --------------------------------------------------------------


def _nulls(col: pa.Array) -> np.ndarray:
    if col.null_count == 0:
        return np.zeros(len(col), dtype=bool)
    return col.is_null().to_numpy(zero_copy_only=False)


def _ints(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, null) of an integer / float / bool column; values under nulls are 0."""
    null = _nulls(col)
    values = (col.fill_null(0 if not pa.types.is_boolean(col.type) else False) if col.null_count else col).to_numpy(
        zero_copy_only=False
    )
    return values, null


def _string_stats(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(characters, has a byte outside printable ASCII 0x20..0x7e, null) per row.

    Works on the raw buffers: the batch passed ``validate(full=True)``, so the
    data is UTF-8 and a character is a byte that is not a continuation byte
    (0b10xxxxxx). Only rows with non-printable bytes are visited one by one.
    """
    n = len(col)
    null = _nulls(col)
    _, offsets_buf, data_buf = col.buffers()
    if offsets_buf is None:  # only possible for a zero-length array
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), null
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=col.offset * 4)
    nbytes = np.diff(offsets).astype(np.int64)
    nonprint = np.zeros(n, dtype=bool)
    if data_buf is None or offsets[-1] == offsets[0]:
        return nbytes, nonprint, null
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    bad = np.flatnonzero((data < 0x20) | (data > 0x7E))
    if bad.size:
        rel = offsets - offsets[0]
        rows = np.searchsorted(rel, bad, side="right") - 1
        nonprint[rows] = True
        cont = (data[bad] & 0xC0) == 0x80
        np.subtract.at(nbytes, rows[cont], 1)  # characters = bytes - continuation bytes
    return nbytes, nonprint, null


class _Dict:
    """A dictionary column: per-entry facts computed once, read per row by index."""

    def __init__(self, col: pa.Array):
        self.indices, idx_null = _ints(col.indices)
        self.indices = self.indices.astype(np.intp, copy=False)
        self.values: list[str | None] = col.dictionary.to_pylist()
        entry_null = np.array([v is None for v in self.values] or [False], dtype=bool)
        self.null = idx_null | entry_null[self.indices]

    def entry_map(self, fn: Callable[[str], Any], dtype: Any = object, default: Any = None) -> np.ndarray:
        """``fn(value)`` for each non-null entry, broadcast to rows (``default`` on null rows)."""
        return self.rows(np.array([default if v is None else fn(v) for v in self.values], dtype=dtype), default)

    def rows(self, table: np.ndarray, default: Any) -> np.ndarray:
        """A per-entry array broadcast to rows (``default`` on null rows)."""
        if len(table) == 0:  # no entries: every row is null
            return np.full(len(self.indices), default, dtype=table.dtype)
        out = table[self.indices]
        out[self.null] = default
        return out

    def value(self, i: int) -> str | None:
        return None if self.null[i] else self.values[self.indices[i]]


def _str_error(name: str, choices: Any) -> Callable[[str], EventError | None]:
    """The row validator's own string check (length, printable, choices) for one value."""

    def check(v: str) -> EventError | None:
        try:
            _str({name: v}, name, required=False, choices=choices)
        except EventError as e:
            return e
        return None

    return check


def _copy(e: EventError) -> EventError:
    return EventError(e.reason, e.message)  # one instance per row, never shared


def _country_error(v: str) -> EventError | None:
    e = _str_error("country", None)(v)
    if e is None and not (len(v) == 2 and v.isalpha() and v.isupper()):
        e = EventError("bad_value", f"country={v!r} must be two upper-case letters")
    return e


class _FirstFailure:
    """Per row, the first failing check in the row validator's order."""

    def __init__(self, n: int):
        self.open = np.ones(n, dtype=bool)  # no failure found yet
        self.check = np.full(n, -1, dtype=np.int32)
        self.errors_of: list[Callable[[int], EventError]] = []  # by check number

    def add(self, mask: np.ndarray, reason: str, message: Callable[[int], str]) -> None:
        self._add(mask, lambda i: EventError(reason, message(i)))

    def add_errors(self, mask: np.ndarray, error: Callable[[int], EventError]) -> None:
        self._add(mask, error)

    def _add(self, mask: np.ndarray, error: Callable[[int], EventError]) -> None:
        hit = mask & self.open
        if hit.any():
            self.check[hit] = len(self.errors_of)
            self.open &= ~hit
        self.errors_of.append(error)

    def errors(self) -> list[tuple[int, EventError]]:
        bad = np.flatnonzero(~self.open)
        return [(int(i), self.errors_of[self.check[i]](int(i))) for i in bad]


def _int_range(ff: _FirstFailure, batch: pa.RecordBatch, name: str, lo: int, hi: int, *, required: bool) -> np.ndarray:
    values, null = _ints(batch.column(name))
    if required:
        ff.add(null, "missing_field", lambda i: f"{name} is required")
    # The column type bounds the values; only compare bounds that can be crossed.
    info = np.iinfo(values.dtype)
    out = np.zeros(len(values), dtype=bool)
    if lo > info.min:
        out |= values < lo
    if hi < info.max:
        out |= values > hi
    ff.add(out & ~null, "out_of_range", lambda i: f"{name}={int(values[i])} outside [{lo}, {hi}]")
    return values


def _plain_str(ff: _FirstFailure, batch: pa.RecordBatch, name: str, required: np.ndarray | bool) -> np.ndarray:
    nchars, nonprint, null = _string_stats(batch.column(name))
    ff.add(null & required, "missing_field", lambda i: f"{name} is required")
    ff.add(~null & ((nchars < 1) | (nchars > MAX_STR)), "out_of_range",
           lambda i: f"{name} must have 1..{MAX_STR} characters, got {int(nchars[i])}")
    ff.add(~null & nonprint, "bad_value", lambda i: f"{name} must be printable ASCII")
    return null


def _dict_str(ff: _FirstFailure, col: _Dict, name: str, check: Callable[[str], EventError | None], *, required: bool) -> None:
    if required:
        ff.add(col.null, "missing_field", lambda i: f"{name} is required")
    entry_errors = [None if v is None else check(v) for v in col.values]
    if any(e is not None for e in entry_errors):
        bad = col.rows(np.array([e is not None for e in entry_errors], dtype=bool), False)
        ff.add_errors(bad, lambda i: _copy(entry_errors[col.indices[i]]))


def _prob(ff: _FirstFailure, batch: pa.RecordBatch, name: str) -> np.ndarray:
    values, null = _ints(batch.column(name))
    with np.errstate(invalid="ignore"):
        bad = ~null & ~(np.isfinite(values) & (values >= 0.0) & (values <= 1.0))
    ff.add(bad, "out_of_range", lambda i: f"{name}={float(values[i])} is not a probability")
    return null


def check_columns(
    batch: pa.RecordBatch,
    *,
    surfaces: Iterable[str] = DEFAULT_SURFACES,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> list[tuple[int, EventError]]:
    """Validate every row of a batch with :data:`EVENT_SCHEMA` (as from :func:`read_arrow`).

    Returns ``(row_index, EventError)`` for each invalid row, ascending; the
    error is the one :func:`~opengem.stream.events.validate` raises on that row
    (same reason and message). The order of the checks below is the order of
    ``validate``: a row reports its first problem.
    """
    n = batch.num_rows
    ff = _FirstFailure(n)
    surfaces = frozenset(surfaces)
    now = int(time.time() * 1000) if now_ms is None else now_ms

    _plain_str(ff, batch, "event_id", True)
    _int_range(ff, batch, "user_id", 0, MAX_ID, required=True)
    ts = _int_range(ff, batch, "ts", MIN_TS_MS, MAX_ID, required=True)
    limit = now + max_future_ms
    if limit < MAX_ID:
        ff.add(ts > limit, "future_ts", lambda i: (
            f"ts={int(ts[i])} is {(int(ts[i]) - now) / 3.6e6:.1f} h ahead of the clock (max {max_future_ms / 3.6e6:.1f} h)"
        ))
    _dict_str(ff, _Dict(batch.column("surface")), "surface", _str_error("surface", surfaces), required=True)
    kind = _Dict(batch.column("kind"))
    _dict_str(ff, kind, "kind", _str_error("kind", KIND_INDEX), required=True)
    _int_range(ff, batch, "item_id", 0, MAX_ID, required=True)

    is_ad, is_ad_null = _ints(batch.column("is_ad"))
    ff.add(is_ad_null, "missing_field", lambda i: "is_ad is required")
    # From here on a row's kind is valid (else it failed above).
    ad_kind = kind.entry_map(lambda v: v in AD_KINDS, dtype=bool, default=False)
    ff.add(is_ad != ad_kind, "inconsistent", lambda i: f"kind={kind.value(i)!r} requires is_ad={bool(ad_kind[i])}")
    request_null = _plain_str(ff, batch, "request_id", ad_kind)
    ff.add(~ad_kind & ~request_null, "inconsistent", lambda i: f"organic kind {kind.value(i)!r} must not carry request_id")
    ad_format = _Dict(batch.column("ad_format"))
    _dict_str(ff, ad_format, "ad_format", _str_error("ad_format", AD_FORMATS), required=False)
    _, advertiser_null = _ints(batch.column("advertiser_id"))
    _int_range(ff, batch, "advertiser_id", 0, MAX_ID, required=False)
    ff.add(~ad_kind & ~(ad_format.null & advertiser_null), "inconsistent",
           lambda i: f"organic kind {kind.value(i)!r} must not carry ad attributes")
    _dict_str(ff, _Dict(batch.column("country")), "country", _country_error, required=False)
    pc_null = _prob(ff, batch, "p_click")
    pv_null = _prob(ff, batch, "p_conversion")
    is_impression = kind.entry_map(lambda v: v == "impression", dtype=bool, default=False)
    ff.add(~(pc_null & pv_null) & ~is_impression, "inconsistent",
           lambda i: "p_click / p_conversion belong on impressions only")
    _int_range(ff, batch, "age_bucket", 0, 7, required=False)
    _dict_str(ff, _Dict(batch.column("device")), "device", _str_error("device", DEVICES), required=False)
    _int_range(ff, batch, "category", 0, 2**31 - 1, required=False)
    _int_range(ff, batch, "hour", 0, 23, required=False)
    return ff.errors()


def decode_arrow_columns(
    raw: bytes,
    *,
    surfaces: Iterable[str] = DEFAULT_SURFACES,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> tuple[pa.RecordBatch, list[tuple[int, EventError]]]:
    """The stream worker's fast path: ``(valid rows, [(row_index, EventError)])``.

    The valid rows stay columnar (same schema, original order; the batch is
    the decoded one, uncopied, when every row is valid); row indices in the
    errors refer to the record's rows. A record-level problem (see
    :func:`read_arrow`) raises EventError.
    """
    batch = read_arrow(raw)
    errors = check_columns(batch, surfaces=surfaces, now_ms=now_ms, max_future_ms=max_future_ms)
    if errors:
        keep = np.ones(batch.num_rows, dtype=bool)
        keep[[i for i, _ in errors]] = False
        batch = batch.filter(pa.array(keep))
    return batch, errors


# pyarrow's JSON reader with EVENT_SCHEMA's value types (dictionaries are encoded
# after reading): a type mismatch, an unknown or repeated field is an error, never
# a coercion, so whatever it accepts is exactly what ``json.loads`` would give.
_JSON_SCHEMA = pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                          for f in EVENT_SCHEMA])
_JSON_PARSE = pyarrow.json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="error",
                                        newlines_in_values=False)
_JSON_READ = pyarrow.json.ReadOptions(use_threads=False, block_size=1 << 24)
_ONE_OBJECT = re.compile(rb"[ \t]*\{")
_EMPTY_BATCH = pa.RecordBatch.from_pylist([], schema=EVENT_SCHEMA)


def bulkable_json(raw: bytes) -> bool:
    """One JSON object on one line (what the bulk reader can take as exactly one row)."""
    return (len(raw) <= MAX_RECORD_BYTES and (raw[:1] == b"{" or bool(_ONE_OBJECT.match(raw)))
            and b"\n" not in raw and b"\r" not in raw)


def _read_lines(values: Sequence[bytes]) -> pa.Table | None:
    try:
        return pyarrow.json.read_json(pa.BufferReader(b"\n".join(values) + b"\n"),
                                      read_options=_JSON_READ, parse_options=_JSON_PARSE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def read_json_objects(values: Sequence[bytes], *, checked: bool = False) -> tuple[pa.RecordBatch, list[int]]:
    """Parse one JSON event object per value in bulk (C++), for the per-event JSON path.

    Returns ``(rows, taken)``: an :data:`EVENT_SCHEMA` batch with one row per
    value listed in ``taken`` (ascending), *unvalidated* -- run
    :func:`check_columns` on it. Values left out (not one object on one line,
    a type mismatch, an unknown or repeated field, an integer out of its
    column's range, bad JSON) are for :func:`~opengem.stream.events.parse_json`,
    which gives the exact reason: a failed bulk read is bisected, so k bad
    values among n cost O(k log n) small re-reads.
    """
    taken: list[int] = []
    tables: list[pa.Table] = []

    def read(idx: list[int]) -> None:
        t = _read_lines([values[i] for i in idx])
        if t is not None and t.num_rows == len(idx):
            tables.append(t)
            taken.extend(idx)
        elif len(idx) > 1:
            read(idx[:len(idx) // 2])
            read(idx[len(idx) // 2:])

    # checked: the caller knows every value passes bulkable_json (the worker sorts records by it).
    candidates = list(range(len(values))) if checked else [i for i, v in enumerate(values) if bulkable_json(v)]
    if candidates:
        read(candidates)
    if not tables:
        return _EMPTY_BATCH, taken
    table = pa.concat_tables(tables).combine_chunks()
    cols = [table.column(f.name).chunk(0) for f in _JSON_SCHEMA]
    cols = [c.dictionary_encode().cast(f.type) if pa.types.is_dictionary(f.type) else c
            for c, f in zip(cols, EVENT_SCHEMA)]
    return pa.RecordBatch.from_arrays(cols, schema=EVENT_SCHEMA), taken


def decode(
    raw: bytes,
    *,
    surfaces: Iterable[str] = DEFAULT_SURFACES,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> list[Event]:
    """Decode one record value, JSON or Arrow, into validated Events.

    All-or-nothing, like :func:`~opengem.stream.events.parse_json`: an invalid
    row rejects the record with the first row's reason and the message
    ``"element {i}: ..."``. Raises EventError (``bad_format`` when the bytes
    are neither format, plus the reasons of ``parse_json`` / :func:`read_arrow`).
    """
    kw = dict(surfaces=surfaces, now_ms=now_ms, max_future_ms=max_future_ms)
    if sniff(raw) == "json":
        return parse_json(raw, **kw)
    batch, errors = decode_arrow_columns(raw, **kw)
    if errors:
        i, e = errors[0]
        raise EventError(e.reason, f"element {i}: {e.message}")
    return batch_to_events(batch)
