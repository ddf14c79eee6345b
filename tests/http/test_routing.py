"""How long a frontend worker uses a model's description (serving.http.routing)."""

from __future__ import annotations

import pytest

from serving.http import routing
from serving.http.routing import DESCRIBE_STALE_S, DESCRIBE_TTL_S, HostRouter


@pytest.mark.parametrize(
    ("age", "usable", "stale"),
    [
        (0.0, True, False),
        (DESCRIBE_TTL_S - 0.01, True, False),
        (DESCRIBE_TTL_S, True, True),  # used, and fetched again meanwhile
        (DESCRIBE_STALE_S - 0.01, True, True),
        (DESCRIBE_STALE_S, False, False),  # too old to use: the request goes the slow way
    ],
)
def test_a_description_is_used_fresh_then_stale_while_refreshed_then_not_at_all(
    monkeypatch, age, usable, stale
):
    router = HostRouter([])
    info = {"raw": False}
    router._described["m"] = (100.0, info)
    monkeypatch.setattr(routing.time, "monotonic", lambda: 100.0 + age)
    assert router.usable("m") == ((info if usable else None), stale)
    fetched = {"raw": True}
    router.pick = lambda exclude=None: _Describing(fetched)
    assert (router.describe("m", 0.0) is info) is (age < DESCRIBE_TTL_S)  # else fetched again


class _Describing:
    """A host client that answers ``describe`` with ``info``."""

    def __init__(self, info):
        self.info = info

    def describe(self, model, deadline):
        return self.info


def test_no_description_yet_is_not_usable():
    assert HostRouter([]).usable("m") == (None, False)
