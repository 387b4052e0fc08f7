"""Ground-truth simulator: a seeded generative model of an ad ecosystem.

It emits :class:`opengem.stream.events.Event` streams (organic activity and ad
impressions / clicks / conversions on several surfaces) that contain the
signals a GEM-style model exists to exploit, each behind a switch and a
strength in :class:`SimConfig`: slowly drifting user interests, cross-domain
transfer (organic interest drives ad response on other surfaces), long-range
intent (conversions that depend on one event hundreds of events back),
non-additive feature interactions, delayed conversions, ad churn (cold start)
and heavy-tailed user activity.

Every impression carries the true ``p_click`` and ``p_conversion``
(= P(conversion | impression)); clicks and conversions are sampled exactly from
them, so the oracle normalized entropy of any window is computable
(:func:`normalized_entropy`). The generative process, its equations and
defaults are in ``docs/simulator.md``.

Generation is vectorized: a fixed-size block of activations (user picks,
surfaces, items, probabilities, outcomes) is drawn with NumPy, and Event
objects are built only at the end. Each random component has its own PCG64
stream spawned from ``seed``, so the stream does not depend on ``batch_size``,
and switching one signal leaves the random draws of the others unchanged
(common random numbers).

ID spaces: user ids are ``0 .. n_users-1``; organic item ids are
``0 .. n_organic_items-1``; ad ``k`` (the k-th ad ever created, the initial
pool first) has item id ``AD_ID_BASE + k``. Advertiser ids are
``0 .. n_advertisers-1``; categories ``0 .. n_categories-1`` (shared by ads and
organic items).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from opengem.stream.events import (
    AD_FORMATS,
    AD_KINDS,
    DEFAULT_SURFACES,
    DEVICES,
    KIND_INDEX,
    KINDS,
    MAX_STR,
    Event,
)

AD_ID_BASE = 1_000_000_000  # ad item ids start here; organic ids lie below
LONG_RANGE_CAUSES = ("follow", "conversion")
_BLOCK = 8192  # activations per generation block (fixed: the stream must not depend on batch sizes)
_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 24 * _MS_PER_HOUR

COUNTRIES = ("US", "BR", "IN", "GB", "DE", "ID", "MX", "JP")
COUNTRY_WEIGHTS = (0.25, 0.12, 0.20, 0.08, 0.08, 0.12, 0.08, 0.07)
COUNTRY_TZ = (-5, -3, 5, 0, 1, 7, -6, 9)  # hours from UTC (whole hours)
DEVICE_WEIGHTS = (0.35, 0.45, 0.15, 0.05)  # ios, android, web, other
AGE_WEIGHTS = (0.08, 0.14, 0.18, 0.16, 0.14, 0.12, 0.10, 0.08)  # age_bucket 0..7
FORMAT_WEIGHTS = (0.35, 0.30, 0.20, 0.15)  # image, video, carousel, collection
assert KINDS[: len(AD_KINDS)] == AD_KINDS  # kind codes < 3 are the ad kinds
ORGANIC_KIND_CODES = np.array([KIND_INDEX[k] for k in ("view", "like", "share", "comment", "follow")])

# Signs of the XOR-like interaction terms (docs/simulator.md, "interactions").
AGE_SIGN = np.array([1, 1, 1, 1, -1, -1, -1, -1])  # young (0..3) vs older
FORMAT_SIGN = np.array([-1, 1, -1, 1])  # video / collection vs image / carousel
DEVICE_SIGN = np.array([1, -1, 1, -1])  # ios, web vs android, other
COUNTRY_SIGN = np.array([1, -1, 1, -1, 1, -1, 1, -1])
HOUR_SIGN = np.where((np.arange(24) >= 8) & (np.arange(24) < 20), 1, -1)  # local daytime
# Additive (linear-capturable) main effects on the click logit.
AGE_EFFECT = np.linspace(0.2, -0.2, 8)
DEVICE_EFFECT = np.array([0.15, 0.0, -0.1, -0.3])
HOUR_EFFECT = 0.25 * np.cos(2 * np.pi * (np.arange(24) - 21) / 24)  # evening peak


@dataclass(frozen=True)
class SurfaceProfile:
    """How one surface behaves. Organic kind logits are relative to ``view``."""

    traffic: float  # share of activations (before per-user preferences)
    ad_share: float  # P(activation is an ad impression)
    ctr_logit: float  # base click logit
    cvr_logit: float  # base logit of P(conversion | click)
    kind_logits: tuple[float, float, float, float]  # like, share, comment, follow
    format_effect: tuple[float, float, float, float]  # click-logit effect of image, video, carousel, collection
    # How much more (or less) the user-ad affinity drives clicks here than on average: the click
    # logit's affinity weight is A * (1 + surface_affinity_spread * affinity_shift) (off at spread 0).
    affinity_shift: float = 0.0


SURFACE_PROFILES = {
    # feed: the main surface, most ads, image formats do well
    # (affinity: relevance matters on feed, less in stories, least on reels -- people watch
    # entertainment there -- and most in messaging, where people come with an intent)
    "feed": SurfaceProfile(0.40, 0.22, -3.4, -2.4, (-2.8, -4.6, -4.3, -4.5), (0.2, -0.1, 0.1, 0.0), 0.25),
    # stories: short sessions, video favoured, lower CTR
    "stories": SurfaceProfile(0.20, 0.18, -3.9, -2.6, (-3.4, -4.8, -4.0, -4.8), (-0.2, 0.3, -0.1, 0.0), -0.25),
    # reels: organic-heavy, video strongly favoured, many likes and follows
    "reels": SurfaceProfile(0.30, 0.12, -3.6, -2.8, (-2.5, -4.0, -4.5, -4.1), (-0.4, 0.5, -0.2, 0.1), -0.75),
    # messaging: few ads, lowest CTR but high CVR, many shares/comments
    "messaging": SurfaceProfile(0.10, 0.08, -4.3, -2.0, (-4.0, -3.2, -3.0, -5.5), (0.1, -0.3, 0.0, 0.2), 0.75),
}


def surface_profile(name: str) -> SurfaceProfile:
    """The hand-set profile of a known surface, or one drawn from a PRNG seeded by the name."""
    if name in SURFACE_PROFILES:
        return SURFACE_PROFILES[name]
    r = np.random.default_rng(zlib.crc32(name.encode()))
    return SurfaceProfile(
        traffic=float(r.uniform(0.1, 0.4)),
        ad_share=float(r.uniform(0.05, 0.25)),
        ctr_logit=float(r.uniform(-4.3, -3.3)),
        cvr_logit=float(r.uniform(-2.8, -2.0)),
        kind_logits=tuple(float(x) for x in r.uniform([-4, -5, -5, -5.5], [-2.5, -3, -3, -4])),
        format_effect=tuple(float(x) for x in r.normal(0, 0.25, 4)),
        affinity_shift=float(r.uniform(-0.75, 0.75)),  # drawn last: the fields above stay as they were
    )


@dataclass(frozen=True)
class SimConfig:
    # The domains. Known names get hand-set profiles (SURFACE_PROFILES), others one seeded by the name.
    surfaces: tuple[str, ...] = DEFAULT_SURFACES
    # Everything random derives from it; it also prefixes event ids, so streams of different seeds never collide.
    seed: int = 0
    # First event time: 2026-01-01T00:00Z, fixed (not the wall clock) so runs are reproducible.
    start_ts_ms: int = 1_767_225_600_000
    # Simulated activations per simulated second, ecosystem-wide: 1M events span ~2.8 h of event
    # time, so local hours, interest drift and conversion delays all matter in ordinary runs.
    events_per_second: float = 100.0
    # Users; with heavy_tail the busiest few have thousands of events per million.
    n_users: int = 20_000
    # Organic items (posts, videos); ids 0..n-1, must stay below AD_ID_BASE.
    n_organic_items: int = 100_000
    # Content / ad categories shared by ads and organic items.
    n_categories: int = 32
    # Advertisers; each has a main category (80 % of its ads) and its own CVR level.
    n_advertisers: int = 1_000
    # Live ads at the start; with cold_start the churn keeps the pool near this size.
    n_ads: int = 5_000
    # New ads per simulated hour (cold_start); lifetimes are Exp(mean n_ads / new_ads_per_hour h) = 20 h.
    new_ads_per_hour: float = 250.0
    # Dimension of user interests and item attribute vectors; 16 is enough for 32 categories to differ.
    interest_dims: int = 16
    # Weight of an item's own random direction vs its category's (0: items = their category).
    item_noise: float = 0.5
    # Sharpness of interest-driven organic category choice (softmax temperature^-1).
    organic_focus: float = 1.5
    # How much user-item affinity raises like/share/comment/follow over view.
    engagement_scale: float = 1.0
    # Weight of the user-ad affinity in the click logit.
    affinity_scale: float = 0.8
    # Surface-specific response (multi-domain): on surface s the click logit's affinity weight is
    # affinity_scale * (1 + surface_affinity_spread * SurfaceProfile.affinity_shift), so how much
    # relevance drives a click depends on the surface (reels 0.25x, messaging 1.75x at 1.0). 0 (the
    # default): one weight everywhere, the surface effects stay additive. At most 1 / 0.75, where the
    # weight of the least relevance-driven surface (shift -0.75) reaches 0.
    surface_affinity_spread: float = 0.0
    # Weight of the user-ad affinity in the CVR logit.
    cvr_affinity_scale: float = 0.5
    # Std of the per-advertiser CVR logit offset.
    advertiser_cvr_std: float = 0.5
    # Concentration of each user's Dirichlet surface mix around the surfaces' traffic shares.
    surface_concentration: float = 5.0
    # Median delay of a click after its impression (lognormal, sigma 1, clipped to max_click_delay_s).
    click_delay_median_s: float = 5.0
    # Clicks never come later than this after their impression.
    max_click_delay_s: float = 300.0
    # Lognormal sigma of the conversion delay (delayed_conversions).
    conversion_delay_sigma: float = 1.0
    # Conversions never come later than this after their click (a 1-day click-through window).
    max_conversion_delay_s: float = 86_400.0

    # --- signals: a switch and a strength each (docs/simulator.md) ---
    # Interests follow an Ornstein-Uhlenbeck random walk in event time.
    drift: bool = True
    # Rate per simulated day: corr(u(t), u(t + dt)) = exp(-drift_strength * dt / 1 day).
    drift_strength: float = 0.5
    # Abrupt drift (online-learning tests): interests move once, at the first generation block
    # starting at or after this many seconds of event time (0: never). See interest_shift_strength.
    interest_shift_at_s: float = 0.0
    # s in [0, 1], how far they move: every user's interests u <- sqrt(1 - s^2) u + s e (v too),
    # and so do the population's: the categories' click effects gamma <- sqrt(1 - s^2) gamma +
    # s gamma', gamma' ~ N(0, category_effect_std^2). 1: all drawn anew (corr with before 0).
    interest_shift_strength: float = 1.0
    # Std of the categories' additive click-logit effects gamma_k (how much the category of an ad
    # matters to everyone, a population-level interest).
    category_effect_std: float = 0.3
    # Market drift: one click-logit offset m(t) for all traffic, an Ornstein-Uhlenbeck walk in
    # event time (stationary std market_drift_std, correlation time market_drift_tau_s, on a
    # 60 s grid): auction pressure / seasonality that no feature explains, so a model's
    # calibration ages with it -- what a stale teacher suffers from and the Student Adapter
    # corrects (bench/transfer.py). 0: off (the default).
    market_drift_std: float = 0.0
    market_drift_tau_s: float = 3600.0
    # The interest that drives ad response is correlated with the organic one.
    cross_domain: bool = True
    # rho in [0, 1]: u_ad = rho * u + sqrt(1 - rho^2) * v (v independent of organic behaviour).
    cross_domain_strength: float = 0.8
    # Rare follows plant an intent that raises CVR for that category much later.
    long_range: bool = True
    # Added to the CVR logit of ads in the active intent's category.
    long_range_strength: float = 2.0
    # Added to the CLICK logit of the same ads (an old purchase intent also draws clicks). 0 (the
    # default) keeps the intent a conversion-only signal: conversions are rare, so what a model can
    # learn of it in one pass is small; clicks are ~7x more frequent and carry it further.
    long_range_click_strength: float = 0.0
    # An intent is active only from this many of the user's activations after the planting follow.
    long_range_min_gap: int = 200
    # P(a cause event plants an intent); ~1 plant per ~900 activations of a user at the default.
    long_range_plant_prob: float = 0.05
    # The event that plants: "follow" (an organic follow of an item: the intent is that
    # item's category; 1 in 20 follows plants at the default, the others are decoys) or
    # "conversion" (a conversion on an ad: its category; with plant_prob 1 every conversion
    # plants, so the cause is one identifiable event in the history).
    long_range_cause: str = "follow"
    # XOR-like terms: age x format x hour and device x category (click), country x category (CVR).
    interactions: bool = True
    # Logit size of each interaction term.
    interactions_strength: float = 0.5
    # Conversions come a lognormal delay after the click (else at the click's ts).
    delayed_conversions: bool = True
    # Median conversion delay in minutes.
    delayed_conversions_strength: float = 30.0
    # Ads are created continuously and retire (else a fixed pool that never changes).
    cold_start: bool = True
    # Std of each ad's own click-logit offset: what a model can learn about an ad only from its own traffic.
    cold_start_strength: float = 0.5
    # User activity rates are lognormal (else all users equally active).
    heavy_tail: bool = True
    # Sigma of the lognormal activity rate; 2.0 puts ~1.5 % of all events on the busiest user of 20k.
    heavy_tail_strength: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.surfaces, tuple):
            object.__setattr__(self, "surfaces", tuple(self.surfaces))
        s = self.surfaces
        if not s or len(set(s)) != len(s):
            raise ValueError(f"surfaces must be non-empty and unique, got {s!r}")
        for name in s:
            if not (isinstance(name, str) and 1 <= len(name) <= MAX_STR and name.isascii() and name.isprintable()):
                raise ValueError(f"bad surface name {name!r}")
        checks = {
            "seed": self.seed >= 0,
            "events_per_second": self.events_per_second > 0,
            "n_users": self.n_users >= 1,
            "n_organic_items": 1 <= self.n_organic_items <= AD_ID_BASE,
            "n_categories": self.n_categories >= 1,
            "n_advertisers": self.n_advertisers >= 1,
            "n_ads": self.n_ads >= 1,
            "new_ads_per_hour": self.new_ads_per_hour >= 0,
            "interest_dims": self.interest_dims >= 1,
            "item_noise": 0 <= self.item_noise <= 1,
            "surface_concentration": self.surface_concentration > 0,
            "cross_domain_strength": 0 <= self.cross_domain_strength <= 1,
            "long_range_plant_prob": 0 <= self.long_range_plant_prob <= 1,
            "long_range_min_gap": self.long_range_min_gap >= 0,
            "long_range_click_strength": math.isfinite(self.long_range_click_strength),
            "surface_affinity_spread": 0 <= self.surface_affinity_spread <= 1 / 0.75,
            "drift_strength": self.drift_strength >= 0,
            "interest_shift_at_s": self.interest_shift_at_s >= 0,
            "interest_shift_strength": 0 <= self.interest_shift_strength <= 1,
            "category_effect_std": self.category_effect_std >= 0,
            "market_drift_std": self.market_drift_std >= 0,
            "market_drift_tau_s": self.market_drift_tau_s > 0,
            "delayed_conversions_strength": self.delayed_conversions_strength > 0,
            "cold_start_strength": self.cold_start_strength >= 0,
            "heavy_tail_strength": self.heavy_tail_strength >= 0,
            "max_click_delay_s": self.max_click_delay_s >= 0,
            "max_conversion_delay_s": self.max_conversion_delay_s >= 0,
        }
        checks["long_range_cause"] = self.long_range_cause in LONG_RANGE_CAUSES
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SimConfig: invalid value(s) for {bad}")


_MARKET_STEP_MS = 60_000  # the market drift's grid


def _expit(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _inverse_cdf(weights: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw: weights (N, K) >= 0 (unnormalized), r (N,) uniform -> (N,) int."""
    cum = np.cumsum(weights, axis=1)
    idx = (cum < (r * cum[:, -1])[:, None]).sum(axis=1)
    return np.minimum(idx, weights.shape[1] - 1)


