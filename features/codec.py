"""Byte layouts of the RocksDB sequence store: keys, records, heads, chunks.

Keys (integers big-endian, so one user's keys sort together and in sequence
order). Column family ``default``::

    \\x00meta              JSON: format, chunk_events, kinds, surfaces (the store's identity)
    \\x00off/<partition>   int64 LE: last applied Kafka offset of that partition
    H <uid:8>             user head, fixed size (:data:`HEAD`): counts, ranges, attributes
    D <uid:8>             chunk directory: (min_ts, max_ts) int64 LE per kept sealed chunk
    C <uid:8> <seq:4>     sealed chunk of ``chunk_events`` events (:func:`encode_chunk`)
    T <uid:8> <seq:4>     tail segment: ``R`` + raw :data:`REC` records (one commit's
                          events of the user, arrival order) or ``Z`` + an encoded chunk
                          (merged segments; it is always the first segment of the tail)

    A <seq:8>             item attribute table (format 2), a log of immutable keys: the
                          first-seen category and advertiser_id of items (:class:`AttrTable`)
    P <seq:8>             tail pack (format 3): the tails of many users, columnar across
                          them (:func:`encode_pack`); the user head names its pack and slot

Column family ``items``::

    I <item:8>            item head, fixed size (:data:`ITEM_HEAD`)

Chunk and segment keys are immutable: a new one gets a new sequence number,
an old one is only ever deleted. A reader that read a head and then misses a
key it names has raced a write (or a catch-up) and reads again.

A sealed chunk holds ``chunk_events`` events of one user that are contiguous
in arrival order, stored sorted by ts (stable, so ties keep arrival order),
columnar, each column as *byte planes* (all low bytes, then all second bytes,
...) of a per-chunk width of 0, 1, 2, 4 or 8 bytes, so that zstd (applied by
RocksDB to the SST blocks) sees long runs of similar bytes:

* ts: the first ts in the header, then the deltas (non-negative: sorted);
  format 2: when one delta alone needs a wider width than all the others (a
  gap between sessions), it is stored after the header (EXC: position,
  value) and as 0 in the section; likewise the largest dictionary id delta
  (the gap between organic and ad ids);
* item ids: a dictionary -- the distinct ids sorted and delta-encoded --
  plus a dictionary index per event (1 byte; 2 if a chunk has > 256 events;
  format 2: ``bit_length(n - 1)`` bits, packed, e.g. 5 bits in a tail of 29);
* surface and kind packed into one byte, ``surface * len(KINDS) + kind``;
* category and advertiser_id stored as value + 1 (so -1, none, is 0), per
  dictionary entry when a function of the item in this chunk (the norm),
  else per event.

Dictionary sections are zero-padded to n entries so every section of a
chunk has n values: chunks with the same header signature (n, flags,
widths) decode together in a few NumPy calls (:func:`decode_chunks`).

Format 2 adds the shard's item attribute table (``A`` keys): a chunk whose
every event carries its item's first-seen category and advertiser_id (the
norm: they are attributes of the item) sets ``_ATTRS_TABLE`` and stores no
category / advertiser section at all; a decoder takes them from the table
(``attrs``: :class:`AttrTable`). On the simulator's short histories those two
sections were ~1 byte of ~7.4 per stored event, the table costs ~0.3. Other
chunks (an item's attributes changed, or an item not in the table) keep
their own sections, so reads stay point-in-time exact. Format 1 chunks never
set the flag and decode as before.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from opengem.features.types import N_KINDS

I64_MIN = np.iinfo(np.int64).min
I64_MAX = np.iinfo(np.int64).max

META_KEY = b"\x00meta"
OFFSET_PREFIX = b"\x00off/"
FORMAT_VERSION = 3
# Formats this code reads: 1 (no item attribute table), 2 and 3 (tail packs).
READ_FORMATS = (1, 2, 3)
ATTR_PREFIX = b"A"
PACK_PREFIX = b"P"

# One event in a tail segment (packed, little-endian, 30 bytes).
REC = np.dtype([
    ("ts", "<i8"), ("item_id", "<i8"), ("surface", "i1"), ("kind", "i1"),
    ("category", "<i4"), ("advertiser_id", "<i8"),
])

# The user head: everything that changes on every append, fixed size so that a
# whole batch of heads is parsed and updated with NumPy. HEAD_V12: as formats 1 and 2
# store it; HEAD (format 3) adds where the tail's packed part is.
HEAD_V12 = np.dtype([
    ("kept", "<u4"),  # events stored now: kept sealed chunks * chunk_events + tail_n
    ("tail_n", "<u4"),  # events in tail segments
    ("raw_n", "<u4"),  # of which in raw segments
    ("seg_lo", "<u4"), ("seg_hi", "<u4"),  # tail segments are T<uid><seq> for seq in [seg_lo, seg_hi)
    ("chunk_lo", "<u4"), ("chunk_hi", "<u4"),  # kept sealed chunks, seq in [chunk_lo, chunk_hi)
    ("total", "<u8"),  # events ever appended
    ("tail_min", "<i8"), ("tail_max", "<i8"),  # ts range of the tail (I64_MAX / I64_MIN if empty)
    ("last_ts", "<i8"),  # largest ts ever appended
    ("counts", "<u4", (N_KINDS,)),  # events ever appended, per kind
    ("country", "<u2"), ("age_bucket", "i1"), ("device", "i1"),  # latest non-null wins
])
HEAD = np.dtype(HEAD_V12.descr + [
    # format 3: the first tail_n - raw_n tail events are slot ``slot`` of tail pack ``pack - 1``
    # (0: none; then an encoded first segment holds them, if any)
    ("pack", "<u4"), ("slot", "<u2"),
])

ITEM_HEAD = np.dtype([
    ("counts", "<u4", (N_KINDS,)),  # events ever appended on this item, per kind
    ("last_ts", "<i8"),
    ("advertiser_id", "<i8"), ("category", "<i4"), ("ad_format", "i1"),  # latest non-null wins
    ("_pad", "V3"),
])

DIR = np.dtype([("min", "<i8"), ("max", "<i8")])


def empty_heads(n: int) -> np.ndarray:
    h = np.zeros(n, HEAD)
    h["tail_min"] = I64_MAX
    h["tail_max"] = I64_MIN
    h["last_ts"] = I64_MIN
    h["age_bucket"] = -1
    h["device"] = -1
    return h


def empty_item_heads(n: int) -> np.ndarray:
    h = np.zeros(n, ITEM_HEAD)
    h["last_ts"] = I64_MIN
    h["advertiser_id"] = -1
    h["category"] = -1
    h["ad_format"] = -1
    return h


EMPTY_HEAD = empty_heads(1).tobytes()
EMPTY_ITEM_HEAD = empty_item_heads(1).tobytes()


def parse_fixed(values: list[bytes | None], dtype: np.dtype, empty: bytes) -> np.ndarray:
    """Multi-get results (None for missing) -> writable structured array."""
    buf = b"".join([empty if v is None else v for v in values])
    return np.frombuffer(buf, dtype).copy()


# Format 2 stores a user head as HEAD_V12 bytes with fields replaced by differences that
# are mostly 0 or small (tail_max: last_ts - tail_max, tail_min: tail_max - tail_min,
# kept: kept - tail_n, total: total - kept, seg_lo: seg_hi - seg_lo, chunk_lo:
# chunk_hi - chunk_lo; wrap-around arithmetic, so exact for any values), then this
# marker byte: a head of HEAD_V12.itemsize bytes is format 1 and read as it is.
# Format 3: HEAD bytes (pack, slot added), the same differences, marker HEAD_V3.
HEAD_V2 = 2
HEAD_V3 = 3


def _head_diffs(h: np.ndarray) -> np.ndarray:
    d = h.copy()
    d["tail_max"] = h["last_ts"] - h["tail_max"]
    d["tail_min"] = h["tail_max"] - h["tail_min"]
    d["kept"] = h["kept"] - h["tail_n"]
    d["total"] = h["total"] - h["kept"].astype(np.uint64)
    d["seg_lo"] = h["seg_hi"] - h["seg_lo"]
    d["chunk_lo"] = h["chunk_hi"] - h["chunk_lo"]
    return d


def _head_undiff(h: np.ndarray) -> np.ndarray:
    """In place (a read parses every head it needs: few NumPy calls)."""
    tmax, tmin = h["tail_max"], h["tail_min"]
    np.subtract(h["last_ts"], tmax, out=tmax)
    np.subtract(tmax, tmin, out=tmin)
    kept = h["kept"]
    kept += h["tail_n"]
    h["total"] += kept
    lo = h["seg_lo"]
    np.subtract(h["seg_hi"], lo, out=lo)
    lo = h["chunk_lo"]
    np.subtract(h["chunk_hi"], lo, out=lo)
    return h


def _widen(old: np.ndarray) -> np.ndarray:
    """HEAD_V12 array -> HEAD array (no packed tail)."""
    h = np.zeros(len(old), HEAD)
    for f in HEAD_V12.names:
        h[f] = old[f]
    return h


def parse_heads(values: list[bytes | None]) -> np.ndarray:
    """User head values from a multi-get (None: no head) -> writable HEAD array;
    format-1 heads (HEAD_V12.itemsize bytes), format-2 (one byte more) and format-3
    heads (HEAD.itemsize + 1 bytes) alike."""
    H, H12 = HEAD.itemsize, HEAD_V12.itemsize
    n = len(values)
    lens = np.fromiter((0 if v is None else len(v) for v in values), np.int64, n)
    if n and (lens == H + 1).all():  # the usual case: format-3 heads only
        a = np.frombuffer(b"".join(values), np.uint8).reshape(n, H + 1)
        return _head_undiff(np.array(a[:, :H]).view(HEAD).reshape(n))
    h = empty_heads(n)
    v3 = np.flatnonzero(lens == H + 1)
    if len(v3):
        a = np.frombuffer(b"".join([values[i] for i in v3.tolist()]), np.uint8).reshape(len(v3), H + 1)
        h[v3] = _head_undiff(np.array(a[:, :H]).view(HEAD).reshape(len(v3)))
    for size, diffs in ((H12, False), (H12 + 1, True)):  # formats 1 and 2
        idx = np.flatnonzero(lens == size)
        if len(idx):
            old = np.frombuffer(b"".join([values[i][:H12] for i in idx.tolist()]), HEAD_V12).copy()
            h[idx] = _widen(_head_undiff(old) if diffs else old)
    bad = np.flatnonzero((lens != 0) & (lens != H + 1) & (lens != H12) & (lens != H12 + 1))
    if len(bad):
        raise ValueError(f"user head of {int(lens[bad[0]])} bytes: not a format 1, 2 or 3 head")
    return h


# What a read needs of a user head, in this order (head_fields / read_fields).
READ_FIELDS = ("kept", "tail_n", "seg_lo", "seg_hi", "chunk_lo", "chunk_hi", "tail_min", "tail_max", "pack", "slot")
_HEAD_STRUCT = struct.Struct("<7IQ3q%dIHbbIH" % N_KINDS)
assert _HEAD_STRUCT.size == HEAD.itemsize
_EMPTY_FIELDS = (0, 0, 0, 0, 0, 0, I64_MAX, I64_MIN, 0, 0)
_M32 = (1 << 32) - 1


def _i64(x: int) -> int:
    return ((x + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def head_fields(values: list[bytes | None]) -> list[tuple[int, ...]] | None:
    """A few user heads from a multi-get -> per head, READ_FIELDS as Python ints:
    what :func:`parse_heads` gives, without NumPy (a single-user read spends
    ~0.1 ms in parse_heads' dozen structured-array operations, ~2 µs here).
    None if one is not a format-3 head (then use parse_heads)."""
    out = []
    size = HEAD.itemsize + 1
    unpack = _HEAD_STRUCT.unpack_from
    for v in values:
        if v is None:
            out.append(_EMPTY_FIELDS)
            continue
        if len(v) != size:
            return None
        f = unpack(v)
        tail_n, seg_hi, chunk_hi, last_ts = f[1], f[4], f[6], f[10]
        tail_max = _i64(last_ts - f[9])
        out.append(((f[0] + tail_n) & _M32, tail_n, (seg_hi - f[3]) & _M32, seg_hi, (chunk_hi - f[5]) & _M32,
                    chunk_hi, _i64(tail_max - f[8]), tail_max, f[-2], f[-1]))
    return out


def head_values(heads: np.ndarray, marker: int = HEAD_V3) -> list[bytes]:
    """HEAD array -> format-3 head values (``marker=HEAD_V2``: format 2, for tests of
    old stores; only heads without a packed tail)."""
    if marker == HEAD_V2:
        if heads["pack"].any():
            raise ValueError("a format-2 head cannot name a tail pack")
        d = np.zeros(len(heads), HEAD_V12)
        for f in HEAD_V12.names:
            d[f] = heads[f]
        heads = d
    H = heads.dtype.itemsize
    n = len(heads)
    a = np.empty((n, H + 1), np.uint8)
    a[:, :H] = _head_diffs(heads).view(np.uint8).reshape(n, H)
    a[:, H] = marker
    b = a.tobytes()
    return [b[i : i + H + 1] for i in range(0, n * (H + 1), H + 1)]


# --------------------------------------------------------------------------- keys


def _id_keys(prefix: bytes, ids: np.ndarray) -> list[bytes]:
    n = len(ids)
    a = np.empty((n, 9), np.uint8)
    a[:, 0] = prefix[0]
    a[:, 1:] = np.ascontiguousarray(ids, dtype=">u8").view(np.uint8).reshape(n, 8)
    b = a.tobytes()
    return [b[i : i + 9] for i in range(0, 9 * n, 9)]


def _seq_keys(prefix: bytes, ids: np.ndarray, seqs: np.ndarray) -> list[bytes]:
    n = len(ids)
    a = np.empty((n, 13), np.uint8)
    a[:, 0] = prefix[0]
    a[:, 1:9] = np.ascontiguousarray(ids, dtype=">u8").view(np.uint8).reshape(n, 8)
    a[:, 9:] = np.ascontiguousarray(seqs, dtype=">u4").view(np.uint8).reshape(n, 4)
    b = a.tobytes()
    return [b[i : i + 13] for i in range(0, 13 * n, 13)]


def head_keys(uids: np.ndarray) -> list[bytes]:
    return _id_keys(b"H", uids)


def dir_keys(uids: np.ndarray) -> list[bytes]:
    return _id_keys(b"D", uids)


def item_keys(items: np.ndarray) -> list[bytes]:
    return _id_keys(b"I", items)


def chunk_keys(uids: np.ndarray, seqs: np.ndarray) -> list[bytes]:
    return _seq_keys(b"C", uids, seqs)


def seg_keys(uids: np.ndarray, seqs: np.ndarray) -> list[bytes]:
    return _seq_keys(b"T", uids, seqs)


def user_key(prefix: bytes, uid: int, seq: int | None = None) -> bytes:
    k = prefix + uid.to_bytes(8, "big")
    return k if seq is None else k + seq.to_bytes(4, "big")


def offset_key(partition: int) -> bytes:
    return OFFSET_PREFIX + str(int(partition)).encode()


# --------------------------------------------------------------------------- chunks

# Header of an encoded chunk (packed). The first 7 bytes (n, flags, widths)
# are its layout *signature*: chunks with equal signatures decode together.
CHUNK_HDR = np.dtype([
    ("n", "<u2"), ("flags", "u1"),
    ("w_dt", "u1"), ("w_du", "u1"), ("w_cat", "u1"), ("w_adv", "u1"),  # bytes per value: 0, 1, 2, 4 or 8
    ("nu", "<u2"), ("ts0", "<i8"), ("item0", "<i8"),
])
_HS = CHUNK_HDR.itemsize
_SIG = 7
_CAT_PER_ITEM = 1  # category stored per dictionary entry (a function of the item in this chunk)
_ADV_PER_ITEM = 2  # advertiser_id likewise
_ATTRS_TABLE = 4  # format 2: category and advertiser_id are the items' entries in the attribute table
_IDX_BITS = 8  # format 2: dictionary indices packed in idx_bits(n) bits each
_DT_EXC = 16  # format 2: the largest ts delta is an exception (EXC after the header), stored as 0
_DU_EXC = 32  # format 2: the largest dictionary id delta likewise (the gap between organic and ad ids)
EXC = np.dtype([("pos", "<u2"), ("val", "<u8")])
_PLANE_VIEW = {2: "<u2", 4: "<u4", 8: "<u8"}
# surface * N_KINDS + kind -> surface, kind
_SK_SURFACE = (np.arange(256) // N_KINDS).astype(np.int8)
_SK_KIND = (np.arange(256) % N_KINDS).astype(np.int8)
_OUT_DTYPES = (np.int64, np.int64, np.int8, np.int8, np.int32, np.int64)

# Tail segment values start with a type byte.
SEG_RAW = b"R"  # REC records in arrival order
SEG_CHUNK = b"Z"  # an encoded chunk (merged segments; all arrived before later segments)


def _width(x: np.ndarray) -> int:
    """Bytes per value (0, 1, 2, 4 or 8) for non-negative integers ``x``."""
    m = int(x.max()) if len(x) else 0
    return 0 if m == 0 else 1 if m < 1 << 8 else 2 if m < 1 << 16 else 4 if m < 1 << 32 else 8


def idx_bits(n: int) -> int:
    """Bits per dictionary index of a format-2 chunk of n events (indices < n)."""
    return max(1, (n - 1).bit_length())


def _pack_bits(x: np.ndarray, b: int) -> bytes:
    """Non-negative integers (N,) < 2**b -> N * b bits, little-endian within and across values."""
    bits = (np.asarray(x, np.uint64)[:, None] >> np.arange(b, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _planes(x: np.ndarray, w: int) -> bytes:
    """Non-negative integers (N,) -> their ``w`` low bytes as byte planes (plane-major)."""
    if w == 0:
        return b""
    b = np.ascontiguousarray(x, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return b[:, :w].T.tobytes()


def encode_chunk(rec: np.ndarray, attrs: "AttrTable | None" = None, exceptions: bool = True) -> tuple[bytes, int, int]:
    """Events (REC, arrival order, 1..65535) -> (chunk bytes, min ts, max ts).

    ``exceptions``: may store the largest ts / id delta apart (``_DT_EXC``,
    ``_DU_EXC``). The store passes False for sealed chunks: their widths then
    depend on the whole section, so a user's chunks mostly share one layout
    signature and decode in one pass (exceptions split them into several).

    ``attrs``: the shard's item attribute table; when every event's category
    and advertiser_id are its item's entries there, neither is stored
    (``_ATTRS_TABLE``) and decoding needs the same table.

    Sections, n values each, as byte planes of the width in the header: ts
    deltas (first 0), surface-kind byte, dictionary index (1 byte, 2 if
    n > 256), dictionary id deltas (first 0, padded with zeros to n), category
    + 1 and advertiser_id + 1 (per dictionary entry when a function of the
    item, padded; else per event). Zero padding costs next to nothing once
    zstd compresses the SST block; the fixed section sizes let
    :func:`decode_chunks` decode many chunks with a few NumPy calls.
    """
    n = len(rec)
    r = rec[np.argsort(rec["ts"], kind="stable")]
    ts = r["ts"]
    dt = np.zeros(n, np.uint64)
    dt[1:] = np.diff(ts)
    uniq, inv = np.unique(r["item_id"], return_inverse=True)
    inv = inv.reshape(n)
    nu = len(uniq)
    du = np.zeros(n, np.uint64)
    du[1:nu] = np.diff(uniq)
    sk = r["surface"].astype(np.int64) * N_KINDS + r["kind"]
    flags = 0
    cols = []
    for name, flag in (("category", _CAT_PER_ITEM), ("advertiser_id", _ADV_PER_ITEM)):
        v = r[name].astype(np.int64) + 1  # -1 (none) -> 0
        per_item = np.zeros(n, np.int64)
        per_item[inv] = v
        if np.array_equal(per_item[inv], v):
            flags |= flag
            v = per_item
        cols.append(v.astype(np.uint64))
    if attrs is not None and flags == _CAT_PER_ITEM | _ADV_PER_ITEM:
        found, tcat, tadv = attrs.lookup(uniq)
        if found.all() and np.array_equal(tcat.astype(np.int64) + 1, cols[0][:nu].astype(np.int64)) \
                and np.array_equal((tadv + 1).astype(np.uint64), cols[1][:nu]):
            flags |= _ATTRS_TABLE
            cols = [np.zeros(0, np.uint64), np.zeros(0, np.uint64)]
    flags |= _IDX_BITS
    exc = []
    for x, flag in ((dt, _DT_EXC), (du, _DU_EXC)) if exceptions else ():
        # One delta much larger than the rest (a gap between sessions, between id ranges)
        # would widen every value of the section: store it on its own.
        j = int(np.argmax(x))
        rest = x.copy()
        rest[j] = 0
        if (_width(x) - _width(rest)) * n > EXC.itemsize:
            flags |= flag
            exc.append(np.array([(j, x[j])], EXC).tobytes())
            x[j] = 0
    w = [_width(dt), _width(du), _width(cols[0]), _width(cols[1])]
    hdr = np.array([(n, flags, *w, nu, ts[0], uniq[0])], CHUNK_HDR).tobytes() + b"".join(exc)
    ib = idx_bits(n)
    body = [hdr, _planes(dt, w[0]), sk.astype(np.uint8).tobytes(), _planes(inv, 1) if ib == 8 else _pack_bits(inv, ib),
            _planes(du, w[1]), _planes(cols[0], w[2]), _planes(cols[1], w[3])]
    return b"".join(body), int(ts[0]), int(ts[-1])


_POW2 = np.int64(1) << np.arange(17, dtype=np.int64)


def _widths(m: np.ndarray) -> np.ndarray:
    """:func:`_width` of each maximum in ``m`` (uint64): 0, 1, 2, 4 or 8."""
    w = np.full(len(m), 8, np.int64)
    w[m < np.uint64(1 << 32)] = 4
    w[m < np.uint64(1 << 16)] = 2
    w[m < np.uint64(1 << 8)] = 1
    w[m == 0] = 0
    return w


def encode_chunks(rec: np.ndarray, starts: np.ndarray, lens: np.ndarray, attrs: "AttrTable | None" = None,
                  exceptions: Any = True) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """:func:`encode_chunk` of many chunks at once, byte for byte the same values:
    chunk k is ``rec[starts[k] : starts[k] + lens[k]]`` (1..65535 events each);
    ``exceptions``: a bool, or one per chunk. Returns (blobs, min ts (K,), max ts (K,)).

    A NumPy pass over all the chunks' events instead of ~40 NumPy calls per chunk
    (a commit seals and merges the tails of many users): the per-chunk sorts become
    two lexsorts, the widths reduceat's, and each byte plane one scatter into one buffer.
    """
    starts = np.asarray(starts, np.int64)
    lens = np.asarray(lens, np.int64)
    K = len(lens)
    if K == 0:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    if lens.min() < 1 or lens.max() > 65535:
        raise ValueError("a chunk holds 1..65535 events")
    exc_ok = np.broadcast_to(np.asarray(exceptions, bool), (K,))
    E = int(lens.sum())
    cstart = np.zeros(K, np.int64)
    np.cumsum(lens[:-1], out=cstart[1:])
    cid = np.repeat(np.arange(K), lens)
    pos = np.arange(E, dtype=np.int64) - cstart[cid]
    src = starts[cid] + pos
    ts = rec["ts"][src]
    item = rec["item_id"][src]
    o = np.lexsort((ts, cid))  # per chunk by ts, stable
    src = src[o]
    ts, item = ts[o], item[o]
    n_ev = lens[cid]

    dt = np.zeros(E, np.uint64)
    dt[1:] = (ts[1:] - ts[:-1]).view(np.uint64)
    dt[cstart] = 0
    # the dictionaries: distinct ids per chunk, sorted
    o2 = np.lexsort((item, cid))
    si = item[o2]
    new = np.ones(E, bool)
    new[1:] = si[1:] != si[:-1]
    new[cstart] = True
    gid = np.cumsum(new) - 1  # (E,) in o2 order: index of the event's entry in uniq
    uniq = si[new]
    U = len(uniq)
    ustart = gid[cstart]
    nu = np.diff(np.append(ustart, U))
    ucid = cid[new]  # (cid is sorted, so cid[o2] == cid)
    uj = np.arange(U, dtype=np.int64) - ustart[ucid]
    dpos = cstart[ucid] + uj  # where entry j of chunk k goes in a section padded to n
    inv = np.empty(E, np.int64)
    inv[o2] = gid - ustart[cid]
    du = np.zeros(E, np.uint64)
    duv = np.zeros(U, np.uint64)
    duv[1:] = (uniq[1:] - uniq[:-1]).view(np.uint64)
    duv[uj == 0] = 0
    du[dpos] = duv
    sk = (rec["surface"][src].astype(np.int64) * N_KINDS + rec["kind"][src]).astype(np.uint8)

    flags = np.full(K, _IDX_BITS, np.int64)
    secs, firsts, per = [], [], []
    for name, flag in (("category", _CAT_PER_ITEM), ("advertiser_id", _ADV_PER_ITEM)):
        v = rec[name][src].astype(np.int64) + 1  # -1 (none) -> 0
        vs = v[o2]
        first = vs[new]  # the entry's value (all of them, when a function of the item)
        f = np.logical_and.reduceat(vs == first[gid], cstart)
        flags[f] |= flag
        sec = v.astype(np.uint64)
        sec[f[cid]] = 0
        fu = f[ucid]
        sec[dpos[fu]] = first[fu].astype(np.uint64)
        secs.append(sec)
        firsts.append(first)
        per.append(f)
    if attrs is not None:
        both = per[0] & per[1]
        mt = both[ucid]
        if mt.any():
            found, tcat, tadv = attrs.lookup(uniq[mt])
            ok = found & (tcat.astype(np.int64) + 1 == firsts[0][mt]) \
                & ((tadv + 1).astype(np.uint64) == firsts[1][mt].astype(np.uint64))
            bad = np.bincount(ucid[mt][~ok], minlength=K)
            table = both & (bad == 0)
            flags[table] |= _ATTRS_TABLE
            te = table[cid]
            secs[0][te] = 0
            secs[1][te] = 0

    excs = []
    w_dt_du = []
    for x, flag in ((dt, _DT_EXC), (du, _DU_EXC)):
        m1 = np.maximum.reduceat(x, cstart)
        j = np.minimum.reduceat(np.where(x == m1[cid], pos, E), cstart)
        at = cstart + j
        rest = x.copy()
        rest[at] = 0
        m2 = np.maximum.reduceat(rest, cstart)
        w1, w2 = _widths(m1), _widths(m2)
        e = exc_ok & ((w1 - w2) * lens > EXC.itemsize)
        flags[e] |= flag
        x[at[e]] = 0
        excs.append((e, j, m1))
        w_dt_du.append(np.where(e, w2, w1))
    w = [w_dt_du[0], w_dt_du[1]] + [_widths(np.maximum.reduceat(s, cstart)) for s in secs]

    hdr = np.zeros(K, CHUNK_HDR)
    hdr["n"] = lens
    hdr["flags"] = flags
    for f, wf in zip(("w_dt", "w_du", "w_cat", "w_adv"), w):
        hdr[f] = wf
    hdr["nu"] = nu
    hdr["ts0"] = ts[cstart]
    hdr["item0"] = uniq[ustart]
    ne = excs[0][0].astype(np.int64) + excs[1][0]
    ib = np.maximum(1, np.searchsorted(_POW2, lens))  # idx_bits(n)
    nb = (lens * ib + 7) // 8
    size = _HS + EXC.itemsize * ne + lens * (1 + w[0] + w[1] + w[2] + w[3]) + nb
    base = np.zeros(K, np.int64)
    np.cumsum(size[:-1], out=base[1:])
    out = np.zeros(int(base[-1] + size[-1]), np.uint8)
    out[(base[:, None] + np.arange(_HS)).reshape(-1)] = hdr.view(np.uint8)
    off = base + _HS
    for e, j, m1 in excs:
        if e.any():
            ex = np.zeros(int(e.sum()), EXC)
            ex["pos"] = j[e]
            ex["val"] = m1[e]
            out[(off[e][:, None] + np.arange(EXC.itemsize)).reshape(-1)] = ex.view(np.uint8)
            off = off + EXC.itemsize * e

    def planes(x: np.ndarray, wk: np.ndarray) -> None:
        nonlocal off
        we = wk[cid]
        xb = np.ascontiguousarray(x, "<u8").view(np.uint8).reshape(E, 8)
        dst = off[cid] + pos
        for b in range(int(wk.max())):
            m = we > b
            out[dst[m] + b * n_ev[m]] = xb[m, b]
        off = off + lens * wk

    planes(dt, w[0])
    out[off[cid] + pos] = sk
    off = off + lens
    # dictionary indices, ib bits each, little-endian: one bit array, sections byte-aligned
    bitbase = np.zeros(K, np.int64)
    np.cumsum(nb[:-1] * 8, out=bitbase[1:])
    bits = np.zeros(int(nb.sum()) * 8, np.uint8)
    ibe = ib[cid]
    dst = bitbase[cid] + pos * ibe
    for t in range(int(ib.max())):
        m = ibe > t
        bits[dst[m] + t] = (inv[m] >> t) & 1
    packed = np.packbits(bits, bitorder="little")
    bcid = np.repeat(np.arange(K), nb)
    out[off[bcid] + np.arange(len(packed)) - (bitbase // 8)[bcid]] = packed
    off = off + nb
    planes(du, w[1])
    planes(secs[0], w[2])
    planes(secs[1], w[3])
    buf = out.tobytes()
    ends = (base + size).tolist()
    blobs = [buf[a:b] for a, b in zip(base.tolist(), ends)]
    return blobs, ts[cstart], ts[cstart + lens - 1]


def decode_chunk_groups(blobs: list[bytes], attrs: "AttrTable | None" = None
                        ) -> tuple[list[list[np.ndarray]], np.ndarray, np.ndarray, np.ndarray]:
    """Decode chunks, one NumPy pass per layout signature. ``attrs``: the item
    attribute table, needed by format-2 chunks that use it (:class:`MissingAttrs`
    if an item is not in it).

    Returns ``(groups, group, start, lengths)``: ``groups[g]`` is the six
    columns (ts, item_id, surface, kind, category, advertiser_id) of group g's
    chunks concatenated; chunk k (input order) is rows ``start[k] : start[k] +
    lengths[k]`` of ``groups[group[k]]``, sorted by ts.
    """
    K = len(blobs)
    lengths = np.fromiter((b[0] | b[1] << 8 for b in blobs), np.int64, K)
    if K == 0:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64), lengths
    sigs = [b[:_SIG] for b in blobs]
    if sigs.count(sigs[0]) == K:  # the usual case: one layout
        start = np.zeros(K, np.int64)
        np.cumsum(lengths[:-1], out=start[1:])
        return [_decode_group(blobs, attrs)], np.zeros(K, np.int64), start, lengths
    members: dict[bytes, list[int]] = {}
    for k, sg in enumerate(sigs):
        members.setdefault(sg, []).append(k)
    groups, group, start = [], np.empty(K, np.int64), np.empty(K, np.int64)
    for g, ks in enumerate(members.values()):
        groups.append(_decode_group([blobs[k] for k in ks], attrs))
        group[ks] = g
        n = int(lengths[ks[0]])  # one signature, one n
        start[ks] = np.arange(len(ks)) * n
    return groups, group, start, lengths


def decode_chunks(blobs: list[bytes], attrs: "AttrTable | None" = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Encoded chunks -> (columns, lengths): the six columns of all chunks
    concatenated in input order, each chunk sorted by ts, and each chunk's
    event count (K,)."""
    groups, group, start, lengths = decode_chunk_groups(blobs, attrs)
    if not groups:
        return [np.empty(0, dt) for dt in _OUT_DTYPES], lengths
    if len(groups) == 1:
        return groups[0], lengths
    parts = [[c[a : a + n] for c in groups[g]] for g, a, n in zip(group.tolist(), start.tolist(), lengths.tolist())]
    return [np.concatenate([p[j] for p in parts]) for j in range(6)], lengths


def _decode_group(blobs: list[bytes], table: "AttrTable | None" = None) -> list[np.ndarray]:
    """Chunks of one signature -> their columns, concatenated."""
    K = len(blobs)
    A = np.frombuffer(b"".join(blobs), np.uint8).reshape(K, -1)
    hdr = np.ascontiguousarray(A[:, :_HS]).view(CHUNK_HDR).reshape(K)
    h0 = hdr[0]
    n = int(h0["n"])
    off = _HS
    excs = []  # (positions (K,), values (K,) uint64) of the dt, du exceptions, or None
    for flag in (_DT_EXC, _DU_EXC):
        if int(h0["flags"]) & flag:
            e = np.ascontiguousarray(A[:, off : off + EXC.itemsize]).view(EXC).reshape(K)
            off += EXC.itemsize
            excs.append((e["pos"].astype(np.int64), e["val"]))
        else:
            excs.append(None)
    cols_n = np.arange(n)[None, :]

    def section(w: int) -> np.ndarray | None:  # (K, n) unsigned, or None when w == 0
        nonlocal off
        if w == 0:
            return None
        X = A[:, off : off + w * n]
        off += w * n
        if w == 1:
            return X
        M = np.empty((K, n, w), np.uint8)
        M[...] = X.reshape(K, w, n).transpose(0, 2, 1)
        return M.view(_PLANE_VIEW[w]).reshape(K, n)

    dt = section(int(h0["w_dt"]))
    sk = section(1).reshape(-1)
    if int(h0["flags"]) & _IDX_BITS and idx_bits(n) != 8:  # one signature, one flags byte
        b = idx_bits(n)
        nb = (n * b + 7) // 8
        bits = np.unpackbits(A[:, off : off + nb], axis=1, bitorder="little")[:, : n * b].reshape(K, n, b)
        off += nb
        idx = bits.astype(np.int64) @ (np.int64(1) << np.arange(b, dtype=np.int64))  # (K, n)
    else:
        idx = section(1 if n <= 256 else 2)
    du = section(int(h0["w_du"]))
    cat = section(int(h0["w_cat"]))
    adv = section(int(h0["w_adv"]))
    ts = np.cumsum(dt, axis=1, dtype=np.int64) if dt is not None else np.zeros((K, n), np.int64)
    ts += hdr["ts0"][:, None]
    if excs[0] is not None:  # the delta at pos was stored as 0: every later ts is val larger
        ts += np.where(cols_n >= excs[0][0][:, None], excs[0][1].view(np.int64)[:, None], 0)
    flat = idx + (np.arange(K, dtype=np.int64) * n)[:, None]  # (K, n) positions of each event's dictionary entry
    if du is not None or excs[1] is not None:
        uniq = np.cumsum(du, axis=1, dtype=np.uint64).view(np.int64) if du is not None else np.zeros((K, n), np.int64)
        uniq += hdr["item0"][:, None]
        if excs[1] is not None:  # likewise for the dictionary ids
            uniq += np.where(cols_n >= excs[1][0][:, None], excs[1][1].view(np.int64)[:, None], 0)
        item = uniq.reshape(-1)[flat]
    else:
        item = np.repeat(hdr["item0"], n).reshape(K, n)
    flags = hdr["flags"]
    if int(h0["flags"]) & _ATTRS_TABLE:  # one signature, one flags byte
        if table is None:
            raise MissingAttrs(np.unique(item), "chunk takes category / advertiser_id from the item attribute table; none given")
        # the dictionaries (rows sorted, padded with their last id): sorted runs search fast
        keys = uniq.reshape(-1) if du is not None or excs[1] is not None else hdr["item0"]
        found, tcat, tadv = table.lookup(keys)
        if not found.all():
            missing = np.unique(keys[~found])
            raise MissingAttrs(missing, f"{len(missing)} items not in the attribute table")
        if du is not None or excs[1] is not None:
            tcat, tadv = tcat[flat.reshape(-1)], tadv[flat.reshape(-1)]
        else:  # one item per chunk
            tcat, tadv = np.repeat(tcat, n), np.repeat(tadv, n)
        return [ts.reshape(-1), item.reshape(-1), _SK_SURFACE.take(sk), _SK_KIND.take(sk), tcat, tadv]
    attrs = []
    for v, flag, dt_out in ((cat, _CAT_PER_ITEM, np.int32), (adv, _ADV_PER_ITEM, np.int64)):
        if v is None:
            attrs.append(np.full(K * n, -1, dt_out))
            continue
        per_item = (flags & flag) != 0
        if per_item.all():
            v = v.reshape(-1)[flat]
        elif per_item.any():
            v = np.where(per_item[:, None], v.reshape(-1)[flat], v)
        # value + 1 was stored (-1, none, as 0); int64 wrap-around keeps 2**63 - 1 exact
        attrs.append((v.astype(np.int64) - 1).astype(dt_out, copy=False).reshape(-1))
    return [ts.reshape(-1), item.reshape(-1), _SK_SURFACE.take(sk), _SK_KIND.take(sk), attrs[0], attrs[1]]


def decode_chunk(buf: bytes, attrs: "AttrTable | None" = None) -> tuple[np.ndarray, ...]:
    """One chunk -> (ts, item_id, surface, kind, category, advertiser_id), sorted by ts."""
    return tuple(decode_chunks([buf], attrs)[0])


def columns_to_rec(cols: list[np.ndarray] | tuple[np.ndarray, ...]) -> np.ndarray:
    """Decoded columns -> REC records."""
    rec = np.empty(len(cols[0]), REC)
    for f, c in zip(REC.names, cols):
        rec[f] = c
    return rec


def decode_segment(v: bytes, attrs: "AttrTable | None" = None) -> np.ndarray:
    """A tail segment value -> REC records (an encoded one comes out sorted by ts)."""
    if v[:1] == SEG_CHUNK:
        return columns_to_rec(decode_chunks([v[1:]], attrs)[0])
    return np.frombuffer(v, REC, offset=1)


# --------------------------------------------------------------------------- tail packs
#
# Format 3. compact() moves the tails of users without sealed chunks (most users of a
# store of short histories, each tail a few dozen events) into packs of ~PACK events:
# one value holding every column of all of them, each column contiguous across users
# (byte planes as in chunks), items through one dictionary for the whole pack. Against
# one encoded chunk per user this drops the per-user header, key and dictionary (the
# pack's dictionary is shared: popular items appear once), and zstd sees each column's
# bytes together: 1M simulator events, tails 3.22 -> ~2.8 bytes per stored event.
# Events of a slot are sorted by ts (stable), like an encoded chunk; category and
# advertiser_id always come from the attribute table (only tails whose every event
# carries its item's table entries are packed).

PACK_HDR = np.dtype([
    ("version", "u1"), ("G", "<u4"), ("N", "<u4"), ("NU", "<u4"),
    ("w_n", "u1"), ("w_ts0", "u1"), ("w_dt", "u1"), ("w_du", "u1"), ("w_idx", "u1"),
    ("ts_base", "<i8"), ("item0", "<i8"), ("exc_pos", "<u4"), ("exc_val", "<u8"),
])
_PHS = PACK_HDR.itemsize


def pack_key(seq: int) -> bytes:
    return PACK_PREFIX + int(seq).to_bytes(8, "big")


def _zigzag(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.int64)
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.uint64)
    return ((z >> np.uint64(1)).view(np.int64)) ^ -((z & np.uint64(1)).view(np.int64))


