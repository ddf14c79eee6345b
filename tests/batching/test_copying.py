"""RowCopier: a batch's rows copied by several threads land exactly where np.concatenate puts them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.batching import Batcher, BatchPolicy
from serving.batching.copying import MIN_BYTES, RowCopier, _shares
from tests.batching.test_batcher import FAR, WAIT, expected


def _parts(sizes, row_bytes=MIN_BYTES // 8):
    width = row_bytes // 4
    return [(np.arange(n * width, dtype=np.float32).reshape(n, width) + 1e6 * i) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("sizes", [[1], [5, 1, 9, 2], [1] * 13, [17], [3, 30]])
def test_the_rows_land_where_concatenate_puts_them(threads, sizes):
    parts = _parts(sizes)
    copier = RowCopier(threads)
    try:
        out = np.empty((sum(sizes), parts[0].shape[1]), np.float32)
        copier.join(parts, out)
        np.testing.assert_array_equal(out, np.concatenate(parts))
    finally:
        copier.close()


def test_the_shares_cover_every_row_once_in_order():
    parts = _parts([5, 1, 9, 2], row_bytes=16)
    jobs = _shares(parts, 17, 4)
    targets = [(t.start, t.stop) for job in jobs for _, t in job]
    assert targets[0][0] == 0 and targets[-1][1] == 17
    assert all(a[1] == b[0] for a, b in zip(targets, targets[1:], strict=False))
    assert max(sum(t.stop - t.start for _, t in job) for job in jobs) == 5  # ceil(17 / 4)


def test_a_large_batch_is_copied_on_other_threads_too():
    seen = set()
    original = np.copyto

    def spy(*args, **kwargs):
        seen.add(threading.get_ident())
        return original(*args, **kwargs)

    parts = _parts([8, 8])
    copier = RowCopier(4)
    try:
        np.copyto = spy
        out = np.empty((16, parts[0].shape[1]), np.float32)
        copier.join(parts, out)
    finally:
        np.copyto = original
        copier.close()
    # the caller takes a share; the pool takes the rest (an idle pool thread may take two)
    assert len(seen) >= 2 and threading.get_ident() in seen
    np.testing.assert_array_equal(out, np.concatenate(parts))


def test_a_small_batch_stays_on_the_calling_thread():
    parts = _parts([2, 1], row_bytes=64)
    copier = RowCopier(4)
    try:
        out = np.empty((3, parts[0].shape[1]), np.float32)
        copier.join(parts, out)
        np.testing.assert_array_equal(out, np.concatenate(parts))
        assert copier._pool is not None and not copier._pool._threads  # no thread ever started
    finally:
        copier.close()


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_batcher_with_copy_threads_gives_every_request_its_rows(runner, pipelined):
    width = MIN_BYTES // 8 // 8  # 1 MiB / 8 a row of float64: a 16-row batch is copied in parallel
    batcher = Batcher(
        runner,
        BatchPolicy(max_batch_size=16, batch_sizes=(4, 8, 16), max_queue=512),
        launch=runner.launch if pipelined else None,
        copy_threads=4,
    )
    try:
        runner.hold()
        first = batcher.submit({"x": np.zeros((1, width))}, FAR)
        assert runner.started.wait(WAIT)
        inputs = [{"x": np.random.default_rng(i).random((1 + i % 3, width))} for i in range(12)]
        futures = [batcher.submit(x, FAR) for x in inputs]
        runner.release()
        first.result(WAIT)
        for future, x in zip(futures, inputs, strict=True):
            np.testing.assert_array_equal(future.result(WAIT)["y"], expected(x))
    finally:
        batcher.close()
    assert max(runner.sizes) == 16  # the queued requests were batched together