def normalized_entropy(y: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    """NE = mean log loss of predictions ``p`` on labels ``y`` / entropy of the base rate mean(y).

    With ``p`` the simulator's ground truth this is the oracle (Bayes-optimal) NE of the window.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    b = float(y.mean())
    if b <= 0 or b >= 1:
        return float("nan")
    ll = -float(np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    h = -(b * math.log(b) + (1 - b) * math.log1p(-b))
    return ll / h


def conversion_delay_cdf(cfg: SimConfig, seconds: float | np.ndarray) -> np.ndarray:
    """P(conversion comes within ``seconds`` of its click | it happens).

    With an attribution window W measured from the click, the oracle probability of
    "converted within W" is ``p_conversion * conversion_delay_cdf(cfg, W)``. Conversion
    delays are in whole ms, so a window of W includes delays up to floor(W * 1000) ms.
    """
    s = np.asarray(seconds, dtype=np.float64)
    if not cfg.delayed_conversions:
        return np.where(s >= 0, 1.0, 0.0)
    median = cfg.delayed_conversions_strength * 60.0
    with np.errstate(divide="ignore"):
        z = (np.log(np.maximum(s, 0)) - math.log(median)) / max(cfg.conversion_delay_sigma, 1e-12)
    cdf = 0.5 * (1 + _erf(z / math.sqrt(2)))
    return np.where(s >= cfg.max_conversion_delay_s, 1.0, cdf)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


class _Cols:
    """Columnar events: int64 arrays (-1 = absent) and float64 probabilities (nan = absent)."""

    NAMES = ("counter", "user", "ts", "surface", "kind", "item", "req", "fmt", "adv", "cat", "pc", "pv")
    __slots__ = NAMES

    def __init__(self, **kw: np.ndarray):
        for k in self.NAMES:
            setattr(self, k, kw[k])

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, idx: np.ndarray | slice) -> "_Cols":
        return _Cols(**{k: getattr(self, k)[idx] for k in self.NAMES})

    @staticmethod
    def concat(parts: list["_Cols"]) -> "_Cols":
        if len(parts) == 1:
            return parts[0]
        return _Cols(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in _Cols.NAMES})


class _Ads:
    """Every ad ever created (index k = item id AD_ID_BASE + k), grown by doubling."""

    def __init__(self, d: int):
        self.n = 0
        self.cap = 0
        self.d = d
        self.created = np.empty(0, np.int64)
        self.retire = np.empty(0, np.int64)
        self.cat = np.empty(0, np.int64)
        self.adv = np.empty(0, np.int64)
        self.fmt = np.empty(0, np.int64)
        self.bias = np.empty(0, np.float64)
        self.vec = np.empty((0, d), np.float64)

    def append(self, **cols: np.ndarray) -> None:
        m = len(cols["created"])
        if self.n + m > self.cap:
            cap = max(2 * self.cap, self.n + m, 1024)
            for k in ("created", "retire", "cat", "adv", "fmt", "bias", "vec"):
                old = getattr(self, k)
                new = np.empty((cap,) + old.shape[1:], old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, k, new)
            self.cap = cap
        for k, v in cols.items():
            getattr(self, k)[self.n : self.n + m] = v
        self.n += m


_NEVER = np.iinfo(np.int64).max


IMPRESSION_TRACE_FIELDS = (
    "req", "user", "ts", "surface", "p_click", "p_cvr", "z_click", "z_cvr", "click_interactions",
    "cvr_interactions", "cvr_long_range", "click_long_range", "click_surface_affinity",
    "long_range_gap",
)


class Simulator:
    """Seeded event generator; see the module docstring and ``docs/simulator.md``.

    The same config (seed included) always yields the same event sequence, whatever
    ``batch_size`` is used to read it; ``events(n)`` is a prefix of ``events(None)``.
    Each iterator call restarts the stream from the beginning; iterators share the
    simulator's state, so use one at a time (a second Simulator for a second stream).
    """

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        # Opt-in analysis hook: a list that receives, per generated block, the ad impressions'
        # logit terms (``IMPRESSION_TRACE_FIELDS``), for attributing NE to the signals
        # (bench/signal_budget.py). None (the default) costs nothing.
        self.trace: list[dict[str, np.ndarray]] | None = None
        self._init_world()

    # ------------------------------------------------------------------ world
    def _init_world(self) -> None:
        cfg = self.cfg
        rngs = np.random.SeedSequence(cfg.seed).spawn(12)
        (self._r_world, self._r_users, self._r_ads_init, self._r_ads_new, self._r_time, self._r_who,
         self._r_what, self._r_org, self._r_adpick, self._r_out, self._r_drift, self._r_plant) = (
            np.random.Generator(np.random.PCG64(s)) for s in rngs
        )
        rw = self._r_world
        d, K = cfg.interest_dims, cfg.n_categories
        eta = cfg.item_noise
        self.cat_vec = rw.standard_normal((K, d)) / math.sqrt(d)  # |c_k| ~ 1
        pop = 1.0 / np.arange(1, K + 1) ** 0.8
        self.cat_logpop = np.log(pop / pop.sum())
        self.cat_effect = rw.normal(0, cfg.category_effect_std, K)  # additive click-logit effect of a category
        self.cat_sign = rw.permutation(np.resize([1, -1], K))  # device x category term
        self.cat_sign2 = rw.permutation(np.resize([1, -1], K))  # country x category (CVR) term
        # organic items, grouped by category for O(1) draws
        n_org = cfg.n_organic_items
        self.item_cat = rw.choice(K, size=n_org, p=pop / pop.sum())
        self.item_vec = math.sqrt(1 - eta**2) * self.cat_vec[self.item_cat] + eta * rw.standard_normal((n_org, d)) / math.sqrt(d)
        self.items_by_cat = np.argsort(self.item_cat, kind="stable")
        self.cat_count = np.bincount(self.item_cat, minlength=K)
        self.cat_offset = np.concatenate([[0], np.cumsum(self.cat_count)[:-1]])
        self.cat_has_items = self.cat_count > 0
        # advertisers
        self.adv_cat = rw.choice(K, size=cfg.n_advertisers, p=pop / pop.sum())
        self.adv_cvr = rw.normal(0, cfg.advertiser_cvr_std, cfg.n_advertisers)
        # surfaces
        prof = [surface_profile(s) for s in cfg.surfaces]
        self.surf_traffic = np.array([p.traffic for p in prof])
        self.surf_traffic /= self.surf_traffic.sum()
        self.surf_ad_share = np.array([p.ad_share for p in prof])
        self.surf_ctr = np.array([p.ctr_logit for p in prof])
        self.surf_cvr = np.array([p.cvr_logit for p in prof])
        self.surf_kind_logits = np.array([(0.0,) + tuple(p.kind_logits) for p in prof])  # (S, 5)
        self.surf_fmt = np.array([p.format_effect for p in prof])  # (S, 4)
        self.surf_aff = np.array([p.affinity_shift for p in prof])  # (S,)

        # users
        ru = self._r_users
        n = cfg.n_users
        self.user_age = ru.choice(8, size=n, p=AGE_WEIGHTS)
        self.user_country = ru.choice(len(COUNTRIES), size=n, p=COUNTRY_WEIGHTS)
        self.user_device = ru.choice(len(DEVICES), size=n, p=DEVICE_WEIGHTS)
        self.user_tz = np.array(COUNTRY_TZ)[self.user_country]
        z = ru.standard_normal(n)
        rate = np.exp(cfg.heavy_tail_strength * z) if cfg.heavy_tail else np.ones(n)
        self.user_rate = rate / rate.sum()  # share of all activations
        self._user_cdf = np.cumsum(self.user_rate)
        self._user_cdf[-1] = 1.0
        mix = ru.dirichlet(cfg.surface_concentration * self.surf_traffic, size=n) if len(cfg.surfaces) > 1 else np.ones((n, 1))
        self._surf_cum = np.cumsum(mix, axis=1)
        self._surf_cum[:, -1] = 1.0
        self.u = ru.standard_normal((n, d))  # organic interest
        self.shifted_at_ms: int | None = None  # when interest_shift_at_s moved the interests
        self.v = ru.standard_normal((n, d))  # interest seen only by ads (cross_domain mixes it with u)
        self._u_ts = np.full(n, cfg.start_ts_ms, np.int64)  # time of the last drift update
        self.user_count = np.zeros(n, np.int64)  # activations so far
        self.intent_cat = np.full(n, -1, np.int64)
        self.intent_n = np.zeros(n, np.int64)  # user activation index of the planting follow

        # ads
        self.ads = _Ads(d)
        hours = cfg.n_ads / cfg.new_ads_per_hour if cfg.new_ads_per_hour > 0 else math.inf
        self._ad_churn = cfg.cold_start and cfg.new_ads_per_hour > 0
        self._ad_life_ms = hours * _MS_PER_HOUR
        self._new_ads(self._r_ads_init, np.full(cfg.n_ads, cfg.start_ts_ms, np.int64))
        self._next_ad_ms = float(cfg.start_ts_ms)
        if self._ad_churn:
            self._next_ad_ms += self._r_ads_new.exponential(_MS_PER_HOUR / cfg.new_ads_per_hour)

        # clock and counters
        self._t_ms = 0.0  # simulated ms since start (float, exact cumsum)
        self._counter = 0
        self._pending: _Cols | None = None

    def _new_ads(self, r: np.random.Generator, created: np.ndarray) -> None:
        cfg = self.cfg
        m = len(created)
        K, d, eta = cfg.n_categories, cfg.interest_dims, cfg.item_noise
        adv = r.integers(0, cfg.n_advertisers, m)
        pop = np.exp(self.cat_logpop)
        cat = np.where(r.random(m) < 0.8, self.adv_cat[adv], r.choice(K, size=m, p=pop))
        fmt = r.choice(4, size=m, p=FORMAT_WEIGHTS)
        bias = r.normal(0, cfg.cold_start_strength, m)
        vec = math.sqrt(1 - eta**2) * self.cat_vec[cat] + eta * r.standard_normal((m, d)) / math.sqrt(d)
        life = r.exponential(1.0, m)
        if self._ad_churn:
            retire = created + np.minimum(life * self._ad_life_ms, 1e15).astype(np.int64)
        else:
            retire = np.full(m, _NEVER, np.int64)
        self.ads.append(created=created, retire=retire, cat=cat, adv=adv, fmt=fmt, bias=bias, vec=vec)

    def ad_table(self) -> dict[str, np.ndarray]:
        """All ads created so far: item_id, created_ts, retire_ts (int64 max = never), category, advertiser_id, ad_format."""
        a, n = self.ads, self.ads.n
        return {
            "item_id": AD_ID_BASE + np.arange(n, dtype=np.int64),
            "created_ts": a.created[:n].copy(),
            "retire_ts": a.retire[:n].copy(),
            "category": a.cat[:n].copy(),
            "advertiser_id": a.adv[:n].copy(),
            "ad_format": np.array(AD_FORMATS)[a.fmt[:n]],
        }

    def live_ads(self, ts: int) -> np.ndarray:
        """Item ids of the ads live at ``ts`` among those created so far (candidates for ranking calls)."""
        a, n = self.ads, self.ads.n
        k = np.flatnonzero((a.created[:n] <= ts) & (a.retire[:n] > ts))
        return AD_ID_BASE + k

    # ------------------------------------------------------------------ blocks
    def _shift_interests(self) -> None:
        """The abrupt shift (``interest_shift_at_s``): users' u, v and the categories' click effects
        move to ``sqrt(1 - s^2) old + s new`` (s = ``interest_shift_strength``); its own PRNG."""
        cfg = self.cfg
        r = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, 0x5817])))
        s = cfg.interest_shift_strength
        keep = math.sqrt(max(0.0, 1.0 - s * s))
        self.u = keep * self.u + s * r.standard_normal(self.u.shape)
        self.v = keep * self.v + s * r.standard_normal(self.v.shape)
        self.cat_effect = keep * self.cat_effect + s * r.normal(0, cfg.category_effect_std, len(self.cat_effect))

    def market_offset(self, ts: np.ndarray) -> np.ndarray:
        """m(ts): the market drift's click-logit offset at event times ``ts`` (ms), 0 when off.

        A function of time alone (its own seeded walk, extended on demand), so it does not
        depend on how events are cut into blocks."""
        cfg = self.cfg
        ts = np.asarray(ts, np.int64)
        if cfg.market_drift_std == 0 or not ts.size:
            return np.zeros(ts.shape)
        k = np.maximum((ts - cfg.start_ts_ms) // _MARKET_STEP_MS, 0)
        need = int(k.max()) + 1
        walk = getattr(self, "_market", None)
        if walk is None:
            self._market_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, 0x6D6B74])))
            walk = np.array([self._market_rng.normal(0.0, cfg.market_drift_std)])
        if need > len(walk):
            a = math.exp(-_MARKET_STEP_MS / 1000 / cfg.market_drift_tau_s)
            e = self._market_rng.standard_normal(need - len(walk)) * cfg.market_drift_std * math.sqrt(1 - a * a)
            ext = np.empty(len(e))
            prev = walk[-1]
            for i, x in enumerate(e):  # one step per simulated minute: ~1.4k a day
                prev = a * prev + x
                ext[i] = prev
            walk = np.concatenate([walk, ext])
        self._market = walk
        return walk[k]

    def _drift(self, users: np.ndarray, now_ms: int) -> None:
        cfg = self.cfg
        if not cfg.drift or cfg.drift_strength == 0:
            return
        dt = (now_ms - self._u_ts[users]) / _MS_PER_DAY
        a = np.exp(-cfg.drift_strength * dt)[:, None]
        s = np.sqrt(1 - a * a)
        e = self._r_drift.standard_normal((2, len(users), cfg.interest_dims))
        self.u[users] = a * self.u[users] + s * e[0]
        self.v[users] = a * self.v[users] + s * e[1]
        self._u_ts[users] = now_ms

    def _grow_ads(self, until_ms: int) -> None:
        if not self._ad_churn:
            return
        mean_gap = _MS_PER_HOUR / self.cfg.new_ads_per_hour
        times = []
        while self._next_ad_ms <= until_ms:
            k = int((until_ms - self._next_ad_ms) / mean_gap) + 8
            t = self._next_ad_ms + np.concatenate([[0.0], np.cumsum(self._r_ads_new.exponential(mean_gap, k))])
            if t[-1] <= until_ms:  # all inside: keep t[-1] as the next creation time and go on
                times.append(t[:-1])
                self._next_ad_ms = float(t[-1])
            else:
                inside = t <= until_ms
                times.append(t[inside])
                self._next_ad_ms = float(t[~inside][0])
        if times:
            created = np.ceil(np.concatenate(times)).astype(np.int64)
            if len(created):
                self._new_ads(self._r_ads_new, created)

    def _pick_ads(self, ts: np.ndarray) -> np.ndarray:
        """Uniform draw among the ads live at each ts (rejection within the block's candidates).

        Only with a pool of a handful of ads can none be live at some ts; after 64 rounds
        such an event keeps a non-live ad rather than loop forever.
        """
        a, n = self.ads, self.ads.n
        t0, t1 = int(ts[0]), int(ts[-1])
        cand = np.flatnonzero((a.created[:n] <= t1) & (a.retire[:n] > t0))
        if len(cand) == 0:  # cannot happen with churn keeping the pool near n_ads; be safe
            cand = np.array([n - 1])
        r = self._r_adpick
        pick = cand[r.integers(0, len(cand), len(ts))]
        for _ in range(64):
            bad = np.flatnonzero((a.created[pick] > ts) | (a.retire[pick] <= ts))
            if len(bad) == 0:
                break
            pick[bad] = cand[r.integers(0, len(cand), len(bad))]
        return pick

    def _block(self) -> tuple[_Cols, int]:
        """Generate one block of activations and their clicks / conversions. Returns (events, last activation ts)."""
        cfg = self.cfg
        B = _BLOCK
        # --- when and who
        gaps = self._r_time.exponential(1000.0 / cfg.events_per_second, B)
        t = self._t_ms + np.cumsum(gaps)
        self._t_ms = float(t[-1])
        ts = cfg.start_ts_ms + np.floor(t).astype(np.int64)
        users = np.searchsorted(self._user_cdf, self._r_who.random(B), side="right")
        np.minimum(users, cfg.n_users - 1, out=users)

        order = np.argsort(users, kind="stable")
        us = users[order]
        pos = np.arange(B)
        start = np.empty(B, bool)
        start[0] = True
        np.not_equal(us[1:], us[:-1], out=start[1:])
        gstart = np.maximum.accumulate(np.where(start, pos, 0))
        uniq = us[start]
        sizes = np.diff(np.append(np.flatnonzero(start), B))
        if cfg.interest_shift_at_s and self.shifted_at_ms is None \
                and ts[0] >= cfg.start_ts_ms + cfg.interest_shift_at_s * 1000:
            self._shift_interests()
            self.shifted_at_ms = int(ts[0])
        self._drift(uniq, int(ts[0]))
        self._grow_ads(int(ts[-1]))
        uidx_sorted = self.user_count[us] + (pos - gstart)
        uidx = np.empty(B, np.int64)
        uidx[order] = uidx_sorted
        self.user_count[uniq] += sizes

        # --- which surface, ad or organic
        rw = self._r_what.random((2, B))
        surf = (rw[0][:, None] > self._surf_cum[users]).sum(axis=1)
        np.minimum(surf, len(cfg.surfaces) - 1, out=surf)
        is_ad = rw[1] < self.surf_ad_share[surf]
        org = np.flatnonzero(~is_ad)
        adi = np.flatnonzero(is_ad)

        kind = np.full(B, KIND_INDEX["impression"], np.int64)
        item = np.empty(B, np.int64)
        cat = np.empty(B, np.int64)

        # --- organic: interest-driven category, popular-first item, affinity-driven kind
        ro = self._r_org.random((3, B))
        U = self.u[users[org]]
        lg = cfg.organic_focus * (U @ self.cat_vec.T) + self.cat_logpop
        lg = np.where(self.cat_has_items, lg, -np.inf)
        w = np.exp(lg - lg.max(axis=1, keepdims=True))
        oc = _inverse_cdf(w, ro[0][org])
        j = np.minimum((self.cat_count[oc] * ro[1][org] ** 3).astype(np.int64), self.cat_count[oc] - 1)
        oi = self.items_by_cat[self.cat_offset[oc] + j]
        aff = np.einsum("ij,ij->i", U, self.item_vec[oi])
        kl = self.surf_kind_logits[surf[org]].copy()
        kl[:, 1:] += cfg.engagement_scale * aff[:, None]
        ok = _inverse_cdf(np.exp(kl - kl.max(axis=1, keepdims=True)), ro[2][org])
        kind[org] = ORGANIC_KIND_CODES[ok]
        item[org] = oi
        cat[org] = oc

        # --- long-range intent: plants (follows) and the state each impression sees
        if cfg.long_range and cfg.long_range_cause == "conversion":
            # plants come from conversions (end of the block): this block reads the stored state
            icat, ipos = self.intent_cat[users], self.intent_n[users]
        elif cfg.long_range:
            plant = np.zeros(B, bool)
            plant[org] = (ok == 4) & (self._r_plant.random(len(org)) < cfg.long_range_plant_prob)
            ps = plant[order]
            lp = np.maximum.accumulate(np.where(ps, pos, -1))
            inblock = lp >= gstart
            lpc = np.maximum(lp, 0)
            cat_sorted = cat[order]  # valid at plant positions (organic)
            icat_s = np.where(inblock, cat_sorted[lpc], self.intent_cat[us])
            in_s = np.where(inblock, uidx_sorted[lpc], self.intent_n[us])
            icat = np.empty(B, np.int64)
            icat[order] = icat_s
            ipos = np.empty(B, np.int64)
            ipos[order] = in_s
            # persist each user's last plant of the block
            pp = np.flatnonzero(ps)
            if len(pp):
                last = np.append(us[pp][1:] != us[pp][:-1], True)
                pl = pp[last]
                self.intent_cat[us[pl]] = cat_sorted[pl]
                self.intent_n[us[pl]] = uidx_sorted[pl]

        # --- ads: pick a live ad, compute the true probabilities
        pick = self._pick_ads(ts[adi]) if len(adi) else np.empty(0, np.int64)
        ua = users[adi]
        sa = surf[adi]
        a = self.ads
        acat, afmt, aadv = a.cat[pick], a.fmt[pick], a.adv[pick]
        rho = cfg.cross_domain_strength if cfg.cross_domain else 0.0
        Ua = rho * self.u[ua] + math.sqrt(max(0.0, 1 - rho * rho)) * self.v[ua]
        aaff = np.einsum("ij,ij->i", Ua, a.vec[pick])
        hour = (ts[adi] // _MS_PER_HOUR + self.user_tz[ua]) % 24
        age, dev, ctry = self.user_age[ua], self.user_device[ua], self.user_country[ua]
        zc = (
            self.surf_ctr[sa] + self.surf_fmt[sa, afmt] + HOUR_EFFECT[hour] + AGE_EFFECT[age]
            + DEVICE_EFFECT[dev] + self.cat_effect[acat] + a.bias[pick] + cfg.affinity_scale * aaff
        )
        surf_aff = None
        if cfg.surface_affinity_spread:
            surf_aff = cfg.affinity_scale * cfg.surface_affinity_spread * self.surf_aff[sa] * aaff
            zc = zc + surf_aff
        if cfg.market_drift_std:
            zc = zc + self.market_offset(ts[adi])
        zv = self.surf_cvr[sa] + self.adv_cvr[aadv] + cfg.cvr_affinity_scale * aaff
        if cfg.interactions:
            s = cfg.interactions_strength
            zc = zc + s * (AGE_SIGN[age] * FORMAT_SIGN[afmt] * HOUR_SIGN[hour] + DEVICE_SIGN[dev] * self.cat_sign[acat])
            zv = zv + s * COUNTRY_SIGN[ctry] * self.cat_sign2[acat]
        lr_gap = None
        if cfg.long_range:
            # activations since the planting follow, where the ad is in the user's intent category
            lr_gap = np.where(icat[adi] == acat, uidx[adi] - ipos[adi], -1)
            active = lr_gap >= cfg.long_range_min_gap
            zv = zv + cfg.long_range_strength * active
            if cfg.long_range_click_strength:
                zc = zc + cfg.long_range_click_strength * active
        p_click = _expit(zc)
        p_cvr = _expit(zv)
        item[adi] = AD_ID_BASE + pick
        cat[adi] = acat

        # --- outcomes (uniforms for every activation: common random numbers)
        rr = self._r_out.random((2, B))
        rz = self._r_out.standard_normal((2, B))
        clicked = rr[0][adi] < p_click
        converted = clicked & (rr[1][adi] < p_cvr)
        if cfg.long_range and cfg.long_range_cause == "conversion":
            # A conversion plants at its impression's activation index (the conversion event itself
            # arrives minutes to hours later, well inside the min gap); the block's activations run
            # in time order, so the last planting row of a user wins. Later blocks see it.
            cv = np.flatnonzero(converted)
            cv = cv[self._r_plant.random(len(cv)) < cfg.long_range_plant_prob]
            self.intent_cat[ua[cv]] = acat[cv]
            self.intent_n[ua[cv]] = uidx[adi][cv]

        c0 = self._counter
        counter = c0 + np.arange(B, dtype=np.int64)
        if self.trace is not None:
            zero = np.zeros(len(adi))
            s_int = cfg.interactions_strength if cfg.interactions else 0.0
            self.trace.append({
                "req": counter[adi], "user": users[adi], "ts": ts[adi], "surface": sa, "p_click": p_click,
                "p_cvr": p_cvr, "z_click": zc, "z_cvr": zv,
                "click_interactions": (s_int * (AGE_SIGN[age] * FORMAT_SIGN[afmt] * HOUR_SIGN[hour]
                                                + DEVICE_SIGN[dev] * self.cat_sign[acat])) if s_int else zero,
                "cvr_interactions": (s_int * COUNTRY_SIGN[ctry] * self.cat_sign2[acat]) if s_int else zero,
                "cvr_long_range": (cfg.long_range_strength * active) if cfg.long_range else zero,
                "click_long_range": (cfg.long_range_click_strength * active) if cfg.long_range else zero,
                "click_surface_affinity": surf_aff if surf_aff is not None else zero,
                "long_range_gap": lr_gap if lr_gap is not None else np.full(len(adi), -1, np.int64),
            })
        fmt = np.full(B, -1, np.int64)
        adv = np.full(B, -1, np.int64)
        req = np.full(B, -1, np.int64)
        pc = np.full(B, np.nan)
        pv = np.full(B, np.nan)
        fmt[adi], adv[adi], req[adi] = afmt, aadv, counter[adi]
        pc[adi], pv[adi] = p_click, p_click * p_cvr
        acts = _Cols(counter=counter, user=users, ts=ts, surface=surf, kind=kind, item=item, req=req,
                     fmt=fmt, adv=adv, cat=cat, pc=pc, pv=pv)

        ci = adi[clicked]  # activation rows that were clicked
        nc = len(ci)
        cdelay = np.minimum(cfg.click_delay_median_s * np.exp(rz[0][ci]), cfg.max_click_delay_s)
        cts = ts[ci] + (cdelay * 1000).astype(np.int64)
        vi_mask = converted[clicked]
        vi = ci[vi_mask]
        nv = len(vi)
        if cfg.delayed_conversions:
            vdelay = np.minimum(
                cfg.delayed_conversions_strength * 60.0 * np.exp(cfg.conversion_delay_sigma * rz[1][vi]),
                cfg.max_conversion_delay_s,
            )
            vts = cts[vi_mask] + (vdelay * 1000).astype(np.int64)
        else:
            vts = cts[vi_mask]
        nan_c, nan_v = np.full(nc, np.nan), np.full(nv, np.nan)
        clicks = _Cols(counter=c0 + B + np.arange(nc, dtype=np.int64), user=users[ci], ts=cts, surface=surf[ci],
                       kind=np.full(nc, KIND_INDEX["click"], np.int64), item=item[ci], req=counter[ci],
                       fmt=fmt[ci], adv=adv[ci], cat=cat[ci], pc=nan_c, pv=nan_c)
        convs = _Cols(counter=c0 + B + nc + np.arange(nv, dtype=np.int64), user=users[vi], ts=vts, surface=surf[vi],
                      kind=np.full(nv, KIND_INDEX["conversion"], np.int64), item=item[vi], req=counter[vi],
                      fmt=fmt[vi], adv=adv[vi], cat=cat[vi], pc=nan_v, pv=nan_v)
        self._counter = c0 + B + nc + nv
        return _Cols.concat([acts, clicks, convs]), int(ts[-1])

    def _emitted(self) -> Iterator[_Cols]:
        """Infinite stream of columnar event chunks, globally ordered by (ts, counter)."""
        self._init_world()  # every stream starts from the same world
        while True:
            new, t_last = self._block()
            parts = [new] if self._pending is None else [self._pending, new]
            allc = _Cols.concat(parts)
            ready = allc.ts <= t_last
            out = allc.take(ready)
            self._pending = allc.take(~ready)
            out = out.take(np.lexsort((out.counter, out.ts)))
            yield out

    def _chunks(self, n_events: int | None, batch_size: int) -> Iterator[_Cols]:
        """Chunks of exactly ``batch_size`` events (the last may be shorter), ``n_events`` in all."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if n_events is not None and n_events < 0:
            raise ValueError("n_events must be >= 0")
        left = math.inf if n_events is None else n_events
        buf: list[_Cols] = []
        have = 0
        src = self._emitted()
        while left > 0:
            while have < min(batch_size, left):
                c = next(src)
                buf.append(c)
                have += len(c)
            allc = _Cols.concat(buf)
            take = int(min(batch_size, left))
            yield allc.take(slice(0, take))
            rest = allc.take(slice(take, None))
            buf, have = ([rest], len(rest)) if len(rest) else ([], 0)
            left -= take

    # ------------------------------------------------------------------ public
    def batches(self, n_events: int | None = None, batch_size: int = 4096) -> Iterator[list[Event]]:
        """Lists of up to ``batch_size`` events, ``n_events`` in all (infinite if None)."""
        for c in self._chunks(n_events, batch_size):
            yield self._to_events(c)

    def events(self, n_events: int | None = None) -> Iterator[Event]:
        """The event stream, one at a time (infinite if ``n_events`` is None)."""
        for b in self.batches(n_events):
            yield from b

    def record_batches(self, n_events: int | None = None, batch_size: int = 65536, schema: Any = None) -> Iterator[Any]:
        """The same stream as ``pyarrow.RecordBatch`` es, built column-wise (no Python object per event).

        ``schema``: default :data:`opengem.stream.codec.EVENT_SCHEMA` (the wire format of
        columnar Kafka records); string columns may be plain or dictionary-encoded.
        """
        if schema is None:
            from opengem.stream.codec import EVENT_SCHEMA as schema
        for c in self._chunks(n_events, batch_size):
            yield self._to_arrow(c, schema)

    def to_parquet(self, path: str | Path, n_events: int) -> int:
        """Write the first ``n_events`` events (columns = Event fields, codec.EVENT_SCHEMA) to Parquet; returns rows."""
        import pyarrow.parquet as pq

        from opengem.stream.codec import EVENT_SCHEMA

        rows = 0
        with pq.ParquetWriter(str(path), EVENT_SCHEMA) as w:
            for rb in self.record_batches(n_events, schema=EVENT_SCHEMA):
                w.write_batch(rb)
                rows += rb.num_rows
        return rows

    # ------------------------------------------------------------------ conversion
    def _to_events(self, c: _Cols) -> list[Event]:
        seed = self.cfg.seed
        n = len(c)
        if n == 0:
            return []
        user = c.user
        ids = list(map(f"{seed}-".__add__, map(str, c.counter.tolist())))
        rp = f"{seed}-r"
        req = [None if r < 0 else rp + str(r) for r in c.req.tolist()]
        surf = np.array(self.cfg.surfaces, dtype=object)[c.surface].tolist()
        kind = np.array(KINDS, dtype=object)[c.kind].tolist()
        is_ad = (c.kind < len(AD_KINDS)).tolist()
        age = self.user_age[user].tolist()
        country = _COUNTRY_OBJ[self.user_country[user]].tolist()
        device = _DEVICE_OBJ[self.user_device[user]].tolist()
        fmt = _FORMAT_OBJ[c.fmt].tolist()  # -1 -> None (last entry)
        adv = _opt_int(c.adv)
        hour = ((c.ts // _MS_PER_HOUR + self.user_tz[user]) % 24).tolist()
        pc = _opt_float(c.pc)
        pv = _opt_float(c.pv)
        return list(map(Event, ids, user.tolist(), c.ts.tolist(), surf, kind, c.item.tolist(), is_ad, req,
                        age, country, device, fmt, adv, c.cat.tolist(), hour, pc, pv))

    def _to_arrow(self, c: _Cols, schema: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        seed = self.cfg.seed
        user = c.user
        ids = pc.binary_join_element_wise(f"{seed}-", pc.cast(pa.array(c.counter), pa.string()), "")
        req = pc.binary_join_element_wise(f"{seed}-r", pc.cast(pa.array(c.req, mask=c.req < 0), pa.string()), "")

        def enum(name: str, values: tuple[str, ...], codes: np.ndarray) -> Any:
            t = schema.field(name).type
            mask = codes < 0
            if pa.types.is_dictionary(t):
                return pa.DictionaryArray.from_arrays(pa.array(codes, t.index_type, mask=mask), pa.array(values, t.value_type))
            return pc.take(pa.array(values, t), pa.array(codes, mask=mask))

        def num(name: str, a: np.ndarray, mask: np.ndarray | None = None) -> Any:
            return pa.array(a, schema.field(name).type, mask=mask)

        cols = {
            "event_id": ids,
            "user_id": num("user_id", user),
            "ts": num("ts", c.ts),
            "surface": enum("surface", self.cfg.surfaces, c.surface),
            "kind": enum("kind", KINDS, c.kind),
            "item_id": num("item_id", c.item),
            "is_ad": num("is_ad", c.kind < len(AD_KINDS)),
            "request_id": req,
            "age_bucket": num("age_bucket", self.user_age[user]),
            "country": enum("country", COUNTRIES, self.user_country[user]),
            "device": enum("device", DEVICES, self.user_device[user]),
            "ad_format": enum("ad_format", AD_FORMATS, c.fmt),
            "advertiser_id": num("advertiser_id", c.adv, c.adv < 0),
            "category": num("category", c.cat),
            "hour": num("hour", (c.ts // _MS_PER_HOUR + self.user_tz[user]) % 24),
            "p_click": num("p_click", c.pc, np.isnan(c.pc)),
            "p_conversion": num("p_conversion", c.pv, np.isnan(c.pv)),
        }
        return pa.RecordBatch.from_arrays([cols[f] for f in schema.names], schema=schema)


_COUNTRY_OBJ = np.array(COUNTRIES, dtype=object)
_DEVICE_OBJ = np.array(DEVICES, dtype=object)
_FORMAT_OBJ = np.array(AD_FORMATS + (None,), dtype=object)


def _opt_int(a: np.ndarray) -> list:
    o = a.astype(object)
    o[a < 0] = None
    return o.tolist()


def _opt_float(a: np.ndarray) -> list:
    o = a.astype(object)
    o[np.isnan(a)] = None
    return o.tolist()
