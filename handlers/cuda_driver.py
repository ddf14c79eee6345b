"""CUDA work queued by the driver with the GIL held: copies, graph launches, event records and waits.

torch's CUDA calls release the GIL and take it back, and in a model host each retake waits up
to the switch interval while the reader and answer threads run Python. A driver call through
``ctypes.PyDLL`` keeps the GIL for the microseconds it takes to queue. Queuing a batch's ~18
copies beside a busy Python thread took 0.17 ms this way against 24 ms through ``Tensor.copy_``;
served throughput on an H200 did not move measurably (benchmarks/RESULTS.md, sixteenth and
seventeenth sessions). ``ONEBOX_CUDA_COPY=torch`` turns the path off (``DRIVER.enabled``).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)


#: the driver calls :class:`CudaDriver` queues: name -> (symbol, argument types)
_CALLS = {
    "htod": ("cuMemcpyHtoDAsync_v2", (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)),
    "dtoh": ("cuMemcpyDtoHAsync_v2", (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)),
    "dtod": ("cuMemcpyDtoDAsync_v2", (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)),
    "graph": ("cuGraphLaunch", (ctypes.c_void_p, ctypes.c_void_p)),
    "event": ("cuEventRecord", (ctypes.c_void_p, ctypes.c_void_p)),
    "wait": ("cuStreamWaitEvent", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)),
}


class CudaDriver:
    """A batch's CUDA work queued by the driver, holding the GIL (``ctypes.PyDLL``).

    Copies (host to device, device to host, device to device), graph launches and event records:
    each is queued in microseconds, so keeping the GIL costs the host's other threads nothing,
    while torch's calls release it and take it back, a wait of up to the switch interval each
    time another thread runs Python. Copies to or from the host only for page-locked memory
    (registered regions, pinned buffers): from pageable memory the driver would copy
    synchronously, GIL held. The calling thread must have the device's context current, as a
    thread that ran CUDA work through torch has; on a thread that has none (a call answered
    ``CUDA_ERROR_INVALID_CONTEXT``) the device's primary context, the one torch uses, is made
    current and the call made again. A call that fails turns the driver path off for the
    process (logged once); that call and every later one go through torch.
    """

    def __init__(self, enabled: bool = True, calls: dict[str, Callable[..., int]] | None = None):
        """``calls``: name (``htod``, ``dtoh``, ``dtod``, ``graph``, ``event``, ``wait``) -> a function
        returning a ``CUresult``, instead of the driver's (tests give ones that copy between
        CPU buffers); a name left out is not queued by the driver."""
        self.enabled = enabled  # the host sets it from Settings.cuda_copy
        self.device_index = 0  # the host's device, whose primary context a call may need
        self._calls = calls
        # what makes the device's context current on a thread that has none (tests give theirs)
        self.make_current: Callable[[int], bool] | None = make_current if calls is None else None
        self.queued = 0  # copies the driver took
        self.launched = 0  # graph launches and event records the driver took

    @classmethod
    def load(cls) -> CudaDriver | None:
        """A driver with its library loaded now; None where there is none."""
        driver = cls()
        return driver if driver._functions() else None

    def _functions(self) -> dict:
        if self._calls is None:
            self._calls = {}
            try:
                library = ctypes.PyDLL("libcuda.so.1")
                for name, (symbol, argtypes) in _CALLS.items():
                    function = getattr(library, symbol)
                    function.argtypes, function.restype = list(argtypes), ctypes.c_int
                    self._calls[name] = function
            except (OSError, AttributeError):
                self._calls = {}
                log.info("the CUDA driver library is not loadable: CUDA work goes through torch")
        return self._calls

    def can(self, name: str) -> bool:
        """Whether the driver queues calls of this kind now."""
        return self.enabled and name in self._functions()

    def target(self, tensor) -> RawTarget | None:
        """``tensor`` (a CUDA tensor, rows on its first axis) as a target of raw copies on the
        current stream, or None when the driver path cannot fill it."""
        if not self.can("htod") or not tensor.is_contiguous() or tensor.ndim == 0:
            return None
        dtype = _numpy_dtype(tensor.dtype)
        if dtype is None or len(tensor) == 0:
            return None
        import torch

        stream = torch.cuda.current_stream(tensor.device).cuda_stream
        return RawTarget(self, tensor.data_ptr(), tuple(tensor.shape), dtype, stream)

    def host_to_device(self, device_address: int, host_address: int, nbytes: int, stream: int) -> bool:
        """Queue one copy on ``stream`` (a raw handle, from a :meth:`target`); False, and the path
        off, when it fails."""
        return self._queue("htod", device_address, host_address, nbytes, stream)

    def device_to_host(self, host_address: int, device_address: int, nbytes: int, stream: int) -> bool:
        """Queue one copy into page-locked host memory on ``stream``."""
        return self._queue("dtoh", host_address, device_address, nbytes, stream)

    def device_to_device(self, target: int, source: int, nbytes: int, stream: int) -> bool:
        """Queue one copy between device addresses on ``stream``."""
        return self._queue("dtod", target, source, nbytes, stream)

    def launch_graph(self, graph_exec: int, stream: int) -> bool:
        """Launch an instantiated graph (``cudaGraphExec_t``) on ``stream``."""
        return self._queue("graph", graph_exec, stream, count="launched")

    def record(self, event: int, stream: int) -> bool:
        """Record an event (a ``cudaEvent_t`` torch created) on ``stream``."""
        return self._queue("event", event, stream, count="launched")

    def wait(self, stream: int, event: int) -> bool:
        """Make ``stream`` wait (on the device) for an event recorded on another stream."""
        return self._queue("wait", stream, event, 0, count="launched")

    def _queue(self, name: str, *args, count: str = "queued") -> bool:
        if not self.can(name):  # off, or turned off by a failure earlier in this batch
            return False
        error = self._calls[name](*args)
        if (
            error == INVALID_CONTEXT
            and self.make_current is not None
            and self.make_current(self.device_index)
        ):
            error = self._calls[name](*args)  # a thread that had never used the device
        if error != 0:
            self.enabled = False
            log.warning(
                "%s failed (CUDA error %d): CUDA work goes through torch from now on", _CALLS[name][0], error
            )
            return False
        setattr(self, count, getattr(self, count) + 1)
        return True


#: CUDA_ERROR_INVALID_CONTEXT: the calling thread has no context current
INVALID_CONTEXT = 201
_contexts: dict[int, ctypes.c_void_p] = {}


def make_current(device_index: int) -> bool:
    """Make the device's primary context (the CUDA runtime's, so torch's) current on this thread."""
    try:
        cuda = ctypes.PyDLL("libcuda.so.1")
    except OSError:
        return False
    context = _contexts.get(device_index)
    if context is None:
        device, context = ctypes.c_int(), ctypes.c_void_p()
        if cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0:
            return False
        if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) != 0:  # held for good
            return False
        _contexts[device_index] = context
    return cuda.cuCtxSetCurrent(context) == 0


