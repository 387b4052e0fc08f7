"""Fused pyramid pooling: compress a jagged sequence into the next pyramid level.

A level's tokens are contiguous *segments* of the previous level's tokens.
:class:`Segments` describes them once for the whole batch -- ``bounds:
(S + 1,)`` (segment s is ``values[bounds[s]:bounds[s + 1]]``) and ``offsets:
(B + 1,)`` (sequence b's pooled tokens are segments ``offsets[b]:offsets[b + 1]``),
so the pooled level is again a jagged batch ``(pooled (S, D), offsets)``.
Two builders cover the pyramid's needs:

* :func:`segments_by_count` -- every ``factor`` consecutive events, aligned to
  the most recent event (the oldest segment of a sequence may be short), the
  jagged form of the model's ``TokenMerge``;
* :func:`segments_by_time` -- one segment per non-empty time window of width
  ``window`` counted back from a reference time (the impression, or the latest
  event), so a level can mean "one token per hour" or "per day".

:func:`pyramid_pool` then reads every value once and writes one row per
segment: the weighted mean ``sum_i w_i x_i / sum_i w_i`` (or the weighted
sum), weights optional (1 when absent), in one kernel pass with no padding.
Weights are meant to be non-negative (recency decay, learned scores); a
segment whose weights sum to 0 -- or that is empty -- pools to 0.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from opengem.kernels._backend import Backend, resolve
from opengem.kernels.jagged import check_offsets, lengths_of, max_length

Reduce = Literal["mean", "sum"]


class Segments(NamedTuple):
    """bounds: (S + 1,) int64 into the values; offsets: (B + 1,) int64 into the segments."""

    bounds: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.bounds.numel() - 1

    def validate(self, n: int, value_offsets: torch.Tensor | None = None) -> None:
        """Raise unless bounds cover rows [0, n) in order, offsets cover the segments,
        and (given the values' offsets) no segment crosses a sequence boundary."""
        max_length(self.bounds, n, "segment bounds")
        max_length(self.offsets, self.num_segments, "segment offsets")
        if value_offsets is not None:
            if value_offsets.numel() != self.offsets.numel():
                raise ValueError(f"{self.offsets.numel() - 1} pooled sequences for {value_offsets.numel() - 1} inputs")
            if not torch.equal(self.bounds[self.offsets].cpu(), value_offsets.long().cpu()):
                raise ValueError("segments cross sequence boundaries")


def segments_by_count(offsets: torch.Tensor, factor: int) -> Segments:
    """Segments of ``factor`` events aligned to each sequence's most recent end.

    offsets: (B + 1,) int -> Segments with ceil(L_b / factor) segments for sequence b.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    check_offsets(offsets, 0)
    lengths = lengths_of(offsets)  # (B,)
    counts = (lengths + factor - 1) // factor  # (B,)
    seg_off = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # (B + 1,)
    S = int(seg_off[-1])
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), counts, output_size=S)
    j = torch.arange(S, device=offsets.device) - seg_off[:-1][seq]  # segment index within its sequence
    start = offsets[:-1].long()[seq] + (lengths[seq] - factor * (counts[seq] - j)).clamp(min=0)
    return Segments(torch.cat([start, offsets[-1:].long()]), seg_off)


def segments_by_time(offsets: torch.Tensor, ts: torch.Tensor, window: float,
                     ref_ts: torch.Tensor | None = None) -> Segments:
    """One segment per maximal run of events in the same ``window``-wide bucket.

    offsets: (B + 1,) int; ts: (N,) event times, non-decreasing within each
    sequence; ref_ts: (B,) times the buckets count back from (default: each
    sequence's latest event) -> Segments. Bucket of event i in sequence b:
    floor((ref_ts[b] - ts[i]) / window). With sorted times every non-empty
    window is one segment; empty windows produce none.
    """
    if window <= 0:
        raise ValueError(f"window must be > 0, got {window}")
    n = ts.shape[0]
    check_offsets(offsets, n)
    if ts.dim() != 1:
        raise ValueError(f"ts must be (N,), got {tuple(ts.shape)}")
    lengths = lengths_of(offsets)
    B = lengths.numel()
    seq = torch.repeat_interleave(torch.arange(B, device=ts.device), lengths, output_size=n)  # (N,)
    if ref_ts is None:
        last = (offsets[1:].long() - 1).clamp(min=0)
        ref_ts = ts[last] if n else ts.new_zeros(B)
    elif ref_ts.shape != (B,):
        raise ValueError(f"ref_ts must be (B,) = ({B},), got {tuple(ref_ts.shape)}")
    bucket = torch.floor((ref_ts[seq] - ts).double() / window)  # (N,)
    first = torch.zeros(n, dtype=torch.bool, device=ts.device)
    first[offsets[:-1][lengths > 0].long()] = True  # each sequence starts a segment
    first[1:] |= bucket[1:] != bucket[:-1]
    starts = torch.nonzero(first).squeeze(1)  # (S,)
    seg_off = torch.cat([lengths.new_zeros(1), torch.cumsum(torch.bincount(seq[starts], minlength=B), 0)])
    return Segments(torch.cat([starts, offsets[-1:].long()]), seg_off)


def pyramid_pool(
    values: torch.Tensor,
    segments: Segments,
    *,
    weights: torch.Tensor | None = None,
    reduce: Reduce = "mean",
    backend: Backend = "auto",
) -> torch.Tensor:
    """values: (N, D) float; weights: (N,) or None -> (S, D), one row per segment.

    ``segments`` must come from a builder above or pass ``segments.validate(N)``;
    it is not re-validated here (that costs a device sync per call).
    """
    if values.dim() != 2 or not values.is_floating_point():
        raise ValueError(f"values must be (N, D) float, got {tuple(values.shape)} {values.dtype}")
    if weights is not None and (weights.shape != values.shape[:1] or not weights.is_floating_point()):
        raise ValueError(f"weights must be (N,) = ({values.shape[0]},) float, "
                         f"got {tuple(weights.shape)} {weights.dtype}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    check_offsets(segments.bounds, values.shape[0], "segment bounds")
    tensors = (values,) if weights is None else (values, weights)
    if resolve(backend, *tensors) == "triton":
        from opengem.kernels.triton.pyramid_pool import triton_pyramid_pool

        return triton_pyramid_pool(values, segments.bounds, weights, reduce == "mean")
    return reference_pyramid_pool(values, segments, weights=weights, reduce=reduce)


def reference_pyramid_pool(values: torch.Tensor, segments: Segments, *, weights: torch.Tensor | None = None,
                           reduce: Reduce = "mean") -> torch.Tensor:
    """The definition with index_add: same shapes as :func:`pyramid_pool`."""
    S = segments.num_segments
    n, D = values.shape
    seg = torch.repeat_interleave(torch.arange(S, device=values.device), lengths_of(segments.bounds),
                                  output_size=n)  # (N,) segment of each row
    w = values.new_ones(n) if weights is None else weights.to(values.dtype)
    acc = values.new_zeros(S, D).index_add(0, seg, values * w[:, None])  # (S, D)
    if reduce == "sum":
        return acc
    total = values.new_zeros(S).index_add(0, seg, w)  # (S,)
    nonzero = total != 0
    return acc / torch.where(nonzero, total, 1)[:, None] * nonzero[:, None]
