"""GemConfig: the model's root config, composed of one frozen config per part.

Presets (:func:`preset`): ``tiny`` for unit tests, ``base`` for a 2-core CPU
(online training keeps up with a simulator at a few hundred examples/s),
``large`` for a GPU. Every part is switchable for ablations::

    cfg = preset("base")
    dataclasses.replace(cfg, use_sequence=False)                    # no sequence arch
    dataclasses.replace(cfg, interleave=False)                      # sequence, then interaction
    dataclasses.replace(cfg, seq_conditioning="target")             # pyramid conditioned on the ad
    with_pyramid(cfg, pyramid=False, max_len=256)                   # one full-resolution branch
    dataclasses.replace(cfg, heads=replace(cfg.heads, per_surface=False))  # one shared head
    dataclasses.replace(cfg, wukong=replace(cfg.wukong, n_layers=4))        # Wukong depth
    gem_last_n(cfg, 50)                                             # GEM on the last 50 events

``load_gem_config(dict)`` builds one from a TOML table; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from opengem.config import from_dict
from opengem.model.batch import FeatureConfig
from opengem.model.pyramid import PyramidConfig
from opengem.model.wukong import WukongConfig


@dataclass(frozen=True)
class HeadConfig:
    # One tower per surface (multi-domain); False: one tower shared by all surfaces.
    per_surface: bool = True
    # Gated experts shared across surfaces (MMoE); 0: towers read the trunk directly.
    n_experts: int = 0
    # Funnel stages (0: click | impression, 1: conversion | click) whose logit comes from one tower
    # shared by every surface; the other stages keep a tower per surface. E.g. (1,): rare conversions
    # are not split four ways, clicks keep the surface-specific response.
    shared_stages: tuple[int, ...] = ()
    # Shared trunk MLP on the flattened interaction output.
    trunk: tuple[int, ...] = (128,)
    # Hidden layers of each expert and tower.
    tower: tuple[int, ...] = (64,)


@dataclass(frozen=True)
class GemConfig:
    # One embedding dim for every table and token: Wukong and attention mix them freely.
    d: int = 32
    features: FeatureConfig = field(default_factory=FeatureConfig)
    wukong: WukongConfig = field(default_factory=WukongConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    # Sequence arch on / off (off: the plain non-sequence Wukong model).
    use_sequence: bool = True
    # InterFormer interleaving: sequence layer i <-> Wukong layer i exchange summaries.
    # False: the whole sequence arch first, its summary fed once into Wukong layer 0.
    interleave: bool = True
    # What the pyramid's age branches are conditioned on (model/gem.py, "Two sequence encoders"):
    # "user": user / request tokens only, so the sequence encoding is candidate-independent and a
    #   server runs it once per request; the ad meets the history through target attention over
    #   the pyramid's tokens, the search branch and the Wukong layers (the presets' choice);
    # "target": the target ad token and the candidate's interaction summary, InterFormer-style
    #   (the ablation; a server runs the pyramid once per candidate). The field's default is
    #   "target" because versions published before the option existed were built that way.
    seq_conditioning: str = "target"
    # Non-sequence summary tokens prepended to the sequence (plus the target ad token).
    n_ctx: int = 2
    # Tokens the dense features become (dense MLP output).
    n_dense_tokens: int = 2
    # Hidden width of the dense MLP.
    dense_hidden: int = 64
    # Every table starts U(-emb_init, emb_init). TorchRec's default U(±1/sqrt(rows))
    # starts a 65k-row item table ~100x smaller than the 5-row surface table, so in a
    # history event (the sum of its item, advertiser, category, surface, kind and age
    # embeddings) the item is invisible at first and slow to learn.
    emb_init: float = 0.1

    def __post_init__(self) -> None:
        if self.seq_conditioning not in ("user", "target"):
            raise ValueError(f"seq_conditioning must be 'user' or 'target', got {self.seq_conditioning!r}")
        if self.d % self.pyramid.n_heads:
            raise ValueError(f"d={self.d} not divisible by n_heads={self.pyramid.n_heads}")
        if self.use_sequence and self.wukong.n_layers < (self.pyramid.n_layers if self.interleave else 1):
            raise ValueError("interleaving needs at least as many Wukong layers as sequence layers")


def with_pyramid(cfg: GemConfig, **kw: Any) -> GemConfig:
    return replace(cfg, pyramid=replace(cfg.pyramid, **kw))


def gem_last_n(cfg: GemConfig, n: int = 50) -> GemConfig:
    """GEM that reads only the last n events: one full-resolution branch, no merging."""
    return with_pyramid(cfg, pyramid=False, max_len=n, shrink=1)


def _tiny() -> GemConfig:
    return GemConfig(
        d=8,
        features=FeatureConfig(user_rows=512, item_rows=512, advertiser_rows=64, category_rows=32, country_rows=16),
        wukong=WukongConfig(n_layers=2, n_fm=4, n_lcb=4, rank=4),
        pyramid=PyramidConfig(
            n_layers=2, max_len=256, recent=8, n_levels=3, level_factor=4, min_tokens=4, n_heads=2, n_pma=1, n_recent=1,
            search_len=16,
        ),
        heads=HeadConfig(trunk=(32,), tower=(16,)),
        n_ctx=1, n_dense_tokens=1, dense_hidden=16, seq_conditioning="user",
    )


def _base() -> GemConfig:
    return GemConfig(
        d=32,
        wukong=WukongConfig(n_layers=3, n_fm=8, n_lcb=8, rank=8),
        # search_strong: 8 slots for the most recent matching conversions / clicks / follows anywhere in
        # the 1,024 events (docs/model-results.md, 2026-12-07: what lets GEM read an old purchase intent)
        pyramid=PyramidConfig(n_layers=2, max_len=1024, recent=64, n_levels=3, level_factor=4, min_tokens=16,
                              search_strong=8),
        heads=HeadConfig(trunk=(128,), tower=(64,)),
        seq_conditioning="user",
    )


def _large() -> GemConfig:
    return GemConfig(
        d=128,
        features=FeatureConfig(user_rows=1 << 22, item_rows=1 << 22, advertiser_rows=1 << 16, category_rows=1 << 12),
        wukong=WukongConfig(n_layers=6, n_fm=24, n_lcb=24, rank=16),
        pyramid=PyramidConfig(
            n_layers=4, max_len=16384, recent=256, n_levels=4, level_factor=4, min_tokens=32, n_heads=4,
            ffn_mult=4, n_pma=4, n_recent=4, search_len=256,
        ),
        heads=HeadConfig(n_experts=4, trunk=(1024, 512), tower=(256,)),
        n_ctx=4, n_dense_tokens=4, dense_hidden=512, seq_conditioning="user",
    )


PRESETS = {"tiny": _tiny, "base": _base, "large": _large}


def preset(name: str) -> GemConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def load_gem_config(data: dict[str, Any], base: str | None = None) -> GemConfig:
    """A TOML table -> GemConfig; with ``base``, keys override that preset (nested tables merge)."""
    if base is None:
        return from_dict(GemConfig, data, "model")
    merged = _merge(dataclasses.asdict(preset(base)), data)
    return from_dict(GemConfig, merged, "model")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out