class RawTarget:
    """A contiguous device tensor that rows are copied into by the driver."""

    __slots__ = ("copier", "address", "rows", "row_shape", "row_bytes", "dtype", "stream")

    def __init__(self, copier: CudaDriver, address: int, shape: tuple, dtype: np.dtype, stream: int):
        self.copier, self.address, self.dtype, self.stream = copier, address, dtype, stream
        self.rows, self.row_shape = shape[0], shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize

    def put(self, row: int, source: np.ndarray) -> bool:
        """Queue ``source`` (C-contiguous, page-locked, its rows shaped as the target's) into the
        target from ``row`` on; False when the driver did not take it (torch then copies it, and
        refuses what does not fit as it always did)."""
        if (
            source.dtype != self.dtype
            or source.shape[1:] != self.row_shape
            or row < 0
            or row + len(source) > self.rows
            or not source.flags.c_contiguous
        ):
            return False
        return self.copier.host_to_device(
            self.address + row * self.row_bytes, source.ctypes.data, source.nbytes, self.stream
        )


_NUMPY_DTYPES: dict = {}


def _numpy_dtype(torch_dtype) -> np.dtype | None:
    """numpy's dtype for a torch dtype; None for those numpy lacks (bfloat16)."""
    if torch_dtype not in _NUMPY_DTYPES:
        import torch

        try:
            _NUMPY_DTYPES[torch_dtype] = torch.empty(0, dtype=torch_dtype).numpy().dtype
        except TypeError:
            _NUMPY_DTYPES[torch_dtype] = None
    return _NUMPY_DTYPES[torch_dtype]


#: the copier of this process's CUDA runners (on unless Settings.cuda_copy is ``torch``)
DRIVER = CudaDriver()


def record_event(event, stream, driver: CudaDriver = DRIVER) -> None:
    """Record ``event`` (a ``torch.cuda.Event``) on ``stream``: by the driver once torch has
    created the event (at its first record), else by torch."""
    handle = getattr(event, "cuda_event", 0)
    if not (handle and driver.record(handle, stream.cuda_stream)):
        event.record(stream)


def wait_event(stream, event, driver: CudaDriver = DRIVER) -> None:
    """Make ``stream`` wait for ``event`` on the device: by the driver once the event exists."""
    handle = getattr(event, "cuda_event", 0)
    if not (handle and driver.wait(stream.cuda_stream, handle)):
        stream.wait_event(event)


def copy_on_device(target, source, stream, driver: CudaDriver = DRIVER) -> None:
    """``target.copy_(source)`` on ``stream`` for two CUDA tensors: by the driver (GIL held) when
    both are contiguous and of one dtype and size, else by torch."""
    if not (
        target.dtype == source.dtype
        and target.shape == source.shape
        and target.is_contiguous()
        and source.is_contiguous()
        and driver.device_to_device(
            target.data_ptr(), source.data_ptr(), target.numel() * target.element_size(), stream.cuda_stream
        )
    ):
        target.copy_(source)


#: outputs up to this size are copied out of pinned memory holding the GIL (``host_copy``)
HOLD_GIL_BYTES = 4 << 20
_memcpy = None


def host_copy(array: np.ndarray, driver: CudaDriver = DRIVER) -> np.ndarray:
    """A copy of ``array`` (a batch's outputs in a pinned buffer that the next batch reuses).

    With the driver path on, one of up to ``HOLD_GIL_BYTES`` is copied by libc's ``memcpy``
    through ``ctypes.PyDLL``, holding the GIL: numpy releases it for the copy of a large array,
    and the batcher then waits to take it back from the host's other threads while the device
    waits for the next batch. A larger one is copied by numpy.
    """
    global _memcpy
    if not driver.enabled or array.nbytes > HOLD_GIL_BYTES or not array.flags.c_contiguous:
        return array.copy()
    if _memcpy is None:
        _memcpy = ctypes.PyDLL(None).memcpy
        _memcpy.argtypes, _memcpy.restype = (
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t],
            ctypes.c_void_p,
        )
    copy = np.empty_like(array)
    _memcpy(copy.ctypes.data, array.ctypes.data, array.nbytes)
    return copy
