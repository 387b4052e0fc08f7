"""The store's write path against its earlier per-user / per-chunk implementations: the same
bytes on disk (format 3 unchanged), on random workloads that seal, merge, drop and pack."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from opengem.features import SequenceStore, StoreConfig, codec
from opengem.features.codec import DIR, I64_MAX, I64_MIN, REC

sys.path.insert(0, str(Path(__file__).parent))
from test_codec import records  # noqa: E402
from test_store import T0, make_events  # noqa: E402


def reference_rebuild_tails(self, wb, uids, heads, ri, rec, starts, ends) -> None:
    """The per-user implementation that ``SequenceStore._rebuild_tails`` replaced (kept as it was)."""
    cfg = self.config
    C, N = cfg.chunk_events, cfg.max_events
    ukeys = [int(u) for u in uids[ri]]
    lo = heads["seg_lo"][ri].tolist()
    hi = heads["seg_hi"][ri].tolist()
    keys = [codec.user_key(b"T", u, s) for u, a, b in zip(ukeys, lo, hi) for s in range(a, b)]
    keys += [codec.user_key(b"D", u) for u in ukeys]
    vals = self._get(keys)
    pos = 0
    segvals = []
    for a, b in zip(lo, hi):
        segvals.append(vals[pos : pos + b - a])
        pos += b - a
    dirvals = vals[pos:]
    pk = heads["pack"][ri].astype(np.int64)
    packed: dict[int, list[np.ndarray]] = {}
    if pk.any():
        pj = np.flatnonzero(pk)
        packs = self._fetch_packs((pk[pj] - 1).tolist())
        if packs is None:
            raise RuntimeError("store corrupt: a tail pack is missing")
        packed = self._decode_packed([(int(j), int(pk[j]) - 1, int(heads["slot"][ri[j]])) for j in pj], packs)
        if packed is None:
            raise RuntimeError("store corrupt: a tail pack names items the attribute table lacks")
    put, delete = wb.put, wb.delete
    enc_attrs = self._attrs if cfg.item_attr_table else None
    for j, i in enumerate(ri.tolist()):
        u = ukeys[j]
        h = heads[i]
        if any(v is None for v in segvals[j]):
            raise RuntimeError(f"store corrupt: user {u} is missing tail segments")
        first = [codec.columns_to_rec(packed[j])] if j in packed else []
        tail = np.concatenate(first + [codec.decode_segment(v, self._attrs) for v in segvals[j]]
                              + [rec[starts[i] : ends[i]]])
        old_dir = np.frombuffer(dirvals[j], DIR) if dirvals[j] else np.empty(0, DIR)
        nseal = len(tail) // C
        rem = tail[nseal * C :]
        tail_n = len(rem)
        k_total = len(old_dir) + nseal
        k_keep = min(k_total, (N - tail_n - 1) // C + 1)
        drop = k_total - k_keep
        chunk_lo, chunk_hi = int(h["chunk_lo"]), int(h["chunk_hi"])
        new_dir = np.empty(nseal, DIR)
        for c in range(nseal):
            seq = chunk_hi + c
            if seq - chunk_lo >= drop:  # a chunk that retention would drop at once is never written
                blob, mn, mx = codec.encode_chunk(tail[c * C : (c + 1) * C], enc_attrs, exceptions=False)
                put(codec.user_key(b"C", u, seq), blob)
                new_dir[c] = (mn, mx)
        for seq in range(chunk_lo, min(chunk_lo + drop, chunk_hi)):
            delete(codec.user_key(b"C", u, seq))
        d = np.concatenate([old_dir, new_dir])[drop:]
        if nseal or drop:
            if len(d):
                put(codec.user_key(b"D", u), d.tobytes())
            else:
                delete(codec.user_key(b"D", u))
        seg_lo, seg_hi = int(h["seg_lo"]), int(h["seg_hi"])
        for seq in range(seg_lo, seg_hi):
            delete(codec.user_key(b"T", u, seq))
        if tail_n:  # the merged remainder, encoded like a chunk
            put(codec.user_key(b"T", u, seg_hi), codec.SEG_CHUNK + codec.encode_chunk(rem, enc_attrs)[0])
        h["seg_lo"] = seg_hi
        h["seg_hi"] = seg_hi + (1 if tail_n else 0)
        h["pack"] = 0
        h["slot"] = 0
        h["chunk_lo"] = chunk_lo + drop
        h["chunk_hi"] = chunk_hi + nseal
        h["tail_n"] = tail_n
        h["raw_n"] = 0
        h["tail_min"] = rem["ts"].min() if tail_n else I64_MAX
        h["tail_max"] = rem["ts"].max() if tail_n else I64_MIN
        h["kept"] = len(d) * C + tail_n


# --------------------------------------------------------------------------- encode_chunks


def _table(rec: np.ndarray, rng: np.random.Generator, drop: float) -> codec.AttrTable:
    t = codec.AttrTable()
    items, first = np.unique(rec["item_id"], return_index=True)
    keep = rng.random(len(items)) >= drop
    t.add(items[keep], rec["category"][first][keep], rec["advertiser_id"][first][keep])
    return t


@pytest.mark.parametrize("seed", range(40))
def test_encode_chunks_equals_encode_chunk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 12))
    sizes = rng.choice([1, 2, 3, 5, 17, 100, 128, 129, 200, 255, 256, 257, 300, 1000], K)
    variants = [{}, {"extreme": True}, {"wide_gap": True}, {"ad_only": True}, {"organic_only": True}]
    parts = [records(int(n), rng, **variants[int(rng.integers(0, 5))]) for n in sizes]
    rec = np.concatenate(parts)
    lens = np.array([len(p) for p in parts])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    perm = rng.permutation(K)  # chunks in any order
    starts, lens = starts[perm], lens[perm]
    exc = rng.random(K) < 0.5 if seed % 3 else bool(seed % 2)
    table = _table(rec, rng, drop=[0.0, 0.0, 0.2][seed % 3]) if seed % 4 else None
    blobs, mn, mx = codec.encode_chunks(rec, starts, lens, table, exc)
    exc = np.broadcast_to(np.asarray(exc), (K,))
    for k in range(K):
        want = codec.encode_chunk(rec[starts[k]:starts[k] + lens[k]], table, exceptions=bool(exc[k]))
        assert (blobs[k], int(mn[k]), int(mx[k])) == want, k


def test_encode_chunks_of_nothing() -> None:
    blobs, mn, mx = codec.encode_chunks(np.zeros(0, REC), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert blobs == [] and len(mn) == len(mx) == 0


# --------------------------------------------------------------------------- whole stores


def _contents(s: SequenceStore) -> list:
    return [list((bytes(k), bytes(v)) for k, v in db.items()) for db in (s._db, s._items)]


CONFIGS = {
    "small": StoreConfig(max_events=32, chunk_events=8, max_tail_segments=3, max_raw_tail=5, sync=False),
    "packs": StoreConfig(max_events=32, chunk_events=8, max_tail_segments=3, max_raw_tail=5, sync=False,
                         pack_events=12),
    "tiny": StoreConfig(max_events=4, chunk_events=4, max_tail_segments=1, max_raw_tail=1, sync=False,
                        writer_cache_users=2, writer_cache_items=3),
    "no_table": StoreConfig(max_events=64, chunk_events=16, max_tail_segments=4, max_raw_tail=9, sync=False,
                            item_attr_table=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_store_bytes_equal_the_reference_write_path(tmp_path: Path, name: str) -> None:
    """Two stores, the same commits: one with the current write path, one with the
    reference implementations patched in; every key and value equal after each step
    (appends, seals, retention drops, merges, compactions that pack tails)."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(len(name))
    new = SequenceStore(tmp_path / "new", cfg)
    ref = SequenceStore(tmp_path / "ref", cfg)
    ref._rebuild_tails = types.MethodType(reference_rebuild_tails, ref)
    off = 0
    try:
        for step in range(40):
            n = int(rng.choice([1, 5, 30, 200]))
            ev = make_events(rng, n, users=int(rng.choice([3, 12, 40])), t0=T0 + step * 10**5,
                             spread=int(rng.choice([10, 10**5, 10**9])))
            if step % 3:
                ev["category"] = ev["item_id"] % 7  # item attributes: tails can be packed
            for s in (new, ref):
                with s.batch() as b:
                    b.add(ev, 0, off)
            off += 1
            if step % 13 == 12:
                new.compact()
                ref.compact()
            assert _contents(new) == _contents(ref), step
    finally:
        new.close()
        ref.close()
