"""Which copies a batch's parts become (handlers.cuda_inputs), checked with CPU tensors.

On a GPU the target is device memory and the copies are asynchronous; here the target is a CPU
tensor that records each copy, so the choice between "straight from where it lies" and "through
the staging buffer, one copy per run of staged rows" is checked on any machine.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from handlers.cuda_inputs import _copy_parts  # noqa: E402


class Target:
    """A tensor that records the copies made into its row ranges."""

    def __init__(self, shape, dtype=torch.float32):
        self.tensor = torch.zeros(shape, dtype=dtype)
        self.copies: list[tuple[int, int, str]] = []
        self.staging = None

    def __getitem__(self, rows: slice):
        target = self

        class Slice:
            def copy_(self, source, non_blocking=False):
                assert non_blocking, "copies to the device are queued, never waited for"
                staged = (
                    target.staging is not None
                    and source.data_ptr() >= target.staging.data_ptr()
                    and (source.data_ptr() < target.staging.data_ptr() + target.staging.nbytes)
                )
                target.copies.append((rows.start, rows.stop, "staged" if staged else "direct"))
                target.tensor[rows].copy_(source)

        return Slice()


def parts_of(*counts: int) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(counts))
    return [rng.standard_normal((n, 3)).astype(np.float32) for n in counts]


def run(parts, covered: set[int]):
    target = Target((sum(len(p) for p in parts), 3))
    calls = []

    def host():
        calls.append(1)
        target.staging = torch.zeros(target.tensor.shape)
        return target.staging

    ids = {id(parts[i]) for i in covered}
    _copy_parts(parts, target, lambda p: id(p) in ids, host)
    np.testing.assert_array_equal(target.tensor.numpy(), np.concatenate(parts))
    return target, calls


def test_parts_in_registered_memory_are_copied_as_they_lie_one_copy_each():
    target, calls = run(parts_of(2, 1, 3), covered={0, 1, 2})
    assert target.copies == [(0, 2, "direct"), (2, 3, "direct"), (3, 6, "direct")]
    assert calls == []  # the staging buffer is not even asked for


def test_consecutive_parts_elsewhere_are_staged_and_copied_together():
    target, calls = run(parts_of(1, 2, 1, 1, 2), covered={2})
    assert target.copies == [(0, 3, "staged"), (3, 4, "direct"), (4, 7, "staged")]
    assert calls == [1]
    staged = target.staging.numpy()
    parts = parts_of(1, 2, 1, 1, 2)
    np.testing.assert_array_equal(staged[:3], np.concatenate(parts[:2]))
    np.testing.assert_array_equal(staged[4:7], np.concatenate(parts[3:]))


def test_a_batch_built_in_the_staging_buffer_is_not_copied_into_it_again():
    target = Target((4, 3))
    staging = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    target.staging = staging
    built = staging.numpy()  # the batch already lies there (assembled in it)
    _copy_parts([built], target, lambda p: False, lambda: staging)
    assert target.copies == [(0, 4, "staged")]
    np.testing.assert_array_equal(target.tensor.numpy(), np.arange(12).reshape(4, 3))


# -- the driver's copies (CudaDriver), with a "driver" that copies between CPU buffers ----------
import ctypes  # noqa: E402

from handlers.cuda_driver import CudaDriver, RawTarget  # noqa: E402
from handlers.cuda_inputs import _pad  # noqa: E402


class FakeDriver:
    """Stands in for cuMemcpyHtoDAsync: records each copy and makes it (CPU to CPU)."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, int, int, int]] = []
        self.fail_at = fail_at

    def __call__(self, device_address: int, host_address: int, nbytes: int, stream: int) -> int:
        self.calls.append((device_address, host_address, nbytes, stream))
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            return 700  # CUDA_ERROR_ILLEGAL_ADDRESS
        ctypes.memmove(device_address, host_address, nbytes)
        return 0


def raw_run(parts, covered: set[int], driver: FakeDriver, dtype=np.float32):
    target = Target((sum(len(p) for p in parts), 3), torch.from_numpy(np.empty(0, dtype)).dtype)
    copier = CudaDriver(calls={"htod": driver})
    raw = RawTarget(copier, target.tensor.data_ptr(), tuple(target.tensor.shape), np.dtype(dtype), 7)

    def host():
        target.staging = torch.zeros(target.tensor.shape, dtype=target.tensor.dtype)
        return target.staging

    ids = {id(parts[i]) for i in covered}
    _copy_parts(parts, target, lambda p: id(p) in ids, host, raw)
    np.testing.assert_array_equal(target.tensor.numpy(), np.concatenate(parts).astype(dtype))
    return target, copier


