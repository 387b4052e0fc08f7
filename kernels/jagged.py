"""Jagged-layout helpers shared by the kernels and their references.

A jagged batch is ``values: (sum_i L_i, ...)`` plus ``offsets: (B + 1,)`` int,
sequence i being ``values[offsets[i]:offsets[i + 1]]``. Offsets are the single
source of truth; lengths and per-row sequence ids are derived from them here.
"""

from __future__ import annotations

import math

import torch


def check_offsets(offsets: torch.Tensor, n: int, name: str = "offsets") -> None:
    """Shape/dtype checks that need no device sync: (B + 1,) int32/int64."""
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 1 entries, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {offsets.dtype}")
    if n > torch.iinfo(torch.int32).max:
        raise ValueError(f"{name}: {n} rows exceed int32 indexing")


def max_length(offsets: torch.Tensor, n: int, name: str = "offsets") -> int:
    """Validate ``offsets`` against ``n`` rows and return the longest length.

    One device sync for everything (first offset, last offset, min and max
    length), so that callers who do not pass ``max_len`` pay for one.
    """
    check_offsets(offsets, n, name)
    if offsets.numel() == 1:
        first = last = int(offsets[0])
        lo = hi = 0
    else:
        lengths = offsets[1:] - offsets[:-1]
        first, last, lo, hi = torch.stack([offsets[0], offsets[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or last != n or lo < 0:
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at {n} (got first={first}, "
                         f"last={last}, min length={lo})")
    return int(hi)


def lengths_of(offsets: torch.Tensor) -> torch.Tensor:
    """(B + 1,) offsets -> (B,) int64 lengths."""
    return (offsets[1:] - offsets[:-1]).long()


def row_ids(offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the n rows: (sequence index (n,), position in its sequence (n,)), int64."""
    lengths = lengths_of(offsets)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)
    pos = torch.arange(n, device=offsets.device) - offsets[:-1].long()[seq]
    return seq, pos


def to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """(N, *F) jagged -> (B, max_len, *F) zero-padded, left-aligned (differentiable)."""
    seq, pos = row_ids(offsets, values.shape[0])
    out = values.new_zeros(offsets.numel() - 1, max_len, *values.shape[1:])
    return out.index_put((seq, pos), values)


def from_padded(padded: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L, *F) left-aligned padded -> (N, *F) jagged (differentiable)."""
    seq, pos = row_ids(offsets, n)
    return padded[seq, pos]


def heavy_tailed_lengths(batch: int, mean: float, max_len: int, generator: torch.Generator | None = None,
                         sigma: float = 1.5) -> torch.Tensor:
    """(batch,) int64 log-normal lengths in [1, max_len] with the given mean, the last one max_len.

    User histories are heavy-tailed: most users are short, a few are very long,
    and those few set the padded size. sigma 1.5 puts the median near a third
    of the mean; the location is refitted (a few fixed-point steps on the same
    draws) so the mean after clipping is the one asked for, and one sequence
    is pinned at ``max_len`` so the worst case is always present.
    """
    if batch < 1 or not 1 <= mean <= max_len:
        raise ValueError(f"need batch >= 1 and 1 <= mean <= max_len, got {batch}, {mean}, {max_len}")
    z = torch.randn(batch, generator=generator, dtype=torch.float64)
    mu = math.log(mean) - sigma**2 / 2

    def draw(mu: float) -> torch.Tensor:
        out = torch.exp(mu + sigma * z).round().clamp(1, max_len)
        out[-1] = max_len
        return out

    for _ in range(8):
        mu += math.log(mean / float(draw(mu).mean()))
    return draw(mu).long()
