"""The table of memory registered with CUDA, and the order in which a region is retired.

Registration itself is CUDA's (tests/handlers/test_cuda_rows.py registers real regions); here
the CUDA calls are recorded fakes, so the bookkeeping is checked on any machine. Registration
runs on the table's own thread: a test waits for it (``pinned``) before it looks.
"""

from __future__ import annotations

import mmap
import threading
import time

import numpy as np
import pytest

from handlers.host_memory import PinnedRegions


class FakeCuda:
    def __init__(self, refuse: bool = False):
        self.calls: list[tuple] = []
        self.refuse = refuse
        self.synced = threading.Event()

    def register(self, address: int, size: int) -> int:
        self.calls.append(("register", address, size))
        return 1 if self.refuse else 0

    def unregister(self, address: int) -> int:
        self.calls.append(("unregister", address))
        return 0

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))
        self.synced.set()


def regions(cuda: FakeCuda, enabled: bool = True) -> PinnedRegions:
    table = PinnedRegions(cuda.register, cuda.unregister, cuda.synchronize)
    if enabled:
        table.enable(0)
    return table


def address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).ctypes.data


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def pinned(table: PinnedRegions, region):
    """Pin ``region`` and wait until the registrar thread has dealt with it."""
    retire = table.pin(region)
    assert table.flush(5)
    return retire


def test_arrays_inside_a_registered_region_are_covered_and_others_are_not():
    cuda = FakeCuda()
    table = regions(cuda)
    region = mmap.mmap(-1, 1 << 16)
    assert pinned(table, region) is not None
    assert cuda.calls == [("register", address(region), 1 << 16)]
    inside = np.frombuffer(region, np.uint8, count=4096, offset=1024).reshape(4, 1024)
    whole = np.frombuffer(region, np.uint8)
    elsewhere = np.zeros((4, 1024), np.uint8)
    with table.holding() as covers:
        assert covers(inside) and covers(whole) and covers(inside[1:3])
        assert not covers(elsewhere)
        assert not covers(inside[:, ::2])  # not contiguous: cannot be copied as it lies


def test_an_array_running_past_the_end_of_a_region_is_not_covered():
    table = regions(FakeCuda())
    backing = mmap.mmap(-1, 1 << 16)
    # register only the first half of a mapping; an array over the boundary is not covered
    first = memoryview(backing)[: 1 << 15]
    pinned(table, first)
    across = np.frombuffer(backing, np.uint8, count=1024, offset=(1 << 15) - 512)
    below = np.frombuffer(backing, np.uint8, count=1024, offset=0)
    with table.holding() as covers:
        assert covers(below) and not covers(across)
    del first, across, below


def test_nothing_is_registered_when_disabled_or_refused():
    cuda = FakeCuda()
    assert regions(cuda, enabled=False).pin(mmap.mmap(-1, 4096)) is None
    assert cuda.calls == []
    refused = FakeCuda(refuse=True)
    table = regions(refused)
    region = mmap.mmap(-1, 4096)
    pinned(table, region)
    assert table.failures == 1 and table.count == 0
    with table.holding() as covers:
        assert not covers(np.frombuffer(region, np.uint8))


def test_without_cuda_in_the_process_nothing_is_registered():
    table = PinnedRegions()  # the real CUDA calls, through torch if CUDA is initialised
    table.enable(0)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU tests register real regions")
    assert table.pin(mmap.mmap(-1, 4096)) is None


def test_a_retired_region_leaves_the_table_then_the_device_is_waited_for_then_it_is_unregistered():
    cuda = FakeCuda()
    table = regions(cuda)
    region = mmap.mmap(-1, 8192)
    start = address(region)
    view = np.frombuffer(region, np.uint8)
    retire = pinned(table, region)
    with table.holding() as covers:
        assert covers(view)
        # the I/O thread retires it while a runner holds the table: the retirement waits
        threading.Thread(target=retire, daemon=True).start()
        time.sleep(0.05)
        assert ("synchronize",) not in cuda.calls  # nothing queued from it can be missed
    wait_for(lambda: ("unregister", start) in cuda.calls)
    assert cuda.calls == [("register", start, 8192), ("synchronize",), ("unregister", start)]
    with table.holding() as covers:
        assert not covers(view)
    retire()  # twice is once
    time.sleep(0.05)
    assert cuda.calls.count(("unregister", start)) == 1


def test_a_failed_wait_for_the_device_keeps_the_region_registered():
    cuda = FakeCuda()

    def broken() -> None:
        cuda.calls.append(("synchronize",))
        raise RuntimeError("device lost")

    table = PinnedRegions(cuda.register, cuda.unregister, broken)
    table.enable(0)
    region = mmap.mmap(-1, 4096)
    pinned(table, region)()
    wait_for(lambda: ("synchronize",) in cuda.calls)
    time.sleep(0.05)
    assert [c[0] for c in cuda.calls] == ["register", "synchronize"]


def test_registration_waits_while_a_cuda_graph_is_captured():
    # cudaHostRegister from another thread during a capture invalidates the capture (error 900)
    cuda = FakeCuda()
    table = regions(cuda)
    region = mmap.mmap(-1, 8192)
    with table.capturing():
        retire = table.pin(region)
        time.sleep(0.1)
        assert cuda.calls == []  # asked for, not done: its rows are staged meanwhile
        with table.holding() as covers:
            assert not covers(np.frombuffer(region, np.uint8))
    wait_for(lambda: table.count == 1)
    assert cuda.calls == [("register", address(region), 8192)]
    with table.capturing():
        retire()
        time.sleep(0.1)
        assert table.count == 0  # out of the table at once: no copy from it is queued
        assert [c[0] for c in cuda.calls] == ["register"]  # but no synchronise mid-capture
    wait_for(lambda: ("unregister", address(region)) in cuda.calls)
    assert [c[0] for c in cuda.calls] == ["register", "synchronize", "unregister"]


def test_a_region_retired_before_its_registration_ran_is_never_registered():
    cuda = FakeCuda()
    table = regions(cuda)
    first, second = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    with table.capturing():
        table.pin(first)()  # a connection that came and went during a capture
        table.pin(second)
    assert table.flush(5)
    assert cuda.calls == [("register", address(second), 4096)]
    with table.holding() as covers:
        assert covers(np.frombuffer(second, np.uint8)) and not covers(np.frombuffer(first, np.uint8))