def test_the_driver_takes_every_copy_at_its_rows_address_on_the_lanes_stream():
    parts = parts_of(1, 2, 1, 1, 2)
    driver = FakeDriver()
    target, copier = raw_run(parts, {2}, driver)
    base, row = target.tensor.data_ptr(), 3 * 4
    staging = target.staging.data_ptr()
    assert [(d - base, n, s) for d, _, n, s in driver.calls] == [
        (0, 3 * row, 7),
        (3 * row, row, 7),
        (4 * row, 3 * row, 7),
    ]
    # the staged runs are read from the staging buffer, the covered part where it lies
    assert [h for _, h, _, _ in driver.calls] == [staging, parts[2].ctypes.data, staging + 4 * row]
    assert target.copies == [] and copier.queued == 3  # torch copied nothing


def test_a_part_of_another_dtype_goes_through_torch_which_casts_it():
    parts = parts_of(2, 2)
    driver = FakeDriver()
    target, copier = raw_run(parts, {0, 1}, driver, dtype=np.float64)
    assert driver.calls == [] and target.copies == [(0, 2, "direct"), (2, 4, "direct")]


def test_rows_that_would_not_fit_the_target_are_never_given_to_the_driver():
    copier = CudaDriver(calls={"htod": FakeDriver()})
    raw = RawTarget(copier, 0, (4, 3), np.dtype(np.float32), 0)
    rows = np.zeros((2, 3), np.float32)
    assert not raw.put(3, rows)  # rows 3..4 of a 4-row target
    assert not raw.put(0, np.zeros((2, 4), np.float32))  # another row shape
    assert not raw.put(0, np.zeros((3, 2), np.float32).T)  # not C-contiguous
    assert copier.queued == 0


def test_a_failing_driver_call_turns_the_path_off_and_torch_copies_instead(caplog):
    parts = parts_of(1, 1, 1)
    driver = FakeDriver(fail_at=1)
    target, copier = raw_run(parts, {0, 1, 2}, driver)
    assert len(driver.calls) == 2  # the second failed; the third was not tried
    assert target.copies == [(1, 2, "direct"), (2, 3, "direct")]
    assert not copier.enabled and copier.queued == 1
    assert "CUDA error 700" in caplog.text


# -- padding rows (_pad): doubling device-to-device copies by the driver, else one torch copy ------


