"""Triton kernels vs their PyTorch baselines, forward + backward, on an NVIDIA GPU.

Batch: 256 user sequences, lengths log-normal with mean 500 and max 4096
(:func:`opengem.kernels.jagged.heavy_tailed_lengths`), bf16.

* ``jagged_attention_causal`` / ``jagged_attention``: the jagged kernel vs
  padded SDPA on the same data -- causal: the flash backend with
  ``is_causal`` (exact for real rows, since padding comes after them);
  bidirectional: the memory-efficient backend with a key-padding mask (flash
  takes no mask). The baseline times SDPA alone on pre-padded tensors (no
  pad/unpad copies), which flatters it. Also vs ``torch.compile`` of the
  jagged reference. Goal: >= 2x padded SDPA, fwd + bwd.
* ``pyramid_pool``: count-4 weighted mean (the next pyramid level) vs the
  index_add reference, eager and compiled.
* ``fm_interaction``: Wukong's X (Xᵀ Y) vs the einsum + bmm reference, eager
  and compiled.

Figures per kernel: ``ms`` (Triton, fwd + bwd), ``reference_ms`` (the fastest
baseline measured), ``speedup`` = reference_ms / ms, ``tflops`` (attention) or
``gbps`` (pooling, FM; bytes that must move at least once), ``device``; plus
every baseline's time and forward-only times. Without CUDA it says so, writes
the JSON with device "cpu" and no figures, and exits 0 (``make bench`` goes on).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, table, write  # noqa: E402

from opengem.kernels import (  # noqa: E402
    fm_interaction,
    jagged_attention,
    pyramid_pool,
    reference_fm_interaction,
    reference_jagged_attention,
    reference_pyramid_pool,
    segments_by_count,
)
from opengem.kernels.jagged import heavy_tailed_lengths, to_padded  # noqa: E402

NAME = "kernels"
KERNELS = ("jagged_attention_causal", "jagged_attention", "pyramid_pool", "fm_interaction")
DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
UNIT = {"jagged_attention_causal": "tflops", "jagged_attention": "tflops", "pyramid_pool": "gbps",
        "fm_interaction": "gbps"}


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median ms of ``fn`` on the GPU (triton's do_bench: warm-up, cache flush, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(reps // 4, 5), rep=reps, return_mode="median"))


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running fn forward and backward into ``inputs`` (grads cleared each time)."""
    def run() -> None:
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def time_compiled(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], reps: int) -> dict[str, Any]:
    """Fwd + bwd ms of ``torch.compile(fn)(*inputs)``; a compile failure is reported, not raised."""
    try:
        cf = torch.compile(fn, dynamic=False)
        return {"compiled_reference_ms": timed(fwd_bwd(lambda: cf(*inputs), inputs), reps)}
    except Exception as e:  # noqa: BLE001 -- any compiler error is a figure to report
        print(f"torch.compile of the reference failed: {type(e).__name__}: {e}")
        return {"compiled_reference_error": f"{type(e).__name__}: {str(e)[:300]}"}


