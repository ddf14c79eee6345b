"""Host memory registered with CUDA: the frontends' shared regions, read by the device directly.

A frontend writes each large request into its connection's shared region, which the host maps
(serving.ipc.protocol). Registered with ``cudaHostRegister`` (page-locked, so the copy engine
may read it), a request's rows are copied from there straight into device memory: the batch is
never joined on the host. Joining an 86-image ResNet-50 batch (13 MB) in pinned staging took
2.7 ms on one H200 host thread while the GPU waited (benchmarks/RESULTS.md).

A CUDA runner asks :meth:`PinnedRegions.holding` which arrays lie in registered memory and queues
its copies from them while holding it. A region the IPC server retires (its connection closed,
or a larger region replaced it) is unregistered on a thread of its own: it leaves the table
under that lock, so no copy from it is queued later, then the device finishes what was queued,
then the region is unregistered and unmapped. A copy never reads memory that is no longer
registered.

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
        self._retiring: queue.SimpleQueue | None = None
        self.failures = 0  # registrations the driver refused (each logged once)

    @property
    def count(self) -> int:
        """Regions registered now."""
        return len(self._starts)

    def enable(self, device_index: int = 0) -> None:
        """Register regions from now on (a CUDA host), with ``device_index`` the device to wait for."""
        self._device_index = device_index
        self.enabled = True

    def pin(self, region) -> Callable[[], None] | None:
        """Register ``region`` (a writable-or-not buffer, such as an mmap); the function returned
        retires it. None when registration is off, CUDA is not in use yet, or the driver refuses."""
        if not self.enabled:
            return None
        ops = self._ops()
        if ops is None:
            return None
        register, _, _ = ops
        view = np.frombuffer(region, dtype=np.uint8)
        address, size = view.ctypes.data, view.nbytes
        if size == 0:
            return None
        error = register(address, size)
        if error != 0:
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "could not register a %d-byte shared region with CUDA (error %d); requests "
                    "are joined on the host before their copy to the device",
                    size,
                    error,
                )
            return None
        with self._lock:
            index = bisect.bisect(self._starts, address)
            self._starts.insert(index, address)
            self._ends.insert(index, address + size)
        retired = threading.Event()

        def retire() -> None:
            if not retired.is_set():
                retired.set()
                self._retire_later(address, region)

        return retire

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

    def _retire_later(self, address: int, region) -> None:
        with self._lock:
            index = bisect.bisect_left(self._starts, address)
            if index < len(self._starts) and self._starts[index] == address:
                del self._starts[index], self._ends[index]
            if self._retiring is None:
                self._retiring = queue.SimpleQueue()
                threading.Thread(target=self._retire_loop, name="pinned-retire", daemon=True).start()
            self._retiring.put((address, region))

    def _retire_loop(self) -> None:
        while True:
            address, region = self._retiring.get()
            ops = self._ops()
            if ops is None:
                continue
            _, unregister, synchronize = ops
            try:
                synchronize()  # copies from the region that were queued before it left the table
            except Exception:
                log.exception("waiting for the device before unregistering a shared region failed")
                continue  # keep it registered (and mapped: this holds it) rather than risk a copy
            error = unregister(address)
            if error != 0:
                log.warning("unregistering a shared region from CUDA failed (error %d)", error)
            del region  # the mapping may go now

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
