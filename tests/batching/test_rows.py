"""Batches handed over unjoined (Rows): what they hold, and a batcher that hands them over."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.batching import Batcher, BatchPolicy
from serving.batching.shaping import concatenate, gather
from serving.types import Rows
from tests.batching.fakes import transform


def part(seed: int, rows: int, shape=(2, 3), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, *shape)).astype(dtype)


def test_rows_join_like_concatenate_padding_with_the_last_row():
    parts = [part(0, 2), part(1, 1), part(2, 3)]
    rows = Rows(parts, 8)
    assert rows.shape == (8, 2, 3) and rows.ndim == 3 and len(rows) == 8 and rows.rows == 6
    assert rows.dtype == np.float32
    joined = np.asarray(rows)
    np.testing.assert_array_equal(joined[:6], np.concatenate(parts))
    np.testing.assert_array_equal(joined[6:], np.repeat(parts[-1][-1:], 2, axis=0))
    np.testing.assert_array_equal(joined, concatenate([{"x": p} for p in parts], 8)["x"])


def test_rows_join_into_a_given_array_and_convert_only_when_asked():
    parts = [part(0, 1, dtype=np.uint8), part(1, 2, dtype=np.uint8)]
    rows = Rows(parts)
    out = np.full((3, 2, 3), 7, np.uint8)
    assert rows.join(out) is out
    np.testing.assert_array_equal(out, np.concatenate(parts))
    assert rows.astype("uint8", copy=False) is rows  # nothing to convert: still unjoined
    converted = rows.astype(np.float32, copy=False)
    assert isinstance(converted, np.ndarray) and converted.dtype == np.float32
    np.testing.assert_array_equal(converted, np.concatenate(parts).astype(np.float32))
    assert np.asarray(rows, dtype=np.int64).dtype == np.int64


def test_rows_refuse_no_parts_and_padding_below_their_rows():
    with pytest.raises(ValueError):
        Rows([])
    with pytest.raises(ValueError, match="cannot pad 3 rows down to 2"):
        Rows([part(0, 3)], 2)


def test_gather_gives_rows_per_input_that_join_to_what_concatenate_builds():
    pieces = [{"x": part(s, s + 1), "m": part(s + 9, s + 1, (4,))} for s in range(3)]
    gathered = gather(pieces, 8)
    joined = concatenate(pieces, 8)
    assert set(gathered) == {"x", "m"}
    for name in joined:
        assert isinstance(gathered[name], Rows) and gathered[name].shape == joined[name].shape
        np.testing.assert_array_equal(np.asarray(gathered[name]), joined[name])


class RowsRunner:
    """A fake runner that takes Rows: records what it was given, computes on the joined rows."""

    def __init__(self):
        self.given: list = []

    def __call__(self, inputs):
        self.given.append(inputs["x"])
        return {"y": transform(np.asarray(inputs["x"]))}


def test_a_gathering_batcher_hands_the_runner_rows_and_each_request_gets_its_own_answer():
    runner = RowsRunner()
    policy = BatchPolicy(max_batch_size=8, max_delay_ms=50, batch_sizes=(4, 8))
    allocated = []
    batcher = Batcher(runner, policy, gather=True, allocate=lambda *a: allocated.append(a), copy_threads=4)
    try:
        assert batcher.gathers and batcher.copy_threads == 1  # nothing is joined by the batcher
        inputs = [part(seed, 1 + seed % 2) for seed in range(5)]  # 7 rows, padded to 8
        futures = [batcher.submit({"x": x}, time.time() + 10) for x in inputs]
        for x, future in zip(inputs, futures, strict=True):
            np.testing.assert_array_equal(future.result(10)["y"], transform(x))
    finally:
        batcher.close()
    rows = [given for given in runner.given if isinstance(given, Rows)]
    assert rows, f"the runner was given {[type(g).__name__ for g in runner.given]}"
    assert all(len(r) in (4, 8) for r in rows)  # padded to an allowed size
    # the parts are the requests' own arrays (views), not copies joined by the batcher
    assert any(np.shares_memory(p, x) for r in rows for p in r.parts for x in inputs)
    assert allocated == []


def test_without_gather_the_runner_gets_joined_arrays():
    runner = RowsRunner()
    batcher = Batcher(runner, BatchPolicy(max_batch_size=8, max_delay_ms=50))
    try:
        assert not batcher.gathers
        futures = [batcher.submit({"x": part(s, 1)}, time.time() + 10) for s in range(3)]
        for future in futures:
            future.result(10)
    finally:
        batcher.close()
    assert all(isinstance(given, np.ndarray) for given in runner.given)