def bench_attention(lengths: torch.Tensor, causal: bool, H: int, D: int, reps: int) -> dict[str, Any]:
    dev, dt = DEVICE, DTYPE
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(dev)
    N, L = int(lengths.sum()), int(lengths.max())
    q, k, v = (torch.randn(N, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        err = (jagged_attention(q, k, v, offsets, causal=causal, max_len=L, backend="triton").float()
               - reference_jagged_attention(q, k, v, offsets, causal=causal, max_len=L).float()).abs().max().item()
    jag = lambda: jagged_attention(q, k, v, offsets, causal=causal, max_len=L, backend="triton")  # noqa: E731
    pq, pk, pv = (to_padded(t.detach(), offsets, L).transpose(1, 2).contiguous().requires_grad_(True)
                  for t in (q, k, v))  # (B, H, L, D)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if causal:
        backend, mask = SDPBackend.FLASH_ATTENTION, None
    else:
        backend = SDPBackend.EFFICIENT_ATTENTION
        mask = (torch.arange(L, device=dev)[None, :] < lengths.to(dev)[:, None])[:, None, None, :]  # (B, 1, 1, L)

    def padded() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, is_causal=causal)

    per_pair = 4 * H * D * float((lengths.double() ** 2).sum()) * (0.5 if causal else 1.0)  # fwd flops
    res = {
        "ms": timed(fwd_bwd(jag, [q, k, v]), reps),
        "fwd_ms": timed(jag, reps),
        "padded_sdpa_ms": timed(fwd_bwd(padded, [pq, pk, pv]), reps),
        "padded_sdpa_fwd_ms": timed(padded, reps),
        "padded_sdpa_backend": backend.name,
        "max_abs_err_vs_reference": err,
    }
    res.update(time_compiled(lambda q, k, v: reference_jagged_attention(q, k, v, offsets, causal=causal, max_len=L),
                             [q, k, v], reps))
    res["tflops"] = 3.5 * per_pair / (res["ms"] * 1e-3) / 1e12  # fwd + bwd = 3.5 x fwd (FlashAttention count)
    return res


def bench_pool(lengths: torch.Tensor, D: int, reps: int) -> dict[str, Any]:
    dev, dt = DEVICE, DTYPE
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(dev)
    segs = segments_by_count(offsets, 4)
    N, S = int(lengths.sum()), segs.num_segments
    x = torch.randn(N, D, device=dev, dtype=dt, requires_grad=True)
    w = (torch.rand(N, device=dev, dtype=dt) + 0.5).requires_grad_(True)
    with torch.no_grad():
        err = (pyramid_pool(x, segs, weights=w, backend="triton").float()
               - reference_pyramid_pool(x, segs, weights=w).float()).abs().max().item()
    tri = lambda: pyramid_pool(x, segs, weights=w, backend="triton")  # noqa: E731
    ref = lambda: reference_pyramid_pool(x, segs, weights=w)  # noqa: E731
    res = {"ms": timed(fwd_bwd(tri, [x, w]), reps), "fwd_ms": timed(tri, reps),
           "eager_reference_ms": timed(fwd_bwd(ref, [x, w]), reps), "max_abs_err_vs_reference": err}
    res.update(time_compiled(lambda x, w: reference_pyramid_pool(x, segs, weights=w), [x, w], reps))
    # fwd: read x, w, write out; bwd: read g, x, w, write dx, dw.
    moved = 2 * (2 * N * D + 2 * S * D + 3 * N)
    res["gbps"] = moved / (res["ms"] * 1e-3) / 1e9
    return res


def bench_fm(B: int, n: int, d: int, k: int, reps: int) -> dict[str, Any]:
    dev, dt = DEVICE, DTYPE
    x = torch.randn(B, n, d, device=dev, dtype=dt, requires_grad=True)
    y = (torch.randn(n, k, device=dev, dtype=dt) / n**0.5).requires_grad_(True)
    with torch.no_grad():
        err = (fm_interaction(x, y, backend="triton").float()
               - reference_fm_interaction(x, y).float()).abs().max().item()
    tri = lambda: fm_interaction(x, y, backend="triton")  # noqa: E731
    ref = lambda: reference_fm_interaction(x, y)  # noqa: E731
    res = {"ms": timed(fwd_bwd(tri, [x, y]), reps), "fwd_ms": timed(tri, reps),
           "eager_reference_ms": timed(fwd_bwd(ref, [x, y]), reps), "max_abs_err_vs_reference": err}
    res.update(time_compiled(reference_fm_interaction, [x, y], reps))
    moved = 2 * (2 * B * n * d + 2 * B * n * k)  # fwd: x, z; bwd: x, g, dx (y, dy negligible)
    res["gbps"] = moved / (res["ms"] * 1e-3) / 1e9
    return res


def main() -> None:
    ap = parser(NAME, __doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--mean-len", type=float, default=500)
    ap.add_argument("--max-len", type=int, default=4096)
    args = ap.parse_args()
    config = {"batch": args.batch, "mean_len": args.mean_len, "max_len": args.max_len, "dtype": "bfloat16",
              "attention": {"heads": 4, "head_dim": 64}, "pool": {"factor": 4, "dim": 256},
              "fm": {"batch": 8192, "n": 40, "d": 128, "k": 16}, "quick": args.quick}
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here -- the Triton kernels were not timed (on CPU they only run "
              "in the Triton interpreter, which says nothing about speed). Run this on an NVIDIA GPU.")
        figures = {k: {"ms": None, "reference_ms": None, "speedup": None, UNIT[k]: None, "device": "cpu"}
                   for k in KERNELS}
        write(args.out, NAME, config, {"device": "cpu", "status": "unmeasured: no CUDA device", "kernels": figures})
        return
    device = torch.cuda.get_device_name(0)
    reps = 50 if args.quick else 300
    lengths = heavy_tailed_lengths(args.batch, args.mean_len, args.max_len, torch.Generator().manual_seed(0))
    print(f"{device}: batch {args.batch}, lengths mean {lengths.double().mean():.0f} "
          f"median {lengths.median().item()} max {lengths.max().item()}")
    fm = config["fm"]
    figures = {
        "jagged_attention_causal": bench_attention(lengths, True, 4, 64, reps),
        "jagged_attention": bench_attention(lengths, False, 4, 64, reps),
        "pyramid_pool": bench_pool(lengths, 256, reps),
        "fm_interaction": bench_fm(fm["batch"], fm["n"], fm["d"], fm["k"], reps),
    }
    rows = []
    for name, r in figures.items():
        base = {k: v for k, v in r.items() if k.endswith("_ms") and "fwd" not in k}
        r["reference"] = min(base, key=base.get)
        r["reference_ms"] = base[r["reference"]]
        r["speedup"] = r["reference_ms"] / r["ms"]
        r["device"] = device
        unit = UNIT[name]
        rows.append([name, r["ms"], r["reference"].removesuffix("_ms"), r["reference_ms"], r["speedup"], unit, r[unit]])
    print(table(rows, ["kernel (fwd+bwd)", "triton ms", "fastest baseline", "baseline ms", "speedup", "unit",
                       "achieved"]))
    write(args.out, NAME, config, {"device": device, "status": "measured", "kernels": figures})


if __name__ == "__main__":
    main()