def _width_idx(m: int) -> int:
    return 1 if m < 1 << 8 else 2 if m < 1 << 16 else 4


PACK_MAX_SLOTS = 65535  # HEAD slot is u2


def encode_pack(tails: list[np.ndarray]) -> tuple[bytes, np.ndarray]:
    """Tails (REC, each 1..2**32 events, any order) of G >= 1 users -> (pack value, slot
    of each tail). Slots are in the order of the tails' first ts (their differences stay
    small). Sections after the header (PACK_HDR), as byte planes: events per slot (G),
    zigzag differences of the slots' first ts (G, the first 0), ts deltas within each slot
    (N, each slot's first 0), surface-kind bytes (N), the dictionary's id deltas (NU; the
    largest one apart in the header, stored as 0) and the dictionary index of each event
    (N; 1, 2 or 4 bytes)."""
    G = len(tails)
    rs = [t[np.argsort(t["ts"], kind="stable")] for t in tails]
    ts0 = np.array([int(r["ts"][0]) for r in rs], np.int64)
    order = np.argsort(ts0, kind="stable")
    slot = np.empty(G, np.int64)
    slot[order] = np.arange(G)
    r = np.concatenate([rs[i] for i in order.tolist()])
    n = np.array([len(rs[i]) for i in order.tolist()], np.uint64)
    N = len(r)
    first = np.zeros(N, bool)
    first[np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)] = True
    ts = r["ts"]
    dt = np.zeros(N, np.uint64)
    dt[1:] = np.diff(ts).view(np.uint64)
    dt[first] = 0
    z0 = np.zeros(G, np.uint64)
    z0[1:] = _zigzag(np.diff(ts0[order]))
    uniq, inv = np.unique(r["item_id"], return_inverse=True)
    inv = inv.reshape(N).astype(np.uint64)
    NU = len(uniq)
    du = np.zeros(NU, np.uint64)
    du[1:] = np.diff(uniq).view(np.uint64)
    j = int(np.argmax(du))
    exc = int(du[j])
    du[j] = 0
    sk = (r["surface"].astype(np.int64) * N_KINDS + r["kind"]).astype(np.uint8)
    w = [_width(n), _width(z0), _width(dt), _width(du), _width_idx(NU - 1)]
    hdr = np.array([(1, G, N, NU, *w, ts0[order[0]], uniq[0], j, exc)], PACK_HDR).tobytes()
    body = [hdr, _planes(n, w[0]), _planes(z0, w[1]), _planes(dt, w[2]), sk.tobytes(),
            _planes(du, w[3]), _planes(inv, w[4])]
    return b"".join(body), slot


