"""Wukong blocks: the optimized FM equals its definition; shapes and gradients."""

from __future__ import annotations

import torch

from opengem.model.wukong import FMBlock, WukongArch, WukongConfig


def test_optimized_fm_equals_full_interaction_times_projection():
    torch.manual_seed(0)
    cfg = WukongConfig(n_fm=3, n_lcb=2, rank=5)
    fm = FMBlock(7, 6, cfg)
    x = torch.randn(4, 7, 6)
    full = (x @ x.transpose(1, 2)) @ fm.proj  # (B, n, n) @ (n, k): the unoptimized form
    fast = torch.bmm(x, torch.einsum("bnd,nk->bdk", x, fm.proj))
    torch.testing.assert_close(fast, full)
    assert fm(x).shape == (4, 3, 6)


def test_arch_shapes_and_grads_awkward_sizes():
    for B, n_in, d, layers in [(1, 3, 4, 1), (5, 13, 6, 3), (2, 8, 8, 0)]:
        cfg = WukongConfig(n_layers=layers, n_fm=3, n_lcb=5, rank=3)
        arch = WukongArch(n_in, d, cfg)
        x = torch.randn(B, n_in, d, requires_grad=True)
        y = arch(x)
        assert y.shape == (B, arch.n_out, d)
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in arch.parameters())


def test_extra_inputs_widen_layer_inputs():
    cfg = WukongConfig(n_layers=3, n_fm=2, n_lcb=2, rank=2)
    arch = WukongArch(5, 4, cfg, extra=(3, 3))
    assert arch.n_in == (8, 7, 4)


def test_the_fused_cpu_layer_equals_its_blocks_in_values_and_gradients():
    """WukongLayer's PyTorch path mixes x once for the FM, the LCB and the residual; it must
    equal the blocks composed as the docstring defines them (n_in == n_out: identity residual, too)."""
    from opengem.model.wukong import WukongLayer

    torch.manual_seed(0)
    for n_in in (9, 7):  # a learned residual (9 -> 7) and the identity (7 -> 7)
        layer = WukongLayer(n_in, 6, WukongConfig(n_fm=3, n_lcb=4, rank=5))
        x = torch.randn(5, n_in, 6, requires_grad=True)
        got = layer(x)
        y = torch.cat([layer.fmb(x), layer.lcb(x)], dim=1)
        want = layer.norm(y + (x if layer.res is None else torch.einsum("mn,bnd->bmd", layer.res, x)))
        torch.testing.assert_close(got, want)
        g1 = torch.autograd.grad(got.square().sum(), [x] + list(layer.parameters()))
        g2 = torch.autograd.grad(want.square().sum(), [x] + list(layer.parameters()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
        with torch.no_grad():  # the inference form (the FM interaction transposed)
            torch.testing.assert_close(layer(x), want.detach())


def test_the_inference_path_follows_weight_updates():
    """The inference form derives weights from the parameters (the LCB folded into the
    residual, the FM MLP's permuted weights). In training it derives them every call, so it
    follows every optimizer -- a fused Adam step changes weights without bumping their version
    counters; frozen for serving (freeze_derived) it keeps them, and still follows a
    load_state_dict."""
    from opengem.model.wukong import WukongLayer, freeze_derived

    torch.manual_seed(1)
    optimizers = [lambda ps: torch.optim.SGD(ps, lr=0.5), lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
                  lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True)]  # the trainer's dense optimizer is Adam
    for n_in, make_opt in ((9, optimizers[0]), (7, optimizers[0]), (9, optimizers[1]), (7, optimizers[2])):
        layer = WukongLayer(n_in, 6, WukongConfig(n_fm=3, n_lcb=4, rank=5))
        x = torch.randn(4, n_in, 6)
        with torch.no_grad():
            before = layer(x)
        opt = make_opt(list(layer.parameters()))
        layer(x).square().sum().backward()  # the training form
        opt.step()
        with torch.no_grad():
            after = layer(x)
        want = layer(x).detach()  # the training form, with the updated weights
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, want)

        freeze_derived(layer)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), want)
            kept = layer.__dict__["_derived_cache"][1][0]
            layer(x)
            assert layer.__dict__["_derived_cache"][1][0] is kept  # derived once, then kept
        other = WukongLayer(n_in, 6, WukongConfig(n_fm=3, n_lcb=4, rank=5))
        want = other(x).detach()  # the training form of the other weights
        layer.load_state_dict(other.state_dict())
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), want)


def test_bf16_mlp_is_close_to_fp32_and_only_without_autograd():
    """mlp_precision(model, "bf16"): the FM MLPs' matmuls in bfloat16 when autograd is off --
    close to fp32 (bfloat16 rounding), weights kept once for a frozen layer and re-derived
    after a load_state_dict; with autograd on the fp32 training form runs, bit for bit."""
    import pytest

    from opengem.model.wukong import WukongLayer, freeze_derived, mlp_precision

    torch.manual_seed(2)
    layer = WukongLayer(9, 8, WukongConfig(n_fm=3, n_lcb=4, rank=5))
    x = torch.randn(64, 9, 8)
    with torch.no_grad():
        fp32 = layer(x)
    train_fp32 = layer(x).detach()  # autograd on: the training form
    assert mlp_precision(layer, "bf16") == "fp32"
    with torch.no_grad():
        low = layer(x)
    assert low.dtype == torch.float32 and not torch.equal(low, fp32)
    torch.testing.assert_close(low, fp32, atol=0.05, rtol=0.05)
    assert (low - fp32).abs().max() < 0.1 * fp32.abs().max()
    train = layer(x)  # autograd on: the fp32 training form
    assert train.requires_grad and torch.equal(train.detach(), train_fp32)
    freeze_derived(layer)
    with torch.inference_mode():
        assert torch.equal(layer(x), low)
        kept = layer.fmb.__dict__["_bf16_cache"][1][0]
        layer(x)
        assert layer.fmb.__dict__["_bf16_cache"][1][0] is kept and kept.dtype == torch.bfloat16
    other = WukongLayer(9, 8, WukongConfig(n_fm=3, n_lcb=4, rank=5))
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        mlp_precision(other, "bf16")
        torch.testing.assert_close(layer(x), other(x), atol=0, rtol=0)  # the new weights, in bf16
    assert mlp_precision(layer, "fp32") == "bf16"
    with torch.inference_mode():
        mlp_precision(other, "fp32")
        torch.testing.assert_close(layer(x), other(x))
    with pytest.raises(ValueError, match="precision"):
        mlp_precision(layer, "fp16")
