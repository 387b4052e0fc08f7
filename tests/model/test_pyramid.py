"""Pyramid sequence arch: awkward jagged inputs, truncation, and its segments."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opengem.model.gem import truncate_recent
from opengem.model.pyramid import PyramidArch, PyramidConfig

CFG = PyramidConfig(n_layers=2, max_len=100, recent=4, n_levels=3, level_factor=3, min_tokens=2, n_heads=2,
                    n_pma=2, n_recent=3)


def _padded(lengths, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    idx, keep, mask = truncate_recent(lengths, CFG.max_len)
    ev = torch.zeros(*mask.shape, d)
    ev[mask] = torch.randn(int(keep.sum()), d, generator=g)
    return ev.requires_grad_(True), mask


def test_segments_cover_max_len():
    segs = CFG.segments()
    assert segs[0] == (0, 4, 1) and segs[1] == (4, 16, 3) and segs[2] == (16, 100, 9)
    assert PyramidConfig(pyramid=False, max_len=50).segments() == [(0, 50, 1)]
    with pytest.raises(ValueError):
        PyramidConfig(max_len=10, recent=8)


def test_truncate_recent_keeps_latest():
    lengths = torch.tensor([0, 3, 7, 1])
    idx, keep, mask = truncate_recent(lengths, 5)
    assert keep.tolist() == [0, 3, 5, 1]
    assert idx.tolist() == [0, 1, 2] + [5, 6, 7, 8, 9] + [10]
    assert mask.shape == (4, 5) and mask.sum(1).tolist() == [0, 3, 5, 1] and mask[:, -1].tolist() == [0, 1, 1, 1]
    idx, keep, mask = truncate_recent(torch.tensor([0, 0]), 5)
    assert idx.numel() == 0 and mask.shape == (2, 0)


@pytest.mark.parametrize("lengths", [[0], [1], [0, 0, 0], [0, 1, 37, 100, 5], [7]])
@pytest.mark.parametrize("pyramid", [True, False])
def test_shapes_and_grads(lengths, pyramid):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, pyramid=pyramid)
    arch = PyramidArch(8, cfg)
    ev, mask = _padded(lengths)
    ctx = torch.randn(len(lengths), 3, 8, requires_grad=True)
    s = arch(ev, mask, ctx)
    assert s.shape == (len(lengths), cfg.n_summary, 8)
    s.square().sum().backward()
    assert torch.isfinite(ev.grad).all() and torch.isfinite(ctx.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in arch.parameters())


def test_padding_does_not_leak():
    """A row's summary does not depend on the other rows (padding is masked)."""
    torch.manual_seed(0)
    arch = PyramidArch(8, CFG).eval()
    ev, mask = _padded([3, 90])
    ctx = torch.randn(2, 3, 8)
    alone_ev, alone_mask = _padded([3])
    both = arch(ev, mask, ctx)
    ev1 = ev[:1, -3:]
    one = arch(ev1, mask[:1, -3:], ctx[:1])
    torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=1e-5)


def test_select_recent_keeps_the_latest_hits_right_aligned():
    from opengem.model.pyramid import select_recent

    x = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out, m = select_recent(x, keep, 2)
    assert out.shape == (2, 2, 1) and m.tolist() == [[True, True], [False, False]]
    assert out[0, :, 0].tolist() == [3.0, 5.0] and out[1].abs().sum() == 0
    out, m = select_recent(x, keep, 10)  # fewer hits than k: K = the most any row has
    assert out[0, :, 0].tolist() == [0.0, 2.0, 3.0, 5.0] and m.shape == (2, 4)
    out, m = select_recent(x[:, :0], keep[:, :0], 4)  # empty histories
    assert out.shape == (2, 0, 1) and m.shape == (2, 0)


def test_recent_positions_matches_the_dense_rank():
    """The O(hits) selection == ranking every (row, position) from the right."""
    from opengem.model.pyramid import recent_positions

    g = torch.Generator().manual_seed(0)
    keep = torch.rand(9, 40, generator=g) < 0.3
    keep[2] = False
    keep[5] = True
    for k in (1, 3, 8, 100):
        b, l, pos, K = recent_positions(keep, k)
        rank = keep.flip(1).cumsum(1).flip(1)
        sel = keep & (rank <= k)
        assert K == int(sel.sum(1).max())
        want_b, want_l = sel.nonzero(as_tuple=True)
        assert torch.equal(b, want_b) and torch.equal(l, want_l) and torch.equal(pos, K - rank[want_b, want_l])
    b, l, pos, K = recent_positions(torch.zeros(3, 0, dtype=torch.bool), 4)
    assert K == 0 and b.numel() == 0


def test_target_attention_over_shared_keys_equals_per_row_keys():
    """B candidates querying one user's tokens as one attention == B rows that each carry them."""
    from opengem.model.pyramid import TargetAttention

    torch.manual_seed(0)
    ta = TargetAttention(8, 2).eval()
    q = torch.randn(5, 1, 8)
    keys, mask = torch.randn(1, 11, 8), torch.rand(1, 11) < 0.7
    mask[0, 0] = True
    shared = ta(q, keys, mask)
    per_row = ta(q, keys.expand(5, -1, -1), mask.expand(5, -1))
    assert shared.shape == (5, 1, 8)
    torch.testing.assert_close(shared, per_row, atol=1e-6, rtol=0)
    keys2 = keys.clone()
    keys2[0, ~mask[0]] = 100.0  # masked keys do not matter
    torch.testing.assert_close(ta(q, keys2, mask), shared, atol=1e-6, rtol=0)


def test_target_attention_over_pairs_equals_padded_rows():
    """attend_pairs (each query reads its own subset of one key table) == attend on each
    query's keys gathered into padded rows with a mask; uneven subsets, one with a single key."""
    from opengem.model.pyramid import TargetAttention

    torch.manual_seed(0)
    ta = TargetAttention(8, 2).eval()
    B, N = 6, 13
    q, table = torch.randn(B, 1, 8), torch.randn(N, 8)
    subsets = [[0], [0, 3, 4], [0, 12, 1, 7, 2], [0, 5], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [0, 9, 11]]
    qi = torch.tensor([b for b, s in enumerate(subsets) for _ in s])
    ki = torch.tensor([k for s in subsets for k in s])
    T = max(map(len, subsets))
    rows, mask = torch.zeros(B, T, 8), torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(subsets):
        rows[b, :len(s)], mask[b, :len(s)] = table[s], True
    with torch.no_grad():
        got = ta.attend_pairs(q, ta.project(table), qi, ki)
        want = ta.attend(q, ta.project(rows), mask)
        perm = torch.randperm(qi.numel())  # the pairs' order does not matter
        again = ta.attend_pairs(q, ta.project(table), qi[perm], ki[perm])
    assert got.shape == (B, 1, 8)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)
