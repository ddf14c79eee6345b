"""Fixtures for the batcher tests."""

from __future__ import annotations

import pytest

from tests.batching.fakes import ManualClock, Runner


@pytest.fixture
def runner() -> Runner:
    return Runner()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