class FakeDeviceCopy:
    """Stands in for cuMemcpyDtoDAsync: records (target, source, nbytes) and copies."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, int, int]] = []
        self.fail_at = fail_at

    def __call__(self, target: int, source: int, nbytes: int, stream: int) -> int:
        self.calls.append((target, source, nbytes))
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            return 1  # CUDA_ERROR_INVALID_VALUE
        ctypes.memmove(target, source, nbytes)
        return 0


def padded(rows: int, size: int, calls: dict):
    tensor = torch.full((size, 3), -1.0)
    tensor[:rows] = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    copier = CudaDriver(calls=calls)
    raw = RawTarget(copier, tensor.data_ptr(), tuple(tensor.shape), np.dtype(np.float32), 0)
    _pad(tensor, rows, raw)
    expected = torch.cat([tensor[:rows], tensor[rows - 1 : rows].expand(size - rows, 3)])
    torch.testing.assert_close(tensor, expected)
    return tensor, copier


def test_padding_rows_are_filled_by_doubling_copies_of_the_last_row():
    dtod = FakeDeviceCopy()
    tensor, copier = padded(2, 9, {"dtod": dtod})
    base, row = tensor.data_ptr(), 3 * 4
    # rows 2, then 3-4, then 5-8: each copy reads only rows already filled
    assert [((t - base) // row, (s - base) // row, n // row) for t, s, n in dtod.calls] == [
        (2, 1, 1),
        (3, 1, 2),
        (5, 1, 4),
    ]
    assert copier.queued == 3


def test_a_failing_padding_copy_leaves_the_padding_to_torch():
    dtod = FakeDeviceCopy(fail_at=1)
    _, copier = padded(1, 6, {"dtod": dtod})  # torch fills rows 1-5 after the second call failed
    assert len(dtod.calls) == 2 and not copier.enabled


def test_padding_without_the_driver_is_one_torch_copy():
    tensor = torch.zeros((5, 3))
    tensor[:2] = 7.0
    _pad(tensor, 2, None)
    assert bool((tensor == 7.0).all())
    _, copier = padded(3, 4, {"htod": FakeDriver()})  # a driver without device copies
    assert copier.queued == 0


# -- outputs copied out of the lane's pinned buffers (host_copy) ------------------------------------


@pytest.mark.parametrize("enabled", [True, False], ids=["driver", "torch"])
def test_outputs_are_copied_out_of_the_reused_buffer_whichever_way(enabled, monkeypatch):
    from handlers import cuda_driver

    buffer = np.arange(4000, dtype=np.float32).reshape(4, 1000)
    copy = cuda_driver.host_copy(buffer, CudaDriver(enabled=enabled, calls={}))
    buffer[:] = -1  # the lane's next batch overwrites it
    np.testing.assert_array_equal(copy, np.arange(4000, dtype=np.float32).reshape(4, 1000))
    assert copy.dtype == np.float32 and copy.flags.writeable
    # past the size held under the GIL (and not contiguous): numpy copies
    monkeypatch.setattr(cuda_driver, "HOLD_GIL_BYTES", 16)
    np.testing.assert_array_equal(cuda_driver.host_copy(buffer[:, ::2], CudaDriver(calls={})), buffer[:, ::2])


# -- one gather launch for a target's copies (ONEBOX_CUDA_COPY=gather), with a CPU "kernel" --------


class FakeGather:
    """Stands in for the gather kernel's launch: records each launch's segments and copies them."""

    def __init__(self, fail_at: int | None = None):
        self.launches: list[list[tuple[int, int, int]]] = []
        self.fail_at = fail_at

    def __call__(self, segments, stream: int) -> int:
        self.launches.append(list(segments))
        if self.fail_at is not None and len(self.launches) > self.fail_at:
            return 719  # CUDA_ERROR_LAUNCH_FAILED
        for target, source, nbytes in segments:
            ctypes.memmove(target, source, nbytes)
        return 0


def gathered_run(parts, covered: set[int], calls: dict):
    target = Target((sum(len(p) for p in parts), 3))
    copier = CudaDriver(calls=calls)
    copier.gather = True
    raw = RawTarget(
        copier, target.tensor.data_ptr(), tuple(target.tensor.shape), np.dtype(np.float32), 7,
        gather=copier.can("gather"),
    )  # fmt: skip

    def host():
        target.staging = torch.zeros(target.tensor.shape)
        return target.staging

    ids = {id(parts[i]) for i in covered}
    _copy_parts(parts, target, lambda p: id(p) in ids, host, raw)
    assert target.tensor.abs().sum() == 0, "nothing is copied before the flush"
    raw.flush()
    np.testing.assert_array_equal(target.tensor.numpy(), np.concatenate(parts))
    return target, copier


def test_with_gather_a_targets_copies_are_one_launch_in_row_order():
    parts = parts_of(1, 2, 1, 1, 2)
    gather, htod = FakeGather(), FakeDriver()
    target, copier = gathered_run(parts, {2}, {"htod": htod, "gather": gather})
    base, row = target.tensor.data_ptr(), 3 * 4
    staging = target.staging.data_ptr()
    assert gather.launches == [
        [(base, staging, 3 * row), (base + 3 * row, parts[2].ctypes.data, row), (base + 4 * row, staging + 4 * row, 3 * row)]
    ]  # fmt: skip
    assert htod.calls == [] and target.copies == []  # neither the driver's copies nor torch's
    assert copier.gathers == 1 and copier.gathered == 3 and copier.queued == 0


def test_more_parts_than_a_launch_takes_are_split_over_launches():
    from handlers.cuda_gather import MAX_SEGMENTS

    parts = parts_of(*([1] * (MAX_SEGMENTS + 5)))
    gather = FakeGather()
    _, copier = gathered_run(parts, set(range(len(parts))), {"htod": FakeDriver(), "gather": gather})
    assert [len(launch) for launch in gather.launches] == [MAX_SEGMENTS, 5]
    assert copier.gathers == 2 and copier.gathered == MAX_SEGMENTS + 5


def test_a_failed_launch_turns_the_gather_off_and_the_driver_copies_the_rest(caplog):
    from handlers.cuda_gather import MAX_SEGMENTS

    parts = parts_of(*([1] * (MAX_SEGMENTS + 3)))
    gather, htod = FakeGather(fail_at=1), FakeDriver()
    _, copier = gathered_run(parts, set(range(len(parts))), {"htod": htod, "gather": gather})
    assert len(gather.launches) == 2  # the first launch copied 64 parts, the second failed
    assert len(htod.calls) == 3 and copier.queued == 3
    assert not copier.can("gather") and copier.enabled  # the driver's copies stay on
    assert "CUDA error 719" in caplog.text


def test_a_copy_neither_way_can_queue_fails_the_batch():
    parts = parts_of(1, 1)
    copier = CudaDriver(calls={"htod": FakeDriver(fail_at=0), "gather": FakeGather(fail_at=0)})
    copier.gather = True
    tensor = torch.zeros((2, 3))
    raw = RawTarget(copier, tensor.data_ptr(), (2, 3), np.dtype(np.float32), 0, gather=True)
    assert raw.put(0, parts[0]) and raw.put(1, parts[1])
    with pytest.raises(RuntimeError, match="could not be queued"):
        raw.flush()


def test_without_a_gather_function_the_driver_copies_one_part_a_call():
    copier = CudaDriver(calls={"htod": FakeDriver()})
    copier.gather = True  # asked for, but there is no kernel
    assert not copier.can("gather")
    parts = parts_of(2, 1)
    _, copier = raw_run(parts, {0, 1}, FakeDriver())
    assert copier.queued == 2 and copier.gathers == 0


# -- the kernel's argument and grid (handlers.cuda_gather), checked without a GPU ----------------


def test_the_segment_table_is_laid_out_as_the_kernels_struct():
    from handlers import cuda_gather

    assert ctypes.sizeof(cuda_gather.Segment) == 24
    assert (
        ctypes.sizeof(cuda_gather.Table) == 24 * cuda_gather.MAX_SEGMENTS <= 4096
    )  # a kernel argument's limit
    assert f"#define ONEBOX_MAX_SEGMENTS {cuda_gather.MAX_SEGMENTS}\n" in cuda_gather.SOURCE
    table = cuda_gather.Table()
    cuda_gather.fill(table, [(1, 2, 3), (4, 5, 6)])
    words = (ctypes.c_uint64 * 6).from_buffer(table)
    assert list(words) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "count,largest,sms,blocks",
    [
        (18, 750_000, 132, 15),  # ~2 blocks a multiprocessor over 18 rows
        (1, 750_000, 132, 184),  # one segment: as many blocks as it has 16-byte loads for
        (1, 4096, 132, 1),  # a small segment needs one block
        (200, 750_000, 132, 2),
    ],
)
def test_blocks_per_segment(count, largest, sms, blocks):
    from handlers.cuda_gather import blocks_per_segment

    assert blocks_per_segment(count, largest, sms) == blocks


def test_the_kernel_compiles_with_nvrtc_for_a_hopper_gpu():
    from handlers import cuda_gather

    try:
        cuda_gather._nvrtc()
    except OSError:
        pytest.skip("needs NVRTC (libnvrtc, which CUDA builds of torch bring)")
    image = cuda_gather.compile_kernel("90")
    assert image[:4] == b"\x7fELF" and cuda_gather.KERNEL_NAME.encode() in image
    with pytest.raises(RuntimeError, match="could not compile"):
        cuda_gather.compile_kernel("1")  # no such architecture: NVRTC's log is in the error


def test_a_thread_without_the_devices_context_gets_it_made_current_and_the_call_made_again():
    # a batcher thread that never ran CUDA work through torch: the driver answers
    # CUDA_ERROR_INVALID_CONTEXT, where the path used to turn itself off for the process
    from handlers.cuda_driver import INVALID_CONTEXT

    current = set()
    copies = FakeDriver()

    def htod(*args):
        if "this thread" not in current:
            return INVALID_CONTEXT
        return copies(*args)

    def make_current(device_index):
        assert device_index == 2
        current.add("this thread")
        return True

    copier = CudaDriver(calls={"htod": htod})
    copier.device_index, copier.make_current = 2, make_current
    source, target = np.arange(6, dtype=np.float32), np.zeros(6, np.float32)
    assert copier.host_to_device(target.ctypes.data, source.ctypes.data, source.nbytes, 0)
    np.testing.assert_array_equal(target, source)
    assert copier.enabled and copier.queued == 1
    # a context that cannot be made current: the call fails as before, and the path goes off
    failing = CudaDriver(calls={"htod": lambda *args: INVALID_CONTEXT})
    failing.make_current = lambda index: False
    assert not failing.host_to_device(target.ctypes.data, source.ctypes.data, source.nbytes, 0)
    assert not failing.enabled
