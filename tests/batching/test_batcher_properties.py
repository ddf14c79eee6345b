"""Property: whatever the knobs and the interleaving, every request gets exactly its own rows back."""

from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.batching import Batcher, BatchPolicy, BatchStats
from tests.batching.fakes import Runner, transform

WAIT = 10


@st.composite
def policies(draw) -> BatchPolicy:
    max_batch_size = draw(st.integers(1, 16))
    sizes: tuple[int, ...] = ()
    if draw(st.booleans()):
        smaller = (
            draw(st.sets(st.integers(1, max_batch_size - 1), max_size=4)) if max_batch_size > 1 else set()
        )
        top = draw(st.integers(max_batch_size, max_batch_size + 8))
        sizes = (*sorted(smaller), top)
    return BatchPolicy(
        max_batch_size=max_batch_size,
        max_delay_ms=draw(st.sampled_from([0, 1, 3])),
        batch_sizes=sizes,
        max_queue=1024,
        concurrent_batches=draw(st.sampled_from([1, 1, 2, 3])),
    )


requests = st.lists(
    st.tuples(
        st.integers(1, 9),  # rows
        st.sampled_from([2, 3]),  # feature width: two shape groups
        st.integers(0, 3),  # which submitting thread
        st.sampled_from([0.0, 0.0, 0.0005, 0.002]),  # pause before submitting
    ),
    min_size=1,
    max_size=24,
)


@settings(max_examples=60, deadline=None)
@given(policy=policies(), plan=requests, pipelined=st.booleans())
def test_every_request_gets_exactly_its_own_rows_transformed(policy, plan, pipelined):
    runner = Runner()
    seen: list[BatchStats] = []
    launch = runner.launch if pipelined else None  # pipelines when one batch runs at a time
    buffers: dict = {}  # one per shape, reused by every batch, as a runner's staging buffers are

    def allocate(name, shape, dtype):
        return buffers.setdefault((name, shape, dtype.str), np.empty(shape, dtype))

    batcher = Batcher(runner, policy, launch=launch, allocate=allocate, observe=seen.append)
    futures: dict[int, object] = {}
    inputs: dict[int, np.ndarray] = {}
    for index, (count, width, _, _) in enumerate(plan):
        # Values unique to each request, so a row delivered to the wrong request shows.
        inputs[index] = np.arange(count * width, dtype=np.float64).reshape(count, width) + 1000.0 * index

    def submit(thread: int) -> None:
        for index, (_, _, owner, pause) in enumerate(plan):
            if owner == thread:
                if pause:
                    time.sleep(pause)
                # some callers offer to run an idle batch themselves, as the model host does
                futures[index] = batcher.submit(
                    {"x": inputs[index]}, time.time() + 60, run_here=index % 2 == 0
                )

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        for index, future in futures.items():
            result = future.result(WAIT)
            assert list(result) == ["y"]
            assert np.array_equal(result["y"], transform(inputs[index]))
    finally:
        batcher.close(drain=False)

    limit = max(policy.batch_sizes) if policy.batch_sizes else policy.max_batch_size
    for batch, stats in zip(runner.batches, seen, strict=True):
        size = len(batch["x"])
        assert size <= limit
        assert stats.rows <= policy.max_batch_size
        assert stats.rows + stats.padding == size
        if policy.batch_sizes:
            assert size in policy.batch_sizes
        else:
            assert stats.padding == 0
    assert sum(stats.rows for stats in seen) == sum(count for count, *_ in plan)
    assert batcher.queue_depth() == 0
