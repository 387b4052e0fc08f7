"""Chunk encoding: exact round trips on awkward sizes and extreme values."""

from __future__ import annotations

import numpy as np
import pytest

from opengem.features import codec
from opengem.features.codec import REC, decode_chunks, decode_segment, encode_chunk

FIELDS = ("ts", "item_id", "surface", "kind", "category", "advertiser_id")


def records(n: int, rng: np.random.Generator, *, extreme: bool = False, wide_gap: bool = False,
            ad_only: bool = False, organic_only: bool = False) -> np.ndarray:
    r = np.zeros(n, REC)
    r["ts"] = 1_700_000_000_000 + np.cumsum(rng.integers(0, 90_000, n))
    if n > 3:
        r["ts"][2] -= 10**7  # out of order
        r["ts"][-1] = r["ts"][-2]  # a tie
    if wide_gap and n > 2:
        r["ts"][n // 2 :] += 2**33  # a gap >= 2**32 ms
    r["item_id"] = np.where(rng.random(n) < 0.3, 1_000_000_000 + rng.integers(0, 50, n), rng.integers(0, 200, n))
    r["surface"] = rng.integers(0, 4, n)
    lo, hi = (0, 3) if ad_only else (3, 8) if organic_only else (0, 8)
    r["kind"] = rng.integers(lo, hi, n)
    r["category"] = r["item_id"] % 32
    r["advertiser_id"] = np.where(r["kind"] < 3, r["item_id"] % 1000, -1)
    if extreme and n >= 4:
        r["item_id"][0], r["item_id"][1] = 2**63 - 1, 0
        r["category"][0], r["category"][3] = 2**31 - 1, -1  # no longer a function of the item
        r["advertiser_id"][1] = 2**63 - 1
        r["ts"][3] = 946_684_800_000
    return r


def expected(rec: np.ndarray) -> np.ndarray:
    return rec[np.argsort(rec["ts"], kind="stable")]


@pytest.mark.parametrize("n", [1, 2, 17, 255, 256, 257, 1000])
@pytest.mark.parametrize("variant", ["plain", "extreme", "wide_gap", "ad_only", "organic_only"])
def test_round_trip(n: int, variant: str) -> None:
    rng = np.random.default_rng(n)
    rec = records(n, rng, **({} if variant == "plain" else {variant: True}))
    blob, mn, mx = encode_chunk(rec)
    cols, lengths = decode_chunks([blob])
    exp = expected(rec)
    assert lengths.tolist() == [n]
    assert (mn, mx) == (rec["ts"].min(), rec["ts"].max())
    for f, c in zip(FIELDS, cols):
        np.testing.assert_array_equal(c, exp[f], err_msg=f)
    assert [c.dtype for c in cols] == [np.int64, np.int64, np.int8, np.int8, np.int32, np.int64]


def test_many_chunks_of_mixed_layouts_keep_input_order() -> None:
    rng = np.random.default_rng(0)
    recs = [records(256, rng) for _ in range(3)] + [records(5, rng), records(256, rng, extreme=True),
                                                    records(256, rng), records(1, rng), records(256, rng, wide_gap=True)]
    cols, lengths = decode_chunks([encode_chunk(r)[0] for r in recs])
    assert lengths.tolist() == [len(r) for r in recs]
    for f, c in zip(FIELDS, cols):
        np.testing.assert_array_equal(c, np.concatenate([expected(r)[f] for r in recs]), err_msg=f)


def test_empty_and_segments() -> None:
    cols, lengths = decode_chunks([])
    assert len(lengths) == 0 and all(len(c) == 0 for c in cols)
    rec = records(10, np.random.default_rng(1))
    np.testing.assert_array_equal(decode_segment(codec.SEG_RAW + rec.tobytes()), rec)
    np.testing.assert_array_equal(decode_segment(codec.SEG_CHUNK + encode_chunk(rec)[0]), expected(rec))


def test_keys_sort_by_user_then_sequence() -> None:
    uids = np.array([1, 1, 2, 2**63 - 1], np.int64)
    seqs = np.array([1, 256, 0, 7])
    keys = codec.chunk_keys(uids, seqs)
    assert keys == sorted(keys)
    assert keys[0] == codec.user_key(b"C", 1, 1)
    assert codec.head_keys(uids)[3] == b"H" + (2**63 - 1).to_bytes(8, "big")


# --------------------------------------------------------------------------- item attribute table (format 2)


def table_of(rec: np.ndarray) -> codec.AttrTable:
    t = codec.AttrTable()
    items, first = np.unique(rec["item_id"], return_index=True)
    t.add(items, rec["category"][first], rec["advertiser_id"][first])
    return t


@pytest.mark.parametrize("n", [1, 17, 256])
def test_chunks_take_item_attributes_from_the_table(n: int) -> None:
    rng = np.random.default_rng(n)
    rec = records(n, rng, ad_only=True)  # category and advertiser_id: functions of the item
    rec["item_id"][0], rec["advertiser_id"][0] = 2**63 - 1, 2**63 - 1
    rec["item_id"][-1] = -5  # negative ids are ids too
    t = table_of(rec)
    blob = encode_chunk(rec, t)[0]
    assert blob[2] & codec._ATTRS_TABLE and len(blob) < len(encode_chunk(rec)[0])
    cols, _ = decode_chunks([blob], t)
    for f, c in zip(FIELDS, cols):
        np.testing.assert_array_equal(c, expected(rec)[f], err_msg=f)
    assert [c.dtype for c in cols] == [np.int64, np.int64, np.int8, np.int8, np.int32, np.int64]
    with pytest.raises(codec.MissingAttrs):
        decode_chunks([blob])
    with pytest.raises(codec.MissingAttrs) as e:
        decode_chunks([blob], codec.AttrTable())
    assert set(e.value.args[0].tolist()) == set(rec["item_id"].tolist())
    # decoded together with format-1 chunks and chunks that store their own attributes
    other = records(n, rng, extreme=True)
    cols, lengths = decode_chunks([encode_chunk(other, t)[0], blob, encode_chunk(rec)[0]], t)
    exp = np.concatenate([expected(other), expected(rec), expected(rec)])
    for f, c in zip(FIELDS, cols):
        np.testing.assert_array_equal(c, exp[f], err_msg=f)


def test_a_changed_or_unknown_item_keeps_its_own_attributes() -> None:
    rng = np.random.default_rng(5)
    rec = records(40, rng, ad_only=True)
    t = table_of(rec)
    changed = rec.copy()
    changed["category"][changed["item_id"] == changed["item_id"][3]] += 1  # the item's category changed since
    unknown = rec.copy()
    unknown["item_id"][7] = 123_456_789  # not in the table
    for r in (changed, unknown):
        blob = encode_chunk(r, t)[0]
        assert not blob[2] & codec._ATTRS_TABLE
        np.testing.assert_array_equal(decode_chunks([blob])[0][4], expected(r)["category"])


def test_table_keys_round_trip_and_keep_first_values() -> None:
    ids = np.array([-2**63, -7, 0, 5, 1_000_000_000, 2**63 - 1], np.int64)
    cat = np.array([-1, 2**31 - 1, 0, 3, -1, 7], np.int32)
    adv = np.array([2**63 - 1, -1, 0, -1, 999, -2**63 + 1], np.int64)
    got = codec.decode_attrs(codec.encode_attrs(ids, cat, adv))
    for a, b in zip(got, (ids, cat, adv)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    t = codec.AttrTable()
    t.add_key(3, codec.encode_attrs(ids, cat, adv))
    new = t.add(np.array([5, 6]), np.array([9, 9]), np.array([9, 9]))  # 5 is known: first values win
    assert new[0].tolist() == [6] and t.last_seq == 3 and len(t) == 7
    found, c, a = t.lookup(np.array([5, 6, 8]))
    assert found.tolist() == [True, True, False] and c.tolist() == [3, 9, -1] and a.tolist() == [-1, 9, -1]


# Chunks written by format 1 (byte-wide dictionary indices, own category / advertiser
# sections): records(n, default_rng(n)) for n = 17 and 300, zlib + base64.
FORMAT1_CHUNKS = {
    17: (
    "eNoTZGBmYWFk5Ge4pOJ/vpuRgUGXAQrWSAQzih5Knz4hc8mxttA3DAzumnELj3A38ngvaHec9uAaA8N0oHIGRrBiRgZsQIZB"
    "mI9BipuFTYaPQYhRRECIkYebl4GZm4mVi5uPg42dhZOBhU2fjVmYhVc1lEWYhQlZ80l002ahC1hDKD4hCXZeAWZ2EUk+IVZO"
    "bgYGPQaG9FyGZoYpOxkYVBm0GRgArYUZXQ=="
    ),
    300: (
    "eNrtVntQFPcd//12b28fd3u3d7u3t3e3d4d3qKAEuISqgAgSIWh5iaQ8RGg0mIgGQXxhjZgIF8KBIlAIDyMPH1ggqUZtmpp0"
    "amRUOim0pJixtThxEqeaR9tJ24g2dPc48bSdafpXpzN85/a738fn+/l+f7/Z/e2FQKhQQPgGmBxLHfZA8ECeGCg/U/lepWd0"
    "Ivo3d9dl9bvGKnamnOkOaDBcTI7fV31BuNrWf8sUOHKlPShqMGpTacW7qgWHPvppvnnlnz93KzPjdsWqJz9zXp730tW+e9d2"
    "698d3mMsbu8mHF117O/XXQqNHUodevWIs/Hs2oqyW38t+Pp1x+13xj6Gns1zqYKtYtT1mi+/+Crs7cEA5+Lth/NOHEkY4keu"
    "/7ymqqb7D/kEMz9qd1zulzmNR09cnVh7VAx70Rl9QVj0xamMTXW/qh46HCpemExbnJ4c+nXh5YW3rixvdCCf/Oxc/FvHro3U"
    "3rg7K+/sNx+kZUWPBy5qzxiIqHts/+SYM7g2ZlVY+N/rq7dZb07yb55OaLp69sTQh6MxG5oG+0aTj46u/wxbZV8Bezzjq9Gu"
    "wc6ez2v5soH49zbYQz4FoPv2B1hVfPZNwhUYezz8qwNn7r2/bkNS54Il8QmX9pxvCDo7O5CAdw4OGHd9bIq45nS8kbul4uWR"
    "ZXjk8shjpvl5nyS95kKD7+Sz6C/FQx22+Q2rx8lfU8rWwNQx07Ayf3DTucK/5Ie2jjIw3n7Hnb3noyUn4/5W/YuSnzCqAFVK"
    "Vv24p9F6oO/ZZmGFnWigfhfa6Awf/u3We6Hnzs8ZX1nEfnrKWdd0MFHzVMjIbWK3Qz22UYgL+VNsMdrmTHs+jrdmC8EFSYVJ"
    "yW3FS0My2wqGi2Kd4ydT4sqCSnXnekyJvPHpDx1Puoa+OfWPoo4rd3LS1oTnIuo/ejqZ1Dc17e7e0LX5ND7vHW2gZ+K6aseh"
    "0oQu442lucvu3r34wo30idk32ePdc1x2Hk68cj0xBIBmACGQHjQoyfTDBn1B4FX+xv2wFw7vl4JHBPpiEDzQD1v/xoP3yac5"
    "HsVC8KDZ9Mi+AfyqIfRjfLi/b+LplF8W+q/WvwrCfx12Rv6D0CTN0lpcqWE4GlNjlA1AyiBA3EYzGlyrsJkIpWA3c5xSo2IU"
    "HGmjrHpEFDkbQSptPIZymFpFiJTAAAa3cyiFQFLQ4TQ02eyilRBInUZlUGC4SGkFjEcpPWI1C4JV0AGrkeUIAy6QahTqCcRs"
    "p+x6C09aEcJiN/BGBNHacRKhLRajRRAVKo0oGkQe1Zp1LMWRPGUgaQOuEM0CYtOzCC0arDhj1KoxkbIxLGXWsGYjNOJ2g5Ul"
    "VFALlAzANATC2FFWhbBAw9hwg1lJinrAkHZaIXLQgCuteiioWQZFdaLJBpQUh7GQ5gRCWqhVz4kabN2+1pXffywLO/zy6vqq"
    "IHZB4fc8z7rCWhuEcjbnCbVxb11BNMG3b23Vb/4ufVSxJ7nllcSNLSk1mueeYeZ0LArf/Z3XGtwJScmJhi7LsbnZ6pbtVXvd"
    "LxrElWt6gyNKnn4cfT7Qkc/oasqCl+1cimceIDczJQQVg1RGHFm4a2NlT/EB7ERQuwW2VTwX6nTHl693b+mv35xb15G58CXd"
    "wUV99qgdTzWnzw9pDNuhytVXFpWkP+nanlfX3FlmpVJmh7na9/9gVZo5IwPb9Lo7yRRd3dCSUbBkYZcqdbnW01vn2ZDXHNDZ"
    "Pqu4PGdb/JKOY4tjlT9as/3gPK5lRfqWzBeadGLlD23HO0tjDq3vqEV6i5AQd3l/CZs6kKefFVeRNffVBfXdyeTOoqb+yLVK"
    "sH/mzfovBEISotKRh0IUQSCUf9Il31FEAX2mdGEyCvFCvYJ449JfEcTnK6cKpwumlMzjF/HLoF422Yt8NAsf5rnPi86cr+Dy"
    "zBZ8a2mb2YJvLdH/L8cVgqppRqdneaNZtNkDEFShJEhKRWu0ek4wWUSrLUDCYEqVWsvoWM4omMxy0A4RBabECZLWytWcwSgB"
    "pWI5RqnUU1Hp4y+hp1gxXKZV0xovnDcKFqmdTIwTUG7qS/vYeLnPVBvfQFKlTv8/3qxLvvtFr14DasnDIFOQzDnegKoFsMDs"
    "NW0AnAc8KOuVnZ4HLw4Ktu0tC3bIpsifRgZRACLcsjfgyVH7MCdBqaRraB44BliwfuqUloj6aAASzY8jJtAD4gB4G6A/9uLF"
    "GkkxBV7b4DftQBXIBo1S6KTXzTarQTUI840hCw9aQL40yw5ATlUslqbvA/VvSZzBhXLgNEiWUNIw0sIiIBfpRXXL6jiaDoAL"
    "gH1Shxjwvnc7wF4ZC56R1T8BHZnL3Q=="
    ),
}


@pytest.mark.parametrize("n", sorted(FORMAT1_CHUNKS))
def test_format_1_chunks_still_decode(n: int) -> None:
    import base64
    import zlib

    blob = zlib.decompress(base64.b64decode(FORMAT1_CHUNKS[n]))
    rec = records(n, np.random.default_rng(n))
    assert not blob[2] & (codec._ATTRS_TABLE | codec._IDX_BITS)
    cols, _ = decode_chunks([blob, encode_chunk(rec)[0]], table_of(rec))
    exp = np.concatenate([expected(rec), expected(rec)])
    for f, c in zip(FIELDS, cols):
        np.testing.assert_array_equal(c, exp[f], err_msg=f)


def test_heads_round_trip_in_every_format() -> None:
    """Format-3 heads (pack, slot) round trip; format-1 (HEAD_V12 bytes as they are) and
    format-2 heads (differences + marker 2) read as heads without a packed tail, mixed in one get."""
    rng = np.random.default_rng(9)
    h = codec.empty_heads(8)  # empty heads: sentinel ts, never-appended users
    for f in ("kept", "tail_n", "raw_n", "seg_lo", "seg_hi", "chunk_lo", "chunk_hi"):
        h[f][2:] = rng.integers(0, 2**32, 6)
    h["total"][2:] = rng.integers(0, 2**63, 6)
    h["tail_min"][2:6], h["tail_max"][2:6] = [-2**63, 5, 1, 2**63 - 1], [2**63 - 1, -2**63, 1, 7]
    h["last_ts"][2:6] = [0, 2**63 - 1, -2**63, 1_767_225_600_000]
    h["counts"][3] = 2**32 - 1
    h["country"][4], h["age_bucket"][4], h["device"][4] = 21843, 5, 0
    h["pack"][[3, 6]], h["slot"][[3, 6]] = [1, 2**32 - 1], [0, 65535]
    vals = codec.head_values(h)
    assert all(len(v) == codec.HEAD.itemsize + 1 for v in vals)
    assert codec.parse_heads(vals).tobytes() == h.tobytes()
    old = h.copy()
    old["pack"] = old["slot"] = 0
    v12 = np.zeros(len(h), codec.HEAD_V12)
    for f in codec.HEAD_V12.names:
        v12[f] = old[f]
    v2 = codec.head_values(old, marker=codec.HEAD_V2)
    assert all(len(v) == codec.HEAD_V12.itemsize + 1 for v in v2)
    mixed = [vals[0], None, v12[2:3].tobytes(), vals[3], v2[4], v12[5:6].tobytes(), vals[6], v2[7]]
    got = codec.parse_heads(mixed)
    exp = h.copy()
    exp[1] = codec.empty_heads(1)[0]
    for i in (2, 4, 5, 7):
        exp[i] = old[i]
    assert got.tobytes() == exp.tobytes()
    with pytest.raises(ValueError, match="format 1, 2 or 3"):
        codec.parse_heads([vals[0][:-2]])
    with pytest.raises(ValueError, match="tail pack"):
        codec.head_values(h, marker=codec.HEAD_V2)


@pytest.mark.parametrize("seed", range(4))
def test_attr_table_dense_map_matches_its_definition(seed: int) -> None:
    """The page map built from sorted ids in one pass equals its definition (pages = the
    distinct id >> PAGE_BITS, rows[page index << PAGE_BITS | low bits] = row), and lookups
    through it agree with a binary search, found or not."""
    rng = np.random.default_rng(seed)
    T = codec.AttrTable
    ids = np.unique(np.concatenate([rng.integers(0, 200_000, 20_000), 10**9 + rng.integers(0, 40_000, 3000)]))
    assert T._dense_map(np.unique(rng.integers(0, 2**40, 5000))) is None  # too sparse: no map
    got = T._dense_map(ids)  # pages in two runs far apart
    pages = np.unique(ids >> T.PAGE_BITS)
    rows = np.full(len(pages) << T.PAGE_BITS, -1, np.int32)
    rows[np.searchsorted(pages, ids >> T.PAGE_BITS) << T.PAGE_BITS | ids & ((1 << T.PAGE_BITS) - 1)] = \
        np.arange(len(ids), dtype=np.int32)
    assert np.array_equal(got[0], pages) and np.array_equal(got[1], rows)
    t = T()
    t.add(ids, (ids % 97).astype(np.int32), ids % 1013)
    t.fold()
    assert t._dense is not None
    probe = np.concatenate([rng.choice(ids, 2000), rng.integers(0, 2**31, 2000)])
    found, cat, adv = t.lookup(probe)
    assert np.array_equal(found, np.isin(probe, ids))
    assert np.array_equal(cat[found], (probe[found] % 97).astype(np.int32))
    assert np.array_equal(adv[found], probe[found] % 1013)


def test_attr_table_read_adds_leave_the_merge_to_the_follower() -> None:
    """A read that meets new items adds them to the table's recent part and leaves the merge
    into main (a dense-map rebuild) to the follower (fold "soon"), up to a recent part as
    large as main; entries are found either way."""
    rng = np.random.default_rng(7)
    ids = rng.choice(500_000, 60_000, replace=False)  # dense enough for the direct map
    t = codec.AttrTable()
    t.add(ids[:40_000], ids[:40_000] % 7, ids[:40_000] % 11)
    t.fold()
    main = len(t._t[0][0])
    assert main == 40_000 and not len(t._t[1][0])
    t.add(ids[40_000:50_000], ids[40_000:50_000] % 7, ids[40_000:50_000] % 11, fold="late")
    assert len(t._t[0][0]) == main and len(t._t[1][0]) == 10_000  # past main / 8, not merged
    assert t.needs_fold("soon") and not t.needs_fold("late")
    found, cat, adv = t.lookup(ids[:50_000])
    assert found.all() and (cat == ids[:50_000] % 7).all() and (adv == ids[:50_000] % 11).all()
    t.add(ids[50_000:], ids[50_000:] % 7, ids[50_000:] % 11)  # "soon": merged now
    assert len(t._t[0][0]) == 60_000 and not len(t._t[1][0]) and t._dense is not None
    assert t.lookup(ids)[0].all()
    late = codec.AttrTable()
    late.add(ids[:5000], ids[:5000] % 7, ids[:5000] % 11, fold="late")  # > max(4096, 0): merged anyway
    assert len(late._t[0][0]) == 5000


def test_attr_table_refuses_an_unknown_fold_setting() -> None:
    t = codec.AttrTable()
    with pytest.raises(ValueError, match="fold must be one of soon, late"):
        t.add(np.array([1]), np.array([0]), np.array([0]), fold="sooon")
    assert len(t) == 0  # nothing added
    with pytest.raises(ValueError, match="fold must be one of"):
        t.needs_fold("never")
