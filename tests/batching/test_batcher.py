"""The Batcher against a fake numpy runner: batch formation, splitting, padding, deadlines, errors.

Batch formation is made deterministic by holding the runner on its first batch while the
next requests queue up (``Runner.hold``); no assertion depends on wall-clock time.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import Batcher, BatchPolicy, BatchStats
from serving.batching.ahead import DeviceTimes
from serving.batching.records import Flight
from serving.errors import (
    BadRequest,
    DeadlineExceeded,
    ModelError,
    NotReady,
    PayloadTooLarge,
    QueueFull,
)
from tests.batching.fakes import lazy_launch, transform

FAR = 1e12  # a deadline that never passes
WAIT = 10  # seconds to wait for a future before calling the test hung


def rows(count: int, start: int = 0, width: int = 3, dtype=np.float64) -> dict[str, np.ndarray]:
    """``count`` distinct rows, so any mix-up between requests shows in the values."""
    return {"x": (np.arange(count * width).reshape(count, width) + start * 1000).astype(dtype)}


def expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return transform(inputs["x"])


@pytest.fixture(params=["serial", "pipelined"])
def make(runner, request):
    """Batchers of both kinds: every test below runs with a plain ``run`` and with ``launch``."""
    made: list[Batcher] = []

    def build(policy: BatchPolicy, run=None, **kwargs) -> Batcher:
        if request.param == "pipelined":
            kwargs["launch"] = runner.launch if run is None else lazy_launch(run)
        batcher = Batcher(run or runner, policy, **kwargs)
        made.append(batcher)
        return batcher

    yield build
    for batcher in made:
        batcher.close(drain=False)


def hold_first_batch(batcher: Batcher, runner, inputs=None):
    """Submit one request and return its future once the runner is stuck on it."""
    runner.hold()
    future = batcher.submit(inputs or rows(1, start=99), FAR)
    assert runner.started.wait(WAIT)
    return future


def test_a_lone_request_runs_at_once_as_a_batch_of_one_with_zero_delay(make, runner, clock):
    # The clock never moves: a batcher that waited for company would never dispatch.
    batcher = make(BatchPolicy(max_batch_size=8), clock=clock)
    inputs = rows(1)
    assert np.array_equal(batcher.submit(inputs, FAR).result(WAIT)["y"], expected(inputs))
    assert runner.sizes == [1]


def test_a_positive_delay_holds_the_batch_until_it_is_full(make, runner):
    batcher = make(BatchPolicy(max_batch_size=3, max_delay_ms=600_000))
    futures = [batcher.submit(rows(1, start=i), FAR) for i in range(3)]
    for i, future in enumerate(futures):
        assert np.array_equal(future.result(WAIT)["y"], expected(rows(1, start=i)))
    assert runner.sizes == [3]


def test_requests_queued_while_the_runner_is_busy_coalesce_into_full_batches(make, runner):
    batcher = make(BatchPolicy(max_batch_size=4))
    first = hold_first_batch(batcher, runner)
    futures = [batcher.submit(rows(1, start=i), FAR) for i in range(10)]
    assert batcher.queue_depth() == 10
    runner.release()
    first.result(WAIT)
    for i, future in enumerate(futures):
        assert np.array_equal(future.result(WAIT)["y"], expected(rows(1, start=i)))
    assert runner.sizes == [1, 4, 4, 2]
    assert batcher.queue_depth() == 0


def test_rows_not_requests_fill_a_batch(make, runner):
    batcher = make(BatchPolicy(max_batch_size=6))
    first = hold_first_batch(batcher, runner)
    futures = [batcher.submit(rows(3, start=i), FAR) for i in range(4)]
    runner.release()
    first.result(WAIT)
    for i, future in enumerate(futures):
        assert np.array_equal(future.result(WAIT)["y"], expected(rows(3, start=i)))
    assert runner.sizes == [1, 6, 6]


def test_a_request_larger_than_the_batch_is_split_and_reassembled_in_order(make, runner):
    batcher = make(BatchPolicy(max_batch_size=4))
    inputs = rows(10)
    result = batcher.submit(inputs, FAR).result(WAIT)["y"]
    assert np.array_equal(result, expected(inputs))
    assert runner.sizes == [4, 4, 2]


def test_split_requests_share_batches_with_their_neighbours_in_queue_order(make, runner):
    batcher = make(BatchPolicy(max_batch_size=4))
    first = hold_first_batch(batcher, runner)
    a, b, c = rows(3, start=1), rows(6, start=2), rows(2, start=3)
    futures = [batcher.submit(inputs, FAR) for inputs in (a, b, c)]
    runner.release()
    first.result(WAIT)
    for inputs, future in zip((a, b, c), futures, strict=True):
        assert np.array_equal(future.result(WAIT)["y"], expected(inputs))
    assert runner.sizes == [1, 4, 4, 3]
    joined = np.concatenate([a["x"], b["x"], c["x"]])
    assert np.array_equal(np.concatenate([batch["x"] for batch in runner.batches[1:]]), joined)


def test_shape_incompatible_requests_are_never_mixed_in_one_batch(make, runner):
    batcher = make(BatchPolicy(max_batch_size=3))  # the first scan stops before the queue's end
    first = hold_first_batch(batcher, runner)
    submitted = [
        rows(1, start=1, width=3),
        rows(1, start=2, width=5),
        rows(2, start=3, width=3),
        rows(1, start=4, width=3, dtype=np.int32),
        rows(1, start=5, width=5),
    ]
    futures = [batcher.submit(inputs, FAR) for inputs in submitted]
    runner.release()
    first.result(WAIT)
    for inputs, future in zip(submitted, futures, strict=True):
        result = future.result(WAIT)["y"]
        assert result.dtype == expected(inputs).dtype
        assert np.array_equal(result, expected(inputs))
    # The head's group goes first; the others keep their order for later batches.
    shapes = [(batch["x"].shape, batch["x"].dtype) for batch in runner.batches[1:]]
    assert shapes == [((3, 3), np.float64), ((2, 5), np.float64), ((1, 3), np.int32)]
    wide = np.concatenate([submitted[1]["x"], submitted[4]["x"]])
    assert np.array_equal(runner.batches[2]["x"], wide)


def test_padding_to_static_sizes_is_reported_and_never_returned(make, runner):
    seen: list[BatchStats] = []
    batcher = make(BatchPolicy(max_batch_size=8, batch_sizes=(2, 4, 8)), observe=seen.append)
    inputs = rows(3)
    result = batcher.submit(inputs, FAR).result(WAIT)["y"]
    assert np.array_equal(result, expected(inputs))
    assert runner.sizes == [4]
    assert seen[0].rows == 3 and seen[0].padding == 1 and seen[0].requests == 1


def test_padded_batches_of_several_requests_give_each_only_its_rows(make, runner):
    seen: list[BatchStats] = []
    batcher = make(BatchPolicy(max_batch_size=8, batch_sizes=(4, 8)), observe=seen.append)
    first = hold_first_batch(batcher, runner)
    futures = [batcher.submit(rows(2, start=i), FAR) for i in range(3)]
    runner.release()
    first.result(WAIT)
    for i, future in enumerate(futures):
        assert np.array_equal(future.result(WAIT)["y"], expected(rows(2, start=i)))
    assert runner.sizes == [4, 8]
    assert [(s.rows, s.padding, s.requests) for s in seen] == [(1, 3, 1), (6, 2, 3)]


def test_a_whole_request_alone_in_a_batch_is_passed_through_uncopied(make):
    received = []

    def identity(inputs):
        received.append(inputs["x"])
        return {"y": inputs["x"]}

    batcher = make(BatchPolicy(max_batch_size=8), run=identity)
    inputs = rows(3)
    result = batcher.submit(inputs, FAR).result(WAIT)
    assert received[0] is inputs["x"]
    assert result["y"] is inputs["x"]


def test_requests_batched_together_get_copies_that_do_not_alias_each_other(make, runner):
    batcher = make(BatchPolicy(max_batch_size=8))
    first = hold_first_batch(batcher, runner)
    one, two = batcher.submit(rows(2, start=1), FAR), batcher.submit(rows(2, start=2), FAR)
    runner.release()
    first.result(WAIT)
    y1, y2 = one.result(WAIT)["y"], two.result(WAIT)["y"]
    batch_output = runner.outputs[1]["y"]
    assert not np.may_share_memory(y1, batch_output) and not np.may_share_memory(y2, batch_output)
    y1[:] = -1
    assert np.array_equal(y2, expected(rows(2, start=2)))


def test_an_expired_request_fails_with_504_and_never_reaches_the_runner(make, runner, clock):
    batcher = make(BatchPolicy(max_batch_size=8), clock=clock)
    first = hold_first_batch(batcher, runner)
    stale = batcher.submit(rows(1, start=1), clock() + 5)
    fresh = batcher.submit(rows(1, start=2), clock() + 60)
    clock.advance(10)
    runner.release()
    first.result(WAIT)
    with pytest.raises(DeadlineExceeded):
        stale.result(WAIT)
    assert np.array_equal(fresh.result(WAIT)["y"], expected(rows(1, start=2)))
    assert runner.sizes == [1, 1]
    assert np.array_equal(runner.batches[1]["x"], rows(1, start=2)["x"])


def test_a_split_request_whose_later_part_expires_fails_as_a_whole(make, clock):
    sizes = []

    def slow(inputs):  # the first part takes "20 seconds" of the manual clock
        sizes.append(len(inputs["x"]))
        clock.advance(20)
        return {"y": transform(inputs["x"])}

    batcher = make(BatchPolicy(max_batch_size=2), run=slow, clock=clock)
    future = batcher.submit(rows(5), clock() + 10)
    with pytest.raises(DeadlineExceeded):
        future.result(WAIT)
    assert sizes == [2]
    assert batcher.queue_depth() == 0


def test_a_full_queue_rejects_with_429_and_retry_after_without_blocking(make, runner):
    batcher = make(BatchPolicy(max_batch_size=2, max_queue=4))
    first = hold_first_batch(batcher, runner)
    queued = [batcher.submit(rows(2, start=i), FAR) for i in range(2)]
    with pytest.raises(QueueFull) as raised:
        batcher.submit(rows(1, start=7), FAR)
    assert raised.value.status == 429
    assert int(raised.value.headers["Retry-After"]) >= 1
    assert batcher.queue_depth() == 4
    runner.release()
    first.result(WAIT)
    for i, future in enumerate(queued):
        assert np.array_equal(future.result(WAIT)["y"], expected(rows(2, start=i)))
    # Room again once the queue drained.
    assert batcher.submit(rows(1, start=8), FAR).result(WAIT)["y"].shape == (1, 3)


def test_a_request_larger_than_the_whole_queue_is_rejected_with_413(make):
    batcher = make(BatchPolicy(max_batch_size=2, max_queue=4))
    with pytest.raises(PayloadTooLarge, match="5 rows"):
        batcher.submit(rows(5), FAR)


@pytest.mark.parametrize(
    "inputs",
    [{"x": np.zeros((2, 3)), "m": np.zeros((3,))}, {"x": np.array(1.0)}, {}],
)
def test_unbatchable_inputs_raise_400_at_submit(make, runner, inputs):
    batcher = make(BatchPolicy(max_batch_size=4))
    with pytest.raises(BadRequest):
        batcher.submit(inputs, FAR)
    assert batcher.queue_depth() == 0 and runner.sizes == []


def test_a_raising_runner_fails_exactly_its_batch_and_the_next_batch_succeeds(make, runner):
    def fragile(inputs):
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return runner(inputs)

    batcher = make(BatchPolicy(max_batch_size=4), run=fragile)
    first = hold_first_batch(batcher, runner)
    bad = batcher.submit({"x": -np.ones((1, 3))}, FAR)
    neighbour = batcher.submit(rows(1, start=1), FAR)
    runner.release()
    first.result(WAIT)
    errors = [bad.exception(WAIT), neighbour.exception(WAIT)]
    assert all(isinstance(e, ModelError) for e in errors)
    assert errors[0] is errors[1]
    assert errors[0].message == "ValueError: negative input"
    later = rows(2, start=2)
    assert np.array_equal(batcher.submit(later, FAR).result(WAIT)["y"], expected(later))


def test_a_serving_error_from_the_runner_is_passed_through(make):
    def refuse(inputs):
        raise BadRequest("pixel values out of range")

    batcher = make(BatchPolicy(max_batch_size=4), run=refuse)
    error = batcher.submit(rows(1), FAR).exception(WAIT)
    assert type(error) is BadRequest and error.message == "pixel values out of range"


def test_a_failing_part_fails_the_whole_split_request_and_its_rest_never_runs(make):
    sizes = []

    def fail_once(inputs):
        sizes.append(len(inputs["x"]))
        raise RuntimeError("device lost")

    batcher = make(BatchPolicy(max_batch_size=2), run=fail_once)
    error = batcher.submit(rows(5), FAR).exception(WAIT)
    assert isinstance(error, ModelError) and "device lost" in error.message
    assert batcher.queue_depth() == 0  # its unsent rows left the queue with it
    batcher.close()
    assert sizes == [2]


def test_wrong_output_rows_fail_the_batch_with_model_error(make):
    batcher = make(BatchPolicy(max_batch_size=4), run=lambda inputs: {"y": np.zeros((3, 1))})
    error = batcher.submit(rows(2), FAR).exception(WAIT)
    assert isinstance(error, ModelError)
    assert error.message == "model returned 3 rows for a batch of 2"


def test_close_without_drain_fails_queued_requests_with_503(make, runner):
    batcher = make(BatchPolicy(max_batch_size=2))
    first = hold_first_batch(batcher, runner)
    queued = [batcher.submit(rows(1, start=i), FAR) for i in range(3)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    for future in queued:
        assert isinstance(future.exception(WAIT), NotReady)
    runner.release()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert np.array_equal(first.result(WAIT)["y"], expected(rows(1, start=99)))  # in flight: finishes
    assert runner.sizes == [1]
    with pytest.raises(NotReady):
        batcher.submit(rows(1), FAR)


def test_close_with_drain_finishes_queued_work_first(make, runner):
    batcher = make(BatchPolicy(max_batch_size=2, max_delay_ms=600_000))
    futures = [batcher.submit(rows(1, start=i), FAR) for i in range(3)]
    batcher.close(drain=True)
    for i, future in enumerate(futures):
        assert np.array_equal(future.result(0)["y"], expected(rows(1, start=i)))
    assert runner.sizes == [2, 1]


def test_a_cancelled_request_never_reaches_the_runner(make, runner):
    batcher = make(BatchPolicy(max_batch_size=4))
    first = hold_first_batch(batcher, runner)
    cancelled = batcher.submit(rows(1, start=1), FAR)
    kept = batcher.submit(rows(1, start=2), FAR)
    assert cancelled.cancel()
    runner.release()
    first.result(WAIT)
    assert np.array_equal(kept.result(WAIT)["y"], expected(rows(1, start=2)))
    assert runner.sizes == [1, 1]


def test_unsplittable_requests_run_alone_and_untouched(make):
    received = []

    def scalar_model(inputs):
        received.append(inputs)
        return {"y": inputs["x"] * 2}

    batcher = make(BatchPolicy(max_batch_size=8, splittable=False), run=scalar_model)
    futures = [batcher.submit({"x": np.array(float(i))}, FAR) for i in range(3)]
    assert [float(f.result(WAIT)["y"]) for f in futures] == [0.0, 2.0, 4.0]
    assert [float(inputs["x"]) for inputs in received] == [0.0, 1.0, 2.0]


def test_every_batch_is_reported_with_its_queue_and_compute_times(make, runner, clock):
    seen: list[BatchStats] = []
    batcher = make(BatchPolicy(max_batch_size=4), observe=seen.append, clock=clock)
    first = hold_first_batch(batcher, runner)
    clock.advance(2)
    futures = [batcher.submit(rows(1, start=i), FAR) for i in range(2)]
    clock.advance(3)
    runner.release()
    for future in [first, *futures]:
        future.result(WAIT)
    assert [(s.rows, s.padding, s.requests) for s in seen] == [(1, 0, 1), (2, 0, 2)]
    assert seen[0].compute_time == 5  # the manual clock moved 5 s while the first batch ran
    assert seen[1].queue_times == (3, 3)


def test_a_failing_observer_does_not_stop_the_batcher(make, runner):
    def broken(stats):
        raise RuntimeError("metrics down")

    batcher = make(BatchPolicy(max_batch_size=4), observe=broken)
    for i in range(2):
        assert batcher.submit(rows(1, start=i), FAR).result(WAIT)["y"].shape == (1, 3)


def test_two_concurrent_batches_overlap_and_split_parts_reassemble_in_order():
    # with concurrent_batches=2 a second batch starts while the first is still in the runner;
    # a request split across both gets its rows back in order whichever finishes first
    first_started = threading.Event()
    release_first = threading.Event()
    seen = []

    def run(inputs):
        x = inputs["x"]
        seen.append(x.shape[0])
        if len(seen) == 1:
            first_started.set()
            assert release_first.wait(5)
        return {"y": x * 10}

    batcher = Batcher(run, BatchPolicy(max_batch_size=4, max_queue=64, concurrent_batches=2))
    x = np.arange(8, dtype=np.float32).reshape(8, 1)
    future = batcher.submit({"x": x}, deadline=time.time() + 10)
    assert first_started.wait(5)
    # the second half ran and finished while the first half is still held in the runner
    deadline = time.time() + 5
    while len(seen) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert seen == [4, 4]
    assert not future.done()
    release_first.set()
    np.testing.assert_array_equal(future.result(5)["y"], x * 10)
    batcher.close()


def test_run_here_runs_an_idle_request_on_the_callers_thread():
    threads = []

    def run(inputs):
        threads.append(threading.current_thread())
        return {"y": inputs["x"] + 1}

    batcher = Batcher(run, BatchPolicy(max_batch_size=8, max_queue=64))
    future = batcher.submit({"x": np.ones((2, 3), dtype=np.float32)}, time.time() + 5, run_here=True)
    assert future.done()  # finished before submit returned
    assert threads == [threading.current_thread()]
    np.testing.assert_array_equal(future.result()["y"], np.full((2, 3), 2, dtype=np.float32))
    batcher.close()


def test_run_here_queues_behind_a_busy_runner_and_batches_with_the_rest():
    started, release = threading.Event(), threading.Event()
    sizes = []

    def run(inputs):
        sizes.append(len(inputs["x"]))
        if len(sizes) == 1:
            started.set()
            assert release.wait(5)
        return {"y": inputs["x"] * 2}

    batcher = Batcher(run, BatchPolicy(max_batch_size=8, max_queue=64))
    first = threading.Thread(
        target=batcher.submit,
        args=({"x": np.zeros((1, 1), dtype=np.float32)}, time.time() + 5),
        kwargs={"run_here": True},
    )
    first.start()
    assert started.wait(5)
    # the runner is busy on the first caller's thread: these queue instead of running inline
    waiting = [
        batcher.submit({"x": np.full((1, 1), i, dtype=np.float32)}, time.time() + 5, run_here=True)
        for i in range(3)
    ]
    assert not any(f.done() for f in waiting)
    release.set()
    for i, future in enumerate(waiting):
        assert future.result(5)["y"][0, 0] == 2 * i
    first.join()
    assert sizes == [1, 3]
    batcher.close()


def test_run_here_with_a_delay_or_a_backlog_does_not_jump_the_queue():
    seen = []
    batcher = Batcher(lambda t: seen.append(threading.current_thread()) or {"y": t["x"]},
                      BatchPolicy(max_batch_size=4, max_delay_ms=1, max_queue=64))  # fmt: skip
    future = batcher.submit({"x": np.ones((1, 1), dtype=np.float32)}, time.time() + 5, run_here=True)
    future.result(5)
    assert seen and seen[0] is not threading.current_thread()
    batcher.close()


# --- pipelining (``launch``): the next batch starts before the last one is answered ----------


def one_then_two(batcher: Batcher, runner, on_first=None) -> None:
    """A batch of one held in the runner, two more requests queued behind it, all answered; closes."""
    try:
        first = hold_first_batch(batcher, runner)
        if on_first is not None:
            first.add_done_callback(on_first)
        later = [batcher.submit(rows(1, start=i), FAR) for i in range(2)]
        runner.release()
        for future in [first, *later]:
            future.result(WAIT)
    finally:
        batcher.close()


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_pipelined_batcher_launches_the_next_batch_before_answering_the_last(runner, pipelined):
    events: list[str] = []

    def launch(inputs):
        events.append(f"launch {len(inputs['x'])}")
        return runner.launch(inputs)

    def run(inputs):
        events.append(f"launch {len(inputs['x'])}")
        return runner(inputs)

    batcher = Batcher(run, BatchPolicy(max_batch_size=4), launch=launch if pipelined else None)
    one_then_two(batcher, runner, on_first=lambda _: events.append("answer first"))
    if pipelined:  # the second batch was on the device while the first one's answers went out
        assert events == ["launch 1", "launch 2", "answer first"]
    else:
        assert events == ["launch 1", "answer first", "launch 2"]


def test_a_launch_that_fails_fails_its_batch_only_and_the_last_batch_is_still_answered(runner):
    calls = []

    def launch(inputs):
        calls.append(len(inputs["x"]))
        if len(calls) == 2:
            raise BadRequest("input 'x' has the wrong shape")
        return runner.launch(inputs)

    batcher = Batcher(runner, BatchPolicy(max_batch_size=4), launch=launch)
    try:
        runner.hold()
        first = batcher.submit(rows(1, start=7), FAR)
        assert runner.started.wait(WAIT)
        refused = [batcher.submit(rows(1, start=i), FAR) for i in range(2)]
        runner.release()
        assert np.array_equal(first.result(WAIT)["y"], expected(rows(1, start=7)))
        for future in refused:
            assert isinstance(future.exception(WAIT), BadRequest)
        after = batcher.submit(rows(2, start=3), FAR)
        assert np.array_equal(after.result(WAIT)["y"], expected(rows(2, start=3)))
    finally:
        batcher.close()
    assert calls == [1, 2, 2]


def test_a_pipelined_batcher_answers_a_lone_request_without_waiting_for_another(runner):
    # nothing queued behind it: the worker must not hold its answer back for a next batch
    batcher = Batcher(runner, BatchPolicy(max_batch_size=8), launch=runner.launch)
    try:
        for i in range(3):
            assert np.array_equal(
                batcher.submit(rows(1, start=i), FAR).result(WAIT)["y"], expected(rows(1, start=i))
            )
    finally:
        batcher.close()
    assert runner.sizes == [1, 1, 1]


def test_with_two_batches_at_once_launch_is_not_used(runner):
    launched = []
    batcher = Batcher(
        runner,
        BatchPolicy(max_batch_size=4, concurrent_batches=2),
        launch=lambda inputs: launched.append(inputs) or runner.launch(inputs),
    )
    try:
        assert batcher.submit(rows(2), FAR).result(WAIT)["y"].shape == (2, 3)
    finally:
        batcher.close()
    assert launched == []


def test_a_pipelined_batcher_assembles_batches_in_allocated_buffers_only_while_the_runner_is_free(runner):
    # one buffer per shape, reused for every batch, as a runner's pinned staging buffers are: the
    # fake computes a batch when it is collected, so a buffer handed out while the last batch was
    # still in the runner would have its inputs overwritten and give wrong answers
    buffers: dict[tuple, np.ndarray] = {}
    handed = []

    def allocate(name, shape, dtype):
        handed.append(shape[0])
        return buffers.setdefault((name, shape, np.dtype(dtype).str), np.empty(shape, dtype))

    batcher = Batcher(
        runner, BatchPolicy(max_batch_size=4, max_queue=256), launch=runner.launch, allocate=allocate
    )
    try:
        futures = []
        for round_ in range(6):
            runner.hold()
            futures.append(batcher.submit(rows(1, start=100 + round_), FAR))
            futures += [batcher.submit(rows(1, start=10 * round_ + i), FAR) for i in range(3)]
            runner.release()
        results = [future.result(WAIT)["y"] for future in futures]
    finally:
        batcher.close()
    expected_rows = []
    for round_ in range(6):
        expected_rows += [rows(1, start=100 + round_)] + [rows(1, start=10 * round_ + i) for i in range(3)]
    for got, inputs in zip(results, expected_rows, strict=True):
        assert np.array_equal(got, expected(inputs))
    assert handed and max(handed) > 1  # batches of several requests were built in the buffers


def test_allocate_is_not_used_without_pipelining(runner):
    handed = []
    batcher = Batcher(runner, BatchPolicy(max_batch_size=4), allocate=lambda *args: handed.append(args))
    one_then_two(batcher, runner)
    assert runner.sizes == [1, 2] and handed == []


@pytest.mark.parametrize("concurrency, pipelined", [(1, False), (1, True), (2, False)])
def test_batches_run_only_on_the_threads_that_ran_the_warmup(runner, concurrency, pipelined):
    # a warm-up's state may be per thread (cuDNN's plans): every worker warms up before it takes
    # a batch, and no batch runs anywhere else, not even an idle request asked to run_here
    warmed, ran = [], []
    lock = threading.Lock()

    def warmup():
        with lock:
            warmed.append(threading.get_ident())

    def run(inputs):
        ran.append(threading.get_ident())
        return runner(inputs)

    batcher = Batcher(
        run,
        BatchPolicy(max_batch_size=4, concurrent_batches=concurrency),
        launch=lazy_launch(run) if pipelined else None,
        warmup=warmup,
    )
    try:
        batcher.wait_warm()
        assert len(set(warmed)) == len(warmed) == concurrency
        assert threading.get_ident() not in warmed
        for i in range(6):
            future = batcher.submit(rows(1, start=i), FAR, run_here=True)
            assert np.array_equal(future.result(WAIT)["y"], expected(rows(1, start=i)))
    finally:
        batcher.close()
    assert ran and set(ran) <= set(warmed)


def test_a_failed_warmup_is_raised_by_wait_warm_and_close_still_returns(runner):
    def warmup():
        raise RuntimeError("CUDA error: out of memory while warming up batch 64")

    batcher = Batcher(runner, BatchPolicy(max_batch_size=4, concurrent_batches=2), warmup=warmup)
    with pytest.raises(RuntimeError, match="warming up batch 64"):
        batcher.wait_warm()
    batcher.close(drain=False)
    assert runner.batches == []


def test_a_pipelined_batcher_launches_the_next_batches_while_the_last_answers_are_still_going_out(runner):
    # the answers of a batch are sent on a thread of their own once the next batch is launched:
    # a slow answer (a reply stuck in a socket) must not hold the device back, nor a launch the answers
    launched = []
    third_launched = threading.Event()

    def launch(inputs):
        launched.append(len(inputs["x"]))
        if len(launched) == 3:
            third_launched.set()
        return runner.launch(inputs)

    batcher = Batcher(runner, BatchPolicy(max_batch_size=1, max_queue=64), launch=launch)
    try:
        runner.hold()
        first = batcher.submit(rows(1), FAR)
        assert runner.started.wait(WAIT)
        # the first answer is handed out only once the third batch has been launched
        first.add_done_callback(lambda _: third_launched.wait(WAIT))
        rest = [batcher.submit(rows(1, start=i), FAR) for i in (1, 2)]
        runner.release()
        assert third_launched.wait(WAIT), "the batcher waited for the first batch's answers"
        for i, future in zip((0, 1, 2), [first, *rest], strict=True):
            assert np.array_equal(future.result(WAIT)["y"], expected(rows(1, start=i)))
    finally:
        third_launched.set()
        batcher.close()
    assert launched == [1, 1, 1]


@pytest.mark.parametrize("depth", [1, 2])
def test_with_depth_two_a_full_batch_is_launched_while_one_is_still_on_the_device(runner, depth):
    launched = []
    batcher = Batcher(
        runner,
        BatchPolicy(max_batch_size=4, max_queue=64),
        launch=lambda inputs: launched.append(len(inputs["x"])) or runner.launch(inputs),
        depth=depth,
    )
    try:
        runner.hold()
        first = batcher.submit(rows(2), FAR)
        assert runner.started.wait(WAIT)
        runner.started.clear()
        small = batcher.submit(rows(3, start=5), FAR)
        # a partial batch, and no device time known yet for the one running: it waits for its end
        assert not runner.started.wait(0.3)
        more = batcher.submit(rows(2, start=9), FAR)
        # a full batch queued: depth 2 launches it behind the running one, depth 1 waits
        assert runner.started.wait(0.5) == (depth == 2)
        assert launched == ([2, 4] if depth == 2 else [2])
        last = batcher.submit(rows(1, start=20), FAR)
        time.sleep(0.2)
        assert len(launched) == depth  # never more than depth launches on the device
        runner.release()
        for future, inputs in (
            (first, rows(2)),
            (small, rows(3, start=5)),
            (more, rows(2, start=9)),
            (last, rows(1, start=20)),
        ):
            assert np.array_equal(future.result(WAIT)["y"], expected(inputs))
    finally:
        batcher.close()


def test_with_depth_two_the_next_batch_is_launched_when_the_running_one_is_due_to_end(runner):
    # a batch of 2 rows takes 0.6 s on the "device"; the next one of that size is then expected
    # to take as long, and a partial batch queued behind it is launched just before its end
    launched = []
    batcher = Batcher(
        runner,
        BatchPolicy(max_batch_size=4, max_queue=64),
        launch=lambda inputs: launched.append(time.monotonic()) or runner.launch(inputs),
        depth=2,
    )
    try:
        runner.hold()
        timed = batcher.submit(rows(2), FAR)
        assert runner.started.wait(WAIT)
        time.sleep(0.6)
        runner.release()
        assert np.array_equal(timed.result(WAIT)["y"], expected(rows(2)))
        runner.hold()
        running = batcher.submit(rows(2, start=3), FAR)
        assert runner.started.wait(WAIT)
        runner.started.clear()
        queued = batcher.submit(rows(1, start=7), FAR)
        assert not runner.started.wait(0.3), "launched long before the running batch is due to end"
        assert runner.started.wait(1.0), "not launched behind the running batch when it was due to end"
        assert 0.45 < launched[2] - launched[1] < 0.9
        runner.release()  # the running batch ends only now: the queued one went in behind it
        assert np.array_equal(running.result(WAIT)["y"], expected(rows(2, start=3)))
        assert np.array_equal(queued.result(WAIT)["y"], expected(rows(1, start=7)))
    finally:
        batcher.close()


def test_with_depth_two_batches_built_in_alternating_buffers_get_their_own_answers(runner):
    # a runner with two staging sets hands out the one its next launch takes; the fake computes a
    # batch when it is collected, so a set rebuilt while its last batch was still in flight
    # would give that batch the wrong rows
    sets: list[dict] = [{}, {}]
    count = [0]
    handed = []

    def allocate(name, shape, dtype):
        buffers = sets[count[0] % 2]
        handed.append(count[0] % 2)
        return buffers.setdefault((name, shape, np.dtype(dtype).str), np.empty(shape, dtype))

    def launch(inputs):
        count[0] += 1
        return runner.launch(inputs)

    batcher = Batcher(
        runner, BatchPolicy(max_batch_size=4, max_queue=512), launch=launch, allocate=allocate, depth=2
    )
    try:
        futures, inputs = [], []
        for round_ in range(8):
            runner.hold()
            for i in range(7):
                x = rows(1 + i % 2, start=100 * round_ + 10 * i)
                inputs.append(x)
                futures.append(batcher.submit(x, FAR))
            runner.release()
        for future, x in zip(futures, inputs, strict=True):
            assert np.array_equal(future.result(WAIT)["y"], expected(x))
    finally:
        batcher.close()
    assert set(handed) == {0, 1}


def test_a_batcher_with_depth_two_never_runs_a_batch_on_the_callers_thread(runner):
    ran = []

    def launch(inputs):
        ran.append(threading.get_ident())
        return runner.launch(inputs)

    batcher = Batcher(runner, BatchPolicy(max_batch_size=4), launch=launch, depth=2)
    try:
        for i in range(4):
            future = batcher.submit(rows(1, start=i), FAR, run_here=True)
            assert np.array_equal(future.result(WAIT)["y"], expected(rows(1, start=i)))
    finally:
        batcher.close()
    assert threading.get_ident() not in ran


def test_with_depth_two_a_batch_is_collected_while_the_last_ones_answers_are_still_going_out(runner):
    # at depth 2 the collector hands a batch's answers to the answering thread whenever requests
    # are queued: answering it itself, the next batch (launched meanwhile) would wait on the
    # device to be collected until the last answer was out
    batcher = Batcher(runner, BatchPolicy(max_batch_size=4, max_queue=64), launch=runner.launch, depth=2)
    try:
        runner.hold()
        first = batcher.submit(rows(2), FAR)
        assert runner.started.wait(WAIT)
        # one row queued behind a batch of two: not launched behind it, so the first batch is
        # alone on the device when it is collected, with a request still queued
        small = batcher.submit(rows(1, start=5), FAR)
        collected_meanwhile, answered = [], threading.Event()

        def answering(_):  # the first batch's answer going out, slowly
            collected_meanwhile.append(small.done() or _settles(small))
            answered.set()

        first.add_done_callback(answering)
        runner.release()
        assert answered.wait(WAIT)
        assert collected_meanwhile == [True], "the second batch waited for the first one's answers"
        assert np.array_equal(small.result(WAIT)["y"], expected(rows(1, start=5)))
        assert np.array_equal(first.result(WAIT)["y"], expected(rows(2)))
    finally:
        batcher.close()


def _settles(future, seconds: float = 3.0) -> bool:
    """Whether ``future`` is done within ``seconds`` (polled: a callback must not block on a lock)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if future.done():
            return True
        time.sleep(0.005)
    return False


def test_the_lead_before_a_running_batch_ends_is_at_most_half_its_time():
    def flight(size, began, launched):
        made = Flight([], size, size, False, ())
        made.began, made.launched = began, launched
        return made

    times = DeviceTimes(weight=1.0)
    assert times.due(flight(8, 0.0, 0.001)) is None  # nothing measured yet
    times.ended(flight(8, 0.0, 0.001), 0.011)  # 10 ms on the device, a 1 ms launch
    # the lead: twice the launch and 0.5 ms, before the 10 ms a batch of 8 takes
    assert times.due(flight(8, 0.020, 0.021)) == pytest.approx(0.021 + 0.010 - 0.0025)
    # a size not seen yet: scaled from the nearest one
    assert times.due(flight(16, 0.020, 0.021)) == pytest.approx(0.021 + 0.020 - 0.0025)
    # slow launches (9 ms): the lead is capped at half the running batch's time
    times.ended(flight(8, 0.030, 0.039), 0.049)
    assert times.due(flight(8, 0.050, 0.059)) == pytest.approx(0.059 + 0.005)
