"""Pyramid pooling: segment builders, the Triton kernel == the index_add reference
(outputs and gradients), and the jagged form == the model's padded TokenMerge."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, gpu, leaves, offsets_of

from opengem.kernels import Segments, pyramid_pool, reference_pyramid_pool, segments_by_count, segments_by_time
from opengem.kernels.jagged import heavy_tailed_lengths, to_padded
from opengem.model.pyramid import TokenMerge

LENGTHS = [0, 1, 5, 23, 0, 30, 3]


def _times(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.sort(torch.randint(0, 10_000, (n,), generator=g))[0] for n in lengths]).to(DEVICE)


def test_segments_by_count_align_to_the_most_recent_event():
    segs = segments_by_count(offsets_of([0, 5, 1, 4]), 2)
    # lengths 5 -> [0,1) [1,3) [3,5); 1 -> [5,6); 4 -> [6,8) [8,10)
    assert segs.bounds.tolist() == [0, 1, 3, 5, 6, 8, 10]
    assert segs.offsets.tolist() == [0, 0, 3, 4, 6]
    segs.validate(10, offsets_of([0, 5, 1, 4]))
    with pytest.raises(ValueError):
        segments_by_count(offsets_of([3]), 0)


def test_segments_by_time_one_per_nonempty_window():
    ts = torch.tensor([0, 10, 95, 100, 5, 7], device=DEVICE)  # sequences [0, 10, 95, 100] and [5, 7]
    off = offsets_of([4, 0, 2])
    segs = segments_by_time(off, ts, 50.0)
    # seq 0 counted back from 100: ages 100, 90, 5, 0 -> windows 2, 1, 0, 0; seq 2 from 7: ages 2, 0 -> 0, 0
    assert segs.bounds.tolist() == [0, 1, 2, 4, 6]
    assert segs.offsets.tolist() == [0, 3, 3, 4]
    ref = segments_by_time(off, ts, 50.0, ref_ts=torch.tensor([140, 0, 60], device=DEVICE))
    # from 140: ages 140, 130, 45, 40 -> windows 2, 2, 0, 0; from 60: ages 55, 53 -> 1, 1
    assert ref.bounds.tolist() == [0, 2, 4, 6] and ref.offsets.tolist() == [0, 2, 2, 3]
    ref.validate(6, off)


def test_validate_rejects_inconsistent_segments():
    off = offsets_of([2, 2])
    with pytest.raises(ValueError, match="cross"):
        Segments(torch.tensor([0, 1, 3, 4]), torch.tensor([0, 1, 3])).validate(4, off)
    with pytest.raises(ValueError, match="end at 4"):
        Segments(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2])).validate(4)


def _segments(kind: str, lengths) -> Segments:
    off = offsets_of(lengths)
    if kind.startswith("count"):
        return segments_by_count(off, int(kind[5:]))
    return segments_by_time(off, _times(lengths), float(kind[4:]))


@pytest.mark.parametrize("kind", ["count1", "count4", "time500", "time4000"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_kernel_matches_reference(kind, weighted, reduce):
    segs = _segments(kind, LENGTHS)
    N = sum(LENGTHS)
    g = torch.Generator().manual_seed(0)
    for D in (1, 33):  # non-powers of two, one feature
        x = torch.randn(N, D, generator=g).to(DEVICE)
        # Weights away from 0 keep d(mean)/dw well conditioned; one segment gets all-zero
        # weights to exercise the "pools to 0" rule.
        w = (torch.rand(N, generator=g) + 0.5).to(DEVICE)
        w[int(segs.bounds[2]):int(segs.bounds[3])] = 0
        res = []
        for backend in ("triton", "pytorch"):
            ins = leaves(x, w) if weighted else leaves(x)
            out = pyramid_pool(ins[0], segs, weights=ins[1] if weighted else None, reduce=reduce, backend=backend)
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
            res.append((out, torch.autograd.grad(out, ins, go)))
        torch.testing.assert_close(res[0][0], res[1][0])
        for a, b in zip(res[0][1], res[1][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_empty_batch_and_strided_values():
    segs = segments_by_count(offsets_of([0, 0]), 3)
    x = torch.randn(0, 4, device=DEVICE, requires_grad=True)
    assert pyramid_pool(x, segs, backend="triton").shape == (0, 4)
    big = torch.randn(6, 8, device=DEVICE)
    segs = segments_by_count(offsets_of([6]), 4)
    torch.testing.assert_close(pyramid_pool(big[:, ::2], segs, backend="triton"),
                               reference_pyramid_pool(big[:, ::2], segs))


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_count_pooling_equals_the_models_token_merge(backend):
    """TokenMerge on the padded, right-aligned (B, T, d) layout == projecting the jagged pool."""
    torch.manual_seed(0)
    lengths, f, d = [0, 1, 7, 9, 12], 3, 6
    merge = TokenMerge(d, f).to(DEVICE)
    off = offsets_of(lengths)
    x = torch.randn(sum(lengths), d, device=DEVICE)
    T = max(lengths)
    padded = to_padded(x, off, T)  # left-aligned (B, T, d)
    mask = torch.arange(T, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    shift = [T - n for n in lengths]  # right-align as the model does
    padded = torch.stack([p.roll(s, 0) for p, s in zip(padded, shift)])
    mask = torch.stack([m.roll(s, 0) for m, s in zip(mask, shift)])
    want, want_mask = merge(padded, mask)  # (B, ceil(T / f), d)
    segs = segments_by_count(off, f)
    got = merge.proj(pyramid_pool(x, segs, backend=backend))  # (S, d)
    torch.testing.assert_close(got, want[want_mask])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["count4", "count16", "time3600"])
def test_full_size_heavy_tail_on_gpu(kind):
    lengths = heavy_tailed_lengths(256, 500, 16384, torch.Generator().manual_seed(0)).tolist() + [0, 1]
    segs = _segments(kind, lengths)
    x, w = torch.randn(sum(lengths), 96, device=DEVICE), torch.rand(sum(lengths), device=DEVICE) + 0.5
    res = []
    for backend in ("triton", "pytorch"):
        ins = leaves(x, w)
        out = pyramid_pool(ins[0], segs, weights=ins[1], backend=backend)
        res.append((out, torch.autograd.grad(out, ins, torch.ones_like(out))))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
