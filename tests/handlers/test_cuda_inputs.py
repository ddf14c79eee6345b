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

from handlers.cuda_driver import CudaDriver, RawTarget, copy_on_device, record_event, wait_event  # noqa: E402
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


# -- a thread with no context current (CudaDriver.make_current) ---------------------------------


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


# -- a twin lane's hand-over: event record, stream wait, device-to-device copy ---------------------


class FakeStream:
    cuda_stream = 0x5E

    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


class FakeEvent:
    def __init__(self, handle):
        self.cuda_event = handle  # torch's is 0 until the event's first record creates it
        self.recorded = []

    def record(self, stream):
        self.recorded.append(stream)


def test_a_twins_event_is_recorded_and_waited_for_by_the_driver_once_it_exists():
    calls = []
    driver = CudaDriver(
        calls={
            "event": lambda *a: calls.append(("event", *a)) or 0,
            "wait": lambda *a: calls.append(("wait", *a)) or 0,
        }
    )
    stream, new, made = FakeStream(), FakeEvent(0), FakeEvent(0xE7)
    record_event(new, stream, driver)
    wait_event(stream, new, driver)
    assert new.recorded == [stream] and stream.waited == [new] and calls == []  # torch creates it
    record_event(made, stream, driver)
    wait_event(stream, made, driver)
    assert calls == [("event", 0xE7, 0x5E), ("wait", 0x5E, 0xE7, 0)]
    assert made.recorded == [] and stream.waited == [new]


def test_a_twins_inputs_go_into_the_graphs_by_the_driver_when_they_match():
    copies = []

    def dtod(target, source, nbytes, stream):
        copies.append((nbytes, stream))
        ctypes.memmove(target, source, nbytes)
        return 0

    driver = CudaDriver(calls={"dtod": dtod})
    source = torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)
    target = torch.zeros(2, 3, 4, dtype=torch.float16)
    copy_on_device(target, source, FakeStream(), driver)
    assert torch.equal(target, source) and copies == [(48, 0x5E)]
    # not contiguous, or another dtype: torch copies (and casts), the driver is not asked
    target = torch.zeros(2, 3, 4, dtype=torch.float32)
    copy_on_device(target, source, FakeStream(), driver)
    copy_on_device(target[:, :, :2], source[:, :, ::2], FakeStream(), driver)
    assert torch.equal(target[:, :, 2:], source[:, :, 2:].float()) and len(copies) == 1
    assert torch.equal(target[:, :, :2], source[:, :, ::2].float())
