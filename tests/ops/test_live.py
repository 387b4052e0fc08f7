"""The monitor's windows: funnel rates, per-version quality figures, deterministic sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opengem.model.metrics import summarize
from opengem.ops.live import FunnelWindow, QualityWindows, sampled
from opengem.stream.joiner import Example


def _ex(rid: str) -> Example:
    return Example(request_id=rid, ts=1, surface="feed", user_id=1, item_id=2, advertiser_id=None, ad_format=None,
                   category=None, age_bucket=None, country=None, device=None, hour=None, click=0, conversion=0,
                   click_ts=None, conversion_ts=None)


def test_funnel_window_keeps_the_last_n_per_surface():
    w = FunnelWindow(window=4)
    for c, v in [(1, 1), (0, 0), (0, 0), (0, 0), (1, 0), (1, 0)]:  # the first two fall out
        w.add("feed", c, v)
    w.add("reels", 0, 0)
    rates = w.rates()
    assert rates["feed"][0] == pytest.approx(2 / 4)
    assert rates["feed"][1] == 0.0  # 2 clicks in the window, no conversion among them
    assert rates["reels"][0] == 0.0 and math.isnan(rates["reels"][1])  # no clicks: CVR undefined


def test_quality_windows_export_one_version_and_switch_once_the_new_one_has_enough():
    rng = np.random.default_rng(0)
    q = QualityWindows(window=1000, min_examples=50)
    surfaces, tasks = ("feed", "reels"), ("click", "conversion")

    def add(version: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = rng.random((n, 2))
        y = (rng.random((n, 2)) < p).astype(float)
        s = rng.integers(0, 2, n)
        q.add(version, surfaces, tasks, p, y, s)
        return p, y, s

    p, y, s = add("v1", 200)
    assert q.pick("v1") == "v1"
    got = q.summary("v1")[("reels", "click")]
    want = summarize(p[s == 1, 0], y[s == 1, 0])
    assert got["ne"] == pytest.approx(want["ne"]) and got["n"] == want["n"]
    add("v2", 10)  # the server swapped; too few examples of v2 yet
    assert q.pick("v2") == "v1"
    add("v2", 60)
    assert q.pick("v2") == "v2"
    assert q.summary("v1") == {}  # forgotten once v2 took over


def test_sampling_is_deterministic_and_close_to_the_fraction():
    exs = [_ex(f"r{i}") for i in range(20_000)]
    picked = [sampled(e, 0.25) for e in exs]
    assert picked == [sampled(e, 0.25) for e in exs]
    assert abs(sum(picked) / len(exs) - 0.25) < 0.02
    assert all(sampled(e, 1.0) for e in exs[:100])


def test_monitor_config_rejects_bad_values():
    from opengem.ops.config import MonitorConfig

    with pytest.raises(ValueError, match="score_fraction"):
        MonitorConfig(score_fraction=0)
    with pytest.raises(ValueError, match="start"):
        MonitorConfig(start="middle")
