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