_PACK_HDR_STRUCT = struct.Struct("<BIII5BqqIQ")  # PACK_HDR, parsed without NumPy (a read parses one per pack)
assert _PACK_HDR_STRUCT.size == _PHS


def decode_pack(v: bytes, slots: np.ndarray, attrs: "AttrTable | None") -> tuple[list[np.ndarray], np.ndarray]:
    """The tails in ``slots`` (K,) of a pack -> (the six columns of all of them
    concatenated in the order of ``slots``, each sorted by ts; events per slot (K,)).
    Decodes only what those slots need: the per-slot sections and the dictionary up to
    the slots' last slot / largest index (prefix sums), the events of the slots."""
    _, G, N, NU, w_n, w_ts0, w_dt, w_du, w_idx, ts_base, item0, exc_pos, exc_val = _PACK_HDR_STRUCT.unpack_from(v)
    A = np.frombuffer(v, np.uint8)
    slots = np.asarray(slots, np.int64)

    def prefix(off: int, m: int, w: int, count: int) -> np.ndarray:  # the first count values of a section of m
        if w == 0:
            return np.zeros(count, np.uint64)
        x = np.zeros((count, 8), np.uint8)
        x[:, :w] = A[off : off + w * m].reshape(w, m)[:, :count].T
        return x.view("<u8").reshape(count)

    def at(off: int, m: int, w: int, pos: np.ndarray) -> np.ndarray:  # values at pos of a section of m values
        if w == 0:
            return np.zeros(len(pos), np.uint64)
        out = A[off + pos].astype(np.uint64)
        for k in range(1, w):
            out |= A[off + k * m + pos].astype(np.uint64) << np.uint64(8 * k)
        return out

    o_n = _PHS
    o_ts0 = o_n + w_n * G
    o_dt = o_ts0 + w_ts0 * G
    o_sk = o_dt + w_dt * N
    o_du = o_sk + N
    o_idx = o_du + w_du * NU
    last = int(slots.max()) + 1
    n = prefix(o_n, G, w_n, last).astype(np.int64)
    ts0 = np.cumsum(_unzigzag(prefix(o_ts0, G, w_ts0, last))) + ts_base
    start = np.zeros(last + 1, np.int64)
    np.cumsum(n, out=start[1:])
    lens = n[slots]
    if len(slots) == 1:  # the usual case: one user of the pack
        a = int(start[slots[0]])
        pos = np.arange(a, a + int(lens[0]), dtype=np.int64)
        dt = at(o_dt, N, w_dt, pos).view(np.int64)
        ts = np.cumsum(dt) + ts0[slots[0]]  # the slot's first delta is 0
    else:
        rep = np.repeat(np.arange(len(slots)), lens)
        seg0 = np.zeros(len(slots), np.int64)
        np.cumsum(lens[:-1], out=seg0[1:])
        pos = np.arange(int(lens.sum()), dtype=np.int64) - seg0[rep] + start[slots][rep]  # event positions
        dt = at(o_dt, N, w_dt, pos).view(np.int64)
        cs = np.cumsum(dt)
        ts = cs - cs[seg0][rep] + ts0[slots][rep]  # each slot's deltas summed from its first (0)
    sk = A[o_sk + pos]
    idx = at(o_idx, N, w_idx, pos).astype(np.int64)
    du = prefix(o_du, NU, w_du, int(idx.max()) + 1 if len(idx) else 0)
    if exc_pos < len(du):
        du[exc_pos] += np.uint64(exc_val)
    uniq = np.cumsum(du, dtype=np.uint64).view(np.int64) + item0
    item = uniq[idx]
    if attrs is None:
        raise MissingAttrs(np.unique(item), "a tail pack takes category / advertiser_id from the item attribute table; none given")
    found, cat, adv = attrs.lookup(item)
    if not found.all():
        missing = np.unique(item[~found])
        raise MissingAttrs(missing, f"{len(missing)} items not in the attribute table")
    return [ts, item, _SK_SURFACE.take(sk), _SK_KIND.take(sk), cat, adv], lens


