"""Shared fixtures. Integration tests start the real embedded broker themselves."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def broker():
    """One embedded Tansu broker for the test session (127.0.0.1, free port)."""
    from opengem.stream.broker import EmbeddedBroker

    b = EmbeddedBroker(port=0).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def topic_name():
    """A unique topic name, so tests sharing the broker never see each other's records."""
    return f"test.{uuid.uuid4().hex[:12]}"
