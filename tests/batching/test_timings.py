"""Where a batcher's time goes: starved (nothing to run), answering, and each batch's build and launch.

These feed the GPU benchmark's host profile (benchmarks/gpu_resnet50.py); the tests check what is
counted where, with waits long enough that the counted side is never in doubt.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.batching import Batcher, BatchPolicy
from tests.batching.test_batcher import FAR, WAIT, expected, rows

IDLE_S = 0.3


@pytest.fixture(params=["serial", "pipelined", "depth2"])
def batcher(runner, request):
    policy = BatchPolicy(max_batch_size=4)
    if request.param == "serial":
        made = Batcher(runner, policy)
    else:
        made = Batcher(runner, policy, launch=runner.launch, depth=2 if request.param == "depth2" else 1)
    yield made
    made.close(drain=False)


def test_an_idle_batcher_counts_its_wait_as_starved(batcher):
    before = batcher.timings()["starved_s"]
    time.sleep(IDLE_S)
    # the worker is waiting still: what it waited so far counts already
    assert batcher.timings()["starved_s"] - before >= IDLE_S * 0.9
    future = batcher.submit(rows(1), FAR)
    assert np.array_equal(future.result(WAIT)["y"], expected(rows(1)))
    assert batcher.timings()["starved_s"] - before >= IDLE_S * 0.9


def test_a_batch_on_the_runner_is_not_starved_time(batcher, runner):
    future = batcher.submit(rows(1), FAR)  # the worker is awake and counted what it waited
    future.result(WAIT)
    runner.hold()
    held = batcher.submit(rows(2, start=1), FAR)
    assert runner.started.wait(WAIT)
    before = batcher.timings()["starved_s"]
    time.sleep(IDLE_S)  # the worker waits on the batch, not for requests
    during = batcher.timings()["starved_s"] - before
    runner.release()
    assert np.array_equal(held.result(WAIT)["y"], expected(rows(2, start=1)))
    assert during == 0.0


def test_answering_a_batch_is_counted(batcher, runner):
    slow = []

    def late(_future):
        time.sleep(0.05)  # a reply that takes a while to send
        slow.append(True)

    runner.hold()  # the callback is in place before the batch can be answered
    future = batcher.submit(rows(1), FAR)
    future.add_done_callback(late)
    assert runner.started.wait(WAIT)
    runner.release()
    future.result(WAIT)
    deadline = time.monotonic() + WAIT
    while not slow and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.timings()["answer_s"] >= 0.04


@pytest.mark.parametrize("pipelined", [False, True])
def test_batch_stats_give_the_build_and_the_launch_of_each_batch(runner, pipelined):
    seen = []

    def slow_launch(inputs):
        time.sleep(0.05)
        return runner.launch(inputs)

    batcher = Batcher(
        runner, BatchPolicy(max_batch_size=4), launch=slow_launch if pipelined else None, observe=seen.append
    )
    try:
        batcher.submit(rows(3), FAR).result(WAIT)
    finally:
        batcher.close()
    (stats,) = seen
    assert stats.build_time >= 0.0
    if pipelined:
        assert 0.045 <= stats.launch_time <= stats.compute_time
    else:
        assert stats.launch_time == 0.0


def test_several_idle_workers_count_the_wall_time_once(runner):
    batcher = Batcher(runner, BatchPolicy(max_batch_size=4, concurrent_batches=3))
    started = time.perf_counter()
    try:
        time.sleep(IDLE_S)
    finally:
        batcher.close()  # every worker's wait ends and is counted
    wall = time.perf_counter() - started
    waited = batcher.timings()["starved_s"]
    assert IDLE_S * 0.9 <= waited <= wall + 0.05  # not three times the wait
