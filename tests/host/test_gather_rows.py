"""What a model's description offers the frontends to gather into one call (serving.http.gather)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.batching import BatchPolicy
from serving.host.registry import Model


class _Batcher:
    def __init__(self, policy):
        self.policy = policy


class _Handler:
    def __init__(self, raw=False):
        self.raw = raw
        self.signature = None


@pytest.mark.parametrize(
    "policy, raw, rows",
    [
        (BatchPolicy(max_batch_size=64), False, 64),  # a batching model: up to a batch of rows
        (BatchPolicy(max_batch_size=1), False, 0),  # one row a batch: nothing to gain
        (BatchPolicy(max_batch_size=1, splittable=False), False, 0),  # no batch dimension
        (BatchPolicy(max_batch_size=8), True, 0),  # a user script takes raw bodies
        (None, False, 0),  # not loaded
    ],
)
def test_only_a_model_that_batches_rows_takes_gathered_calls(policy, raw, rows):
    batcher = _Batcher(policy) if policy is not None else None
    model = Model("m", Path("/"), handler=_Handler(raw), batcher=batcher)
    assert model.gather_rows() == rows