# --------------------------------------------------------------------------- item attribute table


class MissingAttrs(KeyError):
    """A chunk names items that the reader's attribute table does not hold (yet);
    ``args``: (those item ids, message)."""


def attr_key(seq: int) -> bytes:
    return ATTR_PREFIX + int(seq).to_bytes(8, "big")


def encode_attrs(items: np.ndarray, cat: np.ndarray, adv: np.ndarray) -> bytes:
    """Entries of one ``A`` key: ``items`` (m >= 1,) sorted, distinct; their category
    and advertiser_id. Layout: m (u4), widths of the id deltas, cat + 1 and adv + 1
    (u1 each), the first id (i8), then the id deltas (first 0), cat + 1 and adv + 1
    as byte planes of m values each."""
    items = np.asarray(items, np.int64)
    m = len(items)
    d = np.zeros(m, np.uint64)
    d[1:] = np.diff(items).view(np.uint64)  # sorted: non-negative (mod 2**64 for the widest spans)
    c = (np.asarray(cat, np.int64) + 1).astype(np.uint64)
    a = (np.asarray(adv, np.int64) + 1).astype(np.uint64)  # int64 wrap-around keeps 2**63 - 1 exact
    w = [_width(d), _width(c), _width(a)]
    return b"".join([np.array([m], "<u4").tobytes(), bytes(w), np.array([items[0]], "<i8").tobytes(),
                     _planes(d, w[0]), _planes(c, w[1]), _planes(a, w[2])])


