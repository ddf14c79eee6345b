"""Requests' rows queued for the device as they arrive (handlers.cuda_prefetch), checked on CPU.

The "device" is a numpy buffer and the driver's copies are ``memmove``s, so which rows go where,
which ring space is given up when, and which batch parts are read from the ring rather than the
host are checked on any machine. tests/handlers/test_cuda_rows.py runs the same on a GPU.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager

import numpy as np
import pytest

from handlers import cuda_prefetch
from handlers.cuda_driver import CudaDriver, RawTarget
from handlers.cuda_prefetch import Prefetched, Prefetcher, _Ring

ROW = (4,)  # float32 rows of 16 bytes


class Regions:
    """Stands in for the registered-regions table: arrays in ``registered`` are covered."""

    def __init__(self):
        self.registered: list[np.ndarray] = []

    @contextmanager
    def holding(self):
        def covers(array):
            address = array.__array_interface__["data"][0]
            return any(
                r.ctypes.data <= address and address + array.nbytes <= r.ctypes.data + r.nbytes
                for r in self.registered
            )

        yield covers


class Driver:
    """The driver calls as CPU copies, each one recorded."""

    def __init__(self):
        self.log: list[tuple] = []

    def calls(self) -> dict:
        def copy(name):
            def call(target, source, nbytes, stream):
                self.log.append((name, target, source, nbytes, stream))
                ctypes.memmove(target, source, nbytes)
                return 0

            return call

        def event(name):
            def call(*args):
                self.log.append((name, *args))
                return 0

            return call

        return {
            "htod": copy("htod"),
            "dtod": copy("dtod"),
            "event": event("event"),
            "wait": event("wait"),
            "use_context": event("use_context"),
        }


@pytest.fixture
def setup():
    driver = Driver()
    copier = CudaDriver(calls=driver.calls())
    regions = Regions()
    prefetcher = Prefetcher(stream=11, event=22, context=0, driver=copier, regions=regions)
    ring = np.zeros((8, *ROW), np.float32)  # the "device" ring: 8 rows
    prefetcher.add_ring((ROW, ring.dtype.str), ring.ctypes.data, len(ring), 16, keep=ring)
    region = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)  # a "registered" frontend region
    regions.registered.append(region)
    return prefetcher, ring, region, driver, copier


def test_a_request_in_registered_memory_is_copied_into_the_ring_and_carries_its_entry(setup):
    prefetcher, ring, region, driver, _ = setup
    request = region[10:13]
    queued = prefetcher.prefetch(request)
    assert isinstance(queued, Prefetched) and queued.entry is not None
    np.testing.assert_array_equal(queued, request)  # the same rows, not a copy of them
    assert queued.ctypes.data == request.ctypes.data
    np.testing.assert_array_equal(ring[:3], request)  # and on the "device"
    assert driver.log == [("htod", ring.ctypes.data, request.ctypes.data, 48, 11)]  # on the ring's stream
    assert queued[1:].entry is queued.entry  # a request split over batches keeps it


@pytest.mark.parametrize(
    "array",
    [
        np.ones((3, 4), np.float32),  # plain memory: no copy without waiting
        np.ones((3, 5), np.float32),  # rows of a shape with no ring
        np.ones((3, 4), np.float64),  # another dtype
    ],
    ids=["unregistered", "shape", "dtype"],
)
def test_what_cannot_be_queued_ahead_is_returned_as_it_is(setup, array):
    prefetcher, _, region, driver, _ = setup
    assert prefetcher.prefetch(array) is array
    strided = region[::2]  # registered, but not contiguous
    assert prefetcher.prefetch(strided) is strided
    assert driver.log == []


def test_the_ring_is_reused_oldest_first_and_never_under_a_batch_in_flight(setup):
    prefetcher, ring, region, _, _ = setup
    a = prefetcher.prefetch(region[0:3])  # ring rows 0-2
    b = prefetcher.prefetch(region[3:6])  # 3-5
    readers: list = []
    with prefetcher.reading(stream=5, readers=readers) as source:
        assert source(a) == ring.ctypes.data  # a launched batch reads a
    c = prefetcher.prefetch(region[6:9])  # needs 3 rows: 6-7 are too few, and a is still read
    assert not isinstance(c, Prefetched)
    assert a.entry.valid and b.entry.valid
    prefetcher.release(readers)  # the batch was collected
    c = prefetcher.prefetch(region[6:9])  # rows 0-2 again: a's space is given up
    assert isinstance(c, Prefetched) and c.entry.start == 0
    assert not a.entry.valid and b.entry.valid
    np.testing.assert_array_equal(ring[0:3], region[6:9])
    with prefetcher.reading(stream=5, readers=[]) as source:
        assert source(a) is None  # a (still queued, say) is copied from the host instead
        assert source(b) == ring.ctypes.data + 3 * 16


def test_ring_allocation_wraps_and_gives_up_entries_in_order():
    ring = _Ring(address=0, rows=10, row_bytes=1)
    starts = []
    for rows in (4, 4, 3, 2, 5, 10, 11):
        start = ring.allocate(rows)
        starts.append(start)
        if start is not None:
            entry = cuda_prefetch._Entry(0, start, rows, start, rows)
            ring.entries.append(entry)
    # 0-3 and 4-7; 3 rows fit neither after 7 nor before 4 until 0-3 is given up; 2 rows fit
    # only once 4-7 is given up too; then 5-9; 10 rows need every entry given up; 11 never fit
    assert starts == [0, 4, 0, 3, 5, 0, None]
    assert [(e.start, e.rows) for e in ring.entries] == [(0, 10)]


def test_a_batch_reads_parts_lying_end_to_end_in_the_ring_with_one_device_copy(setup):
    from handlers.cuda_inputs import _copy_parts

    torch = pytest.importorskip("torch")
    prefetcher, ring, region, driver, copier = setup
    parts = [prefetcher.prefetch(region[0:2]), prefetcher.prefetch(region[2:3]), region[40:42]]
    late = prefetcher.prefetch(region[3:5])
    late.entry.valid = False  # its space went to a later request: copied from the host instead
    parts.insert(2, late)
    driver.log.clear()
    target = torch.zeros((7, 4))
    raw = RawTarget(copier, target.data_ptr(), tuple(target.shape), np.dtype(np.float32), 9)
    readers: list = []
    with prefetcher.reading(9, readers) as source:
        _copy_parts(parts, target, lambda p: True, lambda: None, raw, source)
    np.testing.assert_array_equal(target.numpy(), np.concatenate(parts))
    base = target.data_ptr()
    assert (
        driver.log
        == [
            ("event", 22, 11),  # the ring's copies so far, marked on its stream
            ("wait", 9, 22, 0),  # and waited for by the batch's stream, once
            ("htod", base + 3 * 16, late.ctypes.data, 2 * 16, 9),  # the one whose space was given up
            ("htod", base + 5 * 16, region[40:42].ctypes.data, 2 * 16, 9),  # never queued ahead
            ("dtod", base, ring.ctypes.data, 3 * 16, 9),  # the two requests end to end in the ring
        ]
    )
    assert [e.readers for e in readers] == [1, 1]
    prefetcher.release(readers)
    assert readers == [] and parts[0].entry.readers == 0
