"""Host memory registered with CUDA: the frontends' shared regions, read by the device directly.

A frontend writes each large request into its connection's shared region, which the host maps
(serving.ipc.protocol). Registered with ``cudaHostRegister`` (page-locked, so the copy engine
may read it), a request's rows are copied from there straight into device memory: the batch is
never joined on the host. Joining an 86-image ResNet-50 batch (13 MB) in pinned staging took
2.7 ms on one H200 host thread while the GPU waited (benchmarks/RESULTS.md).

A CUDA runner asks :meth:`PinnedRegions.holding` which arrays lie in registered memory and queues
its copies from them while holding it. Registration and retirement run on a thread of their own,
in the order the IPC server asked for them, never while a CUDA graph is being captured in this
process (:meth:`PinnedRegions.capturing`): ``cudaHostRegister`` and a device-wide synchronise
are calls a capture forbids, and one made from another thread mid-capture invalidated the graph
(error 900 on an H200; the AOTInductor model then failed with cuDNN errors). Until its
registration is done a region's rows are staged, as for memory that is not registered. A region
the IPC server retires (its connection closed, or a larger region replaced it) leaves the table
under the lock first, so no copy from it is queued later, then the device finishes what was
queued, then the region is unregistered and unmapped. A copy never reads memory that is no
longer registered.

torch is looked up in ``sys.modules``, never imported: a region mapped before the model loaded
CUDA stays unregistered (its rows are joined on the host, as before).
"""

from __future__ import annotations

import bisect
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

log = logging.getLogger(__name__)

# cudaHostRegisterPortable | cudaHostRegisterReadOnly: usable from every context, and the host
# maps a frontend's region read-only (without the flag such a mapping cannot be registered)
REGISTER_FLAGS = 0x01 | 0x08


class _Region:
    """One shared region on its way through registration and retirement."""

    __slots__ = ("address", "size", "region", "registered", "retired")

    def __init__(self, address: int, size: int, region):
        self.address, self.size, self.region = address, size, region  # region: keeps it mapped
        self.registered = False
        self.retired = False


class PinnedRegions:
    """The address ranges registered with CUDA in this process, and their registration.

    ``register(address, size) -> int`` and ``unregister(address) -> int`` (CUDA error codes, 0 for
    success) and ``synchronize()`` default to the CUDA runtime through torch; tests give others.
    """

    def __init__(
        self,
        register: Callable[[int, int], int] | None = None,
        unregister: Callable[[int], int] | None = None,
        synchronize: Callable[[], None] | None = None,
    ):
        self._register = register
        self._unregister = unregister
        self._synchronize = synchronize
        self.enabled = False
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted; _ends[i] belongs to _starts[i]
        self._ends: list[int] = []
        self._steps: queue.SimpleQueue | None = None  # the registrar thread's work
        self._gate = threading.Lock()  # held by a capture, and by each registration step
        self._kept: list[_Region] = []  # regions whose retirement could not wait for the device
        self.failures = 0  # registrations the driver refused (the first logged)

    @property
    def count(self) -> int:
        """Regions registered now."""
        return len(self._starts)

    def enable(self, device_index: int = 0) -> None:
        """Register regions from now on (a CUDA host), with ``device_index`` the device to wait for."""
        self._device_index = device_index
        self.enabled = True

    def pin(self, region) -> Callable[[], None] | None:
        """Register ``region`` (a writable-or-not buffer, such as an mmap) soon, on the registrar
        thread; the function returned retires it. None when registration is off or CUDA is not
        in use yet. A region the driver refuses is counted in ``failures`` and stays staged."""
        if not self.enabled or self._ops() is None:
            return None
        view = np.frombuffer(region, dtype=np.uint8)
        if view.nbytes == 0:
            return None
        entry = _Region(view.ctypes.data, view.nbytes, region)
        self._submit(self._register_now, entry)

        def retire() -> None:
            with self._lock:
                if entry.retired:
                    return
                entry.retired = True
                self._remove(entry)  # no copy from it is queued after this
            self._submit(self._retire_now, entry)

        return retire

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the registrations and retirements asked for so far are done."""
        done = threading.Event()
        self._submit(lambda _: done.set(), None)
        return done.wait(timeout)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Hold off registration and retirement while a CUDA graph is captured in this process."""
        with self._gate:
            yield

    @contextmanager
    def holding(self) -> Iterator[Callable[[np.ndarray], bool]]:
        """``covers(array)``: whether the C-contiguous ``array`` lies in registered memory.
        Queue the copies from such arrays inside the block: no region retires meanwhile."""
        with self._lock:
            yield self._covers

    def _covers(self, array: np.ndarray) -> bool:
        if not self._starts or not array.flags.c_contiguous:
            return False
        address = array.__array_interface__["data"][0]
        index = bisect.bisect(self._starts, address) - 1
        return index >= 0 and address + array.nbytes <= self._ends[index]

    def _remove(self, entry: _Region) -> None:  # under self._lock
        index = bisect.bisect_left(self._starts, entry.address)
        if index < len(self._starts) and self._starts[index] == entry.address:
            del self._starts[index], self._ends[index]

    def _submit(self, step: Callable[[_Region], None], entry: _Region) -> None:
        with self._lock:
            if self._steps is None:
                self._steps = queue.SimpleQueue()
                threading.Thread(target=self._registrar, name="pinned-registrar", daemon=True).start()
            self._steps.put((step, entry))

    def _registrar(self) -> None:
        """Registrations and retirements, one at a time, in the order they were asked for."""
        while True:
            step, entry = self._steps.get()
            try:
                with self._gate:  # never during a capture
                    step(entry)
            except Exception:
                log.exception("registering or retiring a shared region failed")

    def _register_now(self, entry: _Region) -> None:
        ops = self._ops()
        if entry.retired or ops is None:
            return
        error = ops[0](entry.address, entry.size)
        if error != 0:
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "could not register a %d-byte shared region with CUDA (error %d); requests "
                    "are joined on the host before their copy to the device",
                    entry.size,
                    error,
                )
            return
        entry.registered = True
        with self._lock:
            if not entry.retired:  # else its retirement, queued behind, unregisters it
                index = bisect.bisect(self._starts, entry.address)
                self._starts.insert(index, entry.address)
                self._ends.insert(index, entry.address + entry.size)

    def _retire_now(self, entry: _Region) -> None:
        if not entry.registered:
            entry.region = None
            return
        _, unregister, synchronize = self._ops()
        try:
            synchronize()  # copies from the region that were queued before it left the table
        except Exception:
            log.exception("waiting for the device before unregistering a shared region failed")
            self._kept.append(entry)  # registered and mapped still, rather than risk a copy
            return
        error = unregister(entry.address)
        if error != 0:
            log.warning("unregistering a shared region from CUDA failed (error %d)", error)
        entry.region = None  # the mapping may go now

    def _ops(self):
        if self._register is not None:
            return self._register, self._unregister, self._synchronize
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return None
        cudart = torch.cuda.cudart()
        index = getattr(self, "_device_index", 0)
        return (
            lambda address, size: int(cudart.cudaHostRegister(address, size, REGISTER_FLAGS)),
            lambda address: int(cudart.cudaHostUnregister(address)),
            lambda: torch.cuda.synchronize(index),
        )


#: this process's registered regions: the host enables it, CUDA runners consult it
REGIONS = PinnedRegions()