def decode_attrs(v: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ``A`` value -> (item ids (m,) int64 sorted, category (m,) int32, advertiser_id (m,) int64)."""
    m = int.from_bytes(v[:4], "little")
    w = v[4:7]
    A = np.frombuffer(v, np.uint8)
    off = 15

    def planes(w: int) -> np.ndarray:
        nonlocal off
        if w == 0:
            return np.zeros(m, np.uint64)
        M = np.zeros((m, 8), np.uint8)
        M[:, :w] = A[off : off + w * m].reshape(w, m).T
        off += w * m
        return M.view("<u8").reshape(m)

    d, c, a = planes(w[0]), planes(w[1]), planes(w[2])
    ids = np.cumsum(d, dtype=np.uint64).view(np.int64) + np.frombuffer(v[7:15], "<i8")[0]
    return ids, (c.astype(np.int64) - 1).astype(np.int32), a.astype(np.int64) - 1


class AttrTable:
    """The shard's item attribute table in memory: the first-seen category and
    advertiser_id of every item, each entry immutable once written.

    In RocksDB it is a log of immutable keys ``A <seq:8>`` (:func:`encode_attrs`):
    a commit that meets new items adds one key with them, in the same write batch
    as the chunks that use them; the writer merges the small keys into one now
    and then (a new key, the old ones deleted in the same batch). A reader holds
    the union of the keys it has read and, when a chunk names an item it lacks,
    reads the keys after the last one it saw (``last_seq``).

    In memory: sorted arrays searched with NumPy, replaced whole (one attribute)
    when they grow, so a reader thread never sees a half-updated table.
    """

    # The writer merges the keys size-tiered: a key of m entries is in tier t when
    # SMALL * MERGE_KEYS**(t-1) <= m < SMALL * MERGE_KEYS**t (tier 0: m < SMALL); once
    # MERGE_KEYS keys share a tier, they and every smaller key become one key. An entry is
    # rewritten once per tier it climbs (3 tiers up to 8M entries), a merge never rewrites a
    # bigger key than the ones it was asked for, and a reader decodes each merged key once.
    # (Merging *all* keys until the table held 1M entries rewrote the whole table every
    # MERGE_KEYS commits with new items: WAL volume for every secondary's catch-up and a
    # whole-table decode in a reader's next read.) compact() still merges everything into
    # one sorted key: its id deltas are the smallest form of the table.
    SMALL = 8192
    MERGE_KEYS = 32

    def __init__(self) -> None:
        empty = (np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int64))
        # (main, recent): two sorted (ids, category, advertiser_id) tables, replaced together
        # as one tuple. New entries go into the small recent one (a commit copies that, not the
        # whole table); it is merged into main when it passes an eighth of it.
        self._t = (empty, empty)
        self._dense = None  # (pages, rows) direct map of main, when its ids are dense enough
        self.last_seq = -1
        self.keys: dict[int, int] = {}  # seq -> entries of every key read (the writer's merge bookkeeping)

    def __len__(self) -> int:
        return sum(len(t[0]) for t in self._t)

    @staticmethod
    def _find(t: tuple, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = t[0]
        if not len(ids):
            return np.zeros(len(items), bool), np.zeros(len(items), np.int64)
        pos = np.searchsorted(ids, items)
        np.minimum(pos, len(ids) - 1, out=pos)
        return ids[pos] == items, pos

    PAGE_BITS = 12

    @classmethod
    def _dense_map(cls, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(pages, rows): rows[k << PAGE_BITS | id & mask] = row of id in page pages[k], -1 if none;
        None when the ids are too sparse for that (it would take over 16 rows per id).
        A binary search costs ~17 dependent steps per id (~0.45 ms for a 4096-event read
        in a 73k-item table on the dev machine); this map a few vectorized gathers."""
        if len(ids) < 1024:
            return None
        hi = ids >> cls.PAGE_BITS  # ids are sorted: so are their pages (no sort, no search)
        step = np.empty(len(hi), bool)
        step[0] = True
        np.not_equal(hi[1:], hi[:-1], out=step[1:])
        pages = hi[step]
        if len(pages) << cls.PAGE_BITS > 16 * len(ids):
            return None
        rows = np.full(len(pages) << cls.PAGE_BITS, -1, np.int32)
        k = np.cumsum(step, dtype=np.int64)
        k -= 1
        k <<= cls.PAGE_BITS
        k |= ids & ((1 << cls.PAGE_BITS) - 1)
        rows[k] = np.arange(len(ids), dtype=np.int32)
        return pages, rows, pages[0] if pages[-1] - pages[0] == len(pages) - 1 else None

    def _find_main(self, main: tuple, dense: tuple | None, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if dense is None or dense[0] is not main:
            return self._find(main, items)
        pages, rows, p0 = dense[1]
        hi = items >> self.PAGE_BITS
        if p0 is not None:  # consecutive pages: the page index is a subtraction
            k = hi - p0
            np.clip(k, 0, len(pages) - 1, out=k)
        else:
            k = np.searchsorted(pages, hi)  # a few hundred pages: stays in cache
            np.minimum(k, len(pages) - 1, out=k)
        k <<= self.PAGE_BITS
        k |= items & ((1 << self.PAGE_BITS) - 1)
        pos = rows[k]
        found = pos >= 0
        found &= pages[k >> self.PAGE_BITS] == hi
        return found, np.maximum(pos, 0)

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (found (N,) bool, category (N,) int32, advertiser_id (N,) int64); -1 where not found.
        Fastest with ``items`` sorted (or sorted runs: a chunk's dictionary)."""
        main, recent = self._t
        items = np.asarray(items, np.int64)
        found, pos = self._find_main(main, self._dense, items)
        if found.all():
            return found, main[1][pos], main[2][pos]
        cat = np.where(found, main[1][pos] if len(main[0]) else -1, -1).astype(np.int32)
        adv = np.where(found, main[2][pos] if len(main[0]) else -1, -1).astype(np.int64)
        rest = np.flatnonzero(~found)
        f2, p2 = self._find(recent, items[rest])
        hit = rest[f2]
        found[hit] = True
        cat[hit] = recent[1][p2[f2]]
        adv[hit] = recent[2][p2[f2]]
        return found, cat, adv

    # When the recent part is merged into main (``add``'s ``fold``): "soon" past an eighth of
    # main (the writer; a reader's follower thread, after its catch-up), "late" once it is as
    # large as main (a read that met new items: a merge rebuilds the dense map, an array of
    # up to 16 rows per item on fresh pages -- 10-60 ms on the dev VM at 50k-200k items -- which a
    # read would wait for; a larger recent part costs a read's lookup ~0.2 ms at most).
    FOLD = {"soon": 8, "late": 1}  # recent part merged past this fraction of main (1 / value)

    def add(self, items: np.ndarray, cat: np.ndarray, adv: np.ndarray,
            fold: str = "soon") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add the entries of ``items`` (distinct) that the table lacks; return them, sorted by id.
        ``fold``: when to merge the recent part into main, ``"soon"`` or ``"late"`` (see
        FOLD)."""
        self._fold_div(fold)  # a bad value fails here, whether or not items are new
        items = np.asarray(items, np.int64)
        new = ~self.lookup(items)[0]
        o = np.flatnonzero(new)[np.argsort(items[new], kind="stable")]
        add = (items[o], np.asarray(cat, np.int32)[o], np.asarray(adv, np.int64)[o])
        if len(o):
            main, recent = self._t
            at = np.searchsorted(recent[0], add[0])
            recent = tuple(np.insert(r, at, x) for r, x in zip(recent, add))
            self._t = (main, recent)
            if self.needs_fold(fold):
                self.fold()
        return add

    @classmethod
    def _fold_div(cls, when: str) -> int:
        div = cls.FOLD.get(when)
        if div is None:
            raise ValueError(f"fold must be one of {', '.join(cls.FOLD)} (got {when!r})")
        return div

    def needs_fold(self, when: str = "soon") -> bool:
        main, recent = self._t
        return len(recent[0]) > max(4096, len(main[0]) // self._fold_div(when))

    def fold(self) -> None:
        """Merge the recent part into the main one (reads then search one table)."""
        main, recent = self._t
        if len(recent[0]):
            at = np.searchsorted(main[0], recent[0])
            main = tuple(np.insert(m, at, x) for m, x in zip(main, recent))
            dm = self._dense_map(main[0])
            self._dense = None if dm is None else (main, dm)  # tagged with the main it maps
            self._t = (main, tuple(x[:0] for x in recent))

    def add_key(self, seq: int, v: bytes, fold: str = "soon") -> None:
        self.add(*decode_attrs(v), fold=fold)
        self.last_seq = max(self.last_seq, seq)
        self.keys[seq] = int.from_bytes(v[:4], "little")

    @classmethod
    def tier(cls, m: int) -> int:
        t, bound = 0, cls.SMALL
        while m >= bound:
            t += 1
            bound *= cls.MERGE_KEYS
        return t

    def to_merge(self) -> list[int]:
        """Seqs of the keys the writer should merge now (none: not yet): the lowest tier that
        holds MERGE_KEYS keys, with every key below it."""
        tiers: dict[int, list[int]] = {}
        for q, m in self.keys.items():
            tiers.setdefault(self.tier(m), []).append(q)
        below: list[int] = []
        for t in sorted(tiers):
            below += tiers[t]
            if len(tiers[t]) >= self.MERGE_KEYS:
                return sorted(below)
        return []
