"""An input's copies from the host queued in one driver call (``ONEBOX_CUDA_COPY=batch``).

``CudaDriver.batched``: ``RawTarget.put`` collects the copies of a batch's parts (from
registered memory, and the staged runs) and ``RawTarget.flush`` queues them with one
``cuMemcpyBatchAsync``. Checked here with a "driver" that reads the call's arrays as the real
one does and copies between CPU buffers; on a GPU, tests/handlers/test_cuda_rows.py serves
through it.
"""

from __future__ import annotations

import ctypes
import logging
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from handlers.cuda_driver import CudaDriver, RawTarget  # noqa: E402
from handlers.cuda_inputs import _copy_parts  # noqa: E402


class FakeBatch:
    """Stands in for cuMemcpyBatchAsync_v2: reads its arrays, records the copies and makes them."""

    def __init__(self, error: int = 0):
        self.calls: list[dict] = []
        self.error = error

    def __call__(self, dsts, srcs, sizes, count, attrs, first, num_attrs, stream) -> int:
        copies = list(
            zip(
                (ctypes.c_uint64 * count).from_address(dsts),
                (ctypes.c_uint64 * count).from_address(srcs),
                (ctypes.c_size_t * count).from_address(sizes),
                strict=True,
            )
        )
        order = ctypes.c_int.from_address(attrs).value
        self.calls.append(
            {"copies": copies, "order": order, "first": ctypes.c_size_t.from_address(first).value,
             "attrs": num_attrs, "stream": stream}
        )  # fmt: skip
        if self.error:
            return self.error
        for dst, src, size in copies:
            ctypes.memmove(dst, src, size)
        return 0


class FakeCopy:
    """Stands in for cuMemcpyHtoDAsync: records (target, source, nbytes) and copies."""

    def __init__(self, error: int = 0):
        self.calls: list[tuple[int, int, int]] = []
        self.error = error

    def __call__(self, dst: int, src: int, nbytes: int, stream: int) -> int:
        self.calls.append((dst, src, nbytes))
        if self.error:
            return self.error
        ctypes.memmove(dst, src, nbytes)
        return 0


def parts_of(*counts: int) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(counts))
    return [rng.standard_normal((n, 3)).astype(np.float32) for n in counts]


def copied(parts, covered: set[int], calls: dict, batched: bool = True):
    """``parts`` copied into a CPU tensor through a RawTarget; the target, staging and copier."""
    target = torch.full((sum(len(p) for p in parts), 3), -1.0)
    copier = CudaDriver(calls=calls, batched=batched)
    raw = RawTarget(copier, target.data_ptr(), tuple(target.shape), np.dtype(np.float32), 7)
    staging = []

    def host():
        staging.append(torch.zeros(target.shape))
        return staging[-1]

    ids = {id(parts[i]) for i in covered}
    _copy_parts(parts, target, lambda p: id(p) in ids, host, raw)
    np.testing.assert_array_equal(target.numpy(), np.concatenate(parts))
    return target, staging, copier


def test_every_copy_of_an_input_goes_in_one_call_read_in_stream_order():
    parts = parts_of(1, 2, 1, 1, 2)
    batch, single = FakeBatch(), FakeCopy()
    target, staging, copier = copied(parts, {2}, {"batch": batch, "htod": single})
    assert single.calls == [] and len(batch.calls) == 1
    call = batch.calls[0]
    base, row, staged = target.data_ptr(), 3 * 4, staging[0].data_ptr()
    # the staged run before the covered part, the covered part where it lies, the last run
    assert call["copies"] == [
        (base, staged, 3 * row),
        (base + 3 * row, parts[2].ctypes.data, row),
        (base + 4 * row, staged + 4 * row, 3 * row),
    ]
    assert (call["order"], call["first"], call["attrs"], call["stream"]) == (1, 0, 1, 7)
    assert (copier.queued, copier.batches) == (3, 1)


def test_a_single_copy_goes_by_itself():
    batch, single = FakeBatch(), FakeCopy()
    copied(parts_of(4), {0}, {"batch": batch, "htod": single})
    assert batch.calls == [] and len(single.calls) == 1


def test_without_batching_or_a_batch_call_each_copy_goes_by_itself():
    batch, single = FakeBatch(), FakeCopy()
    copied(parts_of(1, 2, 1), {0, 1, 2}, {"batch": batch, "htod": single}, batched=False)
    assert batch.calls == [] and len(single.calls) == 3
    single = FakeCopy()
    copied(parts_of(1, 2, 1), {0, 1, 2}, {"htod": single})  # a driver older than CUDA 12.8
    assert len(single.calls) == 3


def test_a_failing_batch_call_turns_batching_off_and_each_copy_goes_by_itself(caplog):
    batch, single = FakeBatch(error=1), FakeCopy()
    with caplog.at_level(logging.WARNING):
        _, _, copier = copied(parts_of(1, 2, 1), {0, 1, 2}, {"batch": batch, "htod": single})
    assert len(batch.calls) == 1 and len(single.calls) == 3
    assert not copier.batched and copier.enabled and copier.queued == 3
    assert "cuMemcpyBatchAsync failed (CUDA error 1)" in caplog.text
    copied(parts_of(2, 2), {0, 1}, {"batch": batch, "htod": single})
    assert len(batch.calls) == 2  # a new copier tries again; this one stays off


def test_copies_the_driver_takes_neither_way_are_left_to_torch():
    batch, single = FakeBatch(error=1), FakeCopy(error=700)
    _, _, copier = copied(parts_of(1, 2, 1), {0, 1, 2}, {"batch": batch, "htod": single})
    assert len(single.calls) == 1  # the first failed and turned the path off
    assert not copier.enabled and copier.queued == 0


def test_the_driver_call_is_taken_from_whichever_symbol_the_driver_has():
    def v1(*args):
        v1.args = args
        return 0

    copier = CudaDriver()
    calls = copier._batch_call(SimpleNamespace(cuMemcpyBatchAsync=v1))
    assert calls["batch"](1, 2, 3, 4, 5, 6, 7, 99) == 0
    # CUDA 12.8's signature has a failure index before the stream
    assert v1.args[:7] == (1, 2, 3, 4, 5, 6, 7) and v1.args[8] == 99
    assert v1.args[7] == ctypes.addressof(copier._failed)

    def v2(*args):
        return 0

    assert copier._batch_call(SimpleNamespace(cuMemcpyBatchAsync_v2=v2, cuMemcpyBatchAsync=v1))["batch"] is v2
    assert copier._batch_call(SimpleNamespace()) == {}
