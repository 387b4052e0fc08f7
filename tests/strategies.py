"""Hypothesis strategies shared by the tests (importable thanks to pytest's `pythonpath`)."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from opengem.stream.events import (
    AD_FORMATS,
    AD_KINDS,
    DEFAULT_MAX_FUTURE_MS,
    DEFAULT_SURFACES,
    DEVICES,
    KINDS,
    MAX_ID,
    MIN_TS_MS,
    Event,
)

NOW = 1_700_000_000_000  # the validator's clock in the tests that use these strategies


printable_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64)
ids = st.integers(0, MAX_ID)


def opt(s):
    return st.none() | s


@st.composite
def events(draw, surfaces=DEFAULT_SURFACES) -> Event:
    """Any valid event (as seen by a validator whose clock is NOW)."""
    kind = draw(st.sampled_from(KINDS))
    ad = kind in AD_KINDS
    prob = st.floats(0.0, 1.0, allow_nan=False)
    return Event(
        event_id=draw(printable_ascii),
        user_id=draw(ids),
        ts=draw(st.integers(MIN_TS_MS, NOW + DEFAULT_MAX_FUTURE_MS)),
        surface=draw(st.sampled_from(surfaces)),
        kind=kind,
        item_id=draw(ids),
        is_ad=ad,
        request_id=draw(printable_ascii) if ad else None,
        age_bucket=draw(opt(st.integers(0, 7))),
        country=draw(opt(st.text(alphabet=string.ascii_uppercase, min_size=2, max_size=2))),
        device=draw(opt(st.sampled_from(DEVICES))),
        ad_format=draw(opt(st.sampled_from(AD_FORMATS))) if ad else None,
        advertiser_id=draw(opt(ids)) if ad else None,
        category=draw(opt(st.integers(0, 2**31 - 1))),
        hour=draw(opt(st.integers(0, 23))),
        p_click=draw(opt(prob)) if kind == "impression" else None,
        p_conversion=draw(opt(prob)) if kind == "impression" else None,
    )
