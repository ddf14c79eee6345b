"""A CUDA batch's inputs onto the device: each request's rows copied from where they lie.

A batch reaches the runner as :class:`~serving.types.Rows` (one part per request, not joined) or
as arrays. Every part that lies in memory registered with CUDA (a frontend's shared region:
handlers.host_memory) is copied from there by the copy engine, with no host copy at all; the
others are gathered in the lane's pinned staging buffer, one copy per run of such rows. They go
straight into a graph's static inputs on the lane's stream, except for twin lanes (two batches
launched on one stream, ``pipeline_depth = 2``): a twin copies on a copy stream of its own into
its own buffers, overlapping the other twin's batch, and the stream waits for an event before
the graph's inputs are filled from them on the device. Padding rows repeat the last real row,
copied on the device.

The copies are queued through the CUDA driver (:class:`CudaDriver`: ``cuMemcpyHtoDAsync`` by
``ctypes.PyDLL``), which keeps the GIL for the microseconds a queued copy takes; ``Tensor.copy_``
releases and retakes it for each copy. Queuing a batch's ~18 copies beside a busy Python thread
took 0.17 ms against 24 ms that way, but served throughput on an H200 did not move: the host's
other threads mostly wait in I/O (benchmarks/RESULTS.md, sixteenth session). The runner
(handlers.torch_common) queues the rest of a graphed batch through the same driver: the graph
launch, the copies out and the event records.
A copy the driver path cannot take (another dtype, a target that is not contiguous, no driver
library, a call that fails) goes through ``Tensor.copy_`` as before.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import numpy as np

from handlers.host_memory import REGIONS, PinnedRegions
from serving.types import Rows

log = logging.getLogger(__name__)

#: ``staging(slot, shape, dtype)``: the lane's pinned host tensor for this input slot and shape
Staging = Callable[[int, tuple, np.dtype], object]


#: the driver calls :class:`CudaDriver` queues: name -> (symbol, argument types)
_CALLS = {
    "htod": ("cuMemcpyHtoDAsync_v2", (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)),
    "dtoh": ("cuMemcpyDtoHAsync_v2", (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)),
    "dtod": ("cuMemcpyDtoDAsync_v2", (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)),
    "graph": ("cuGraphLaunch", (ctypes.c_void_p, ctypes.c_void_p)),
    "event": ("cuEventRecord", (ctypes.c_void_p, ctypes.c_void_p)),
}


class CudaDriver:
    """A batch's CUDA work queued by the driver, holding the GIL (``ctypes.PyDLL``).

    Copies (host to device, device to host, device to device), graph launches and event records:
    each is queued in microseconds, so keeping the GIL costs the host's other threads nothing,
    while torch's calls release it and take it back, a wait of up to the switch interval each
    time another thread runs Python. Copies to or from the host only for page-locked memory
    (registered regions, pinned buffers): from pageable memory the driver would copy
    synchronously, GIL held. The calling thread must have the device's context current, as a
    thread that ran CUDA work through torch has. A call that fails turns the driver path off
    for the process (logged once); that call and every later one go through torch.
    """

    def __init__(self, enabled: bool = True, calls: dict[str, Callable[..., int]] | None = None):
        """``calls``: name (``htod``, ``dtoh``, ``dtod``, ``graph``, ``event``) -> a function
        returning a ``CUresult``, instead of the driver's (tests give ones that copy between
        CPU buffers); a name left out is not queued by the driver."""
        self.enabled = enabled  # the host sets it from Settings.cuda_copy
        self._calls = calls
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

    def target(self, tensor) -> _RawTarget | None:
        """``tensor`` (a CUDA tensor, rows on its first axis) as a target of raw copies on the
        current stream, or None when the driver path cannot fill it."""
        if not self.can("htod") or not tensor.is_contiguous() or tensor.ndim == 0:
            return None
        dtype = _numpy_dtype(tensor.dtype)
        if dtype is None or len(tensor) == 0:
            return None
        import torch

        stream = torch.cuda.current_stream(tensor.device).cuda_stream
        return _RawTarget(self, tensor.data_ptr(), tuple(tensor.shape), dtype, stream)

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

    def _queue(self, name: str, *args, count: str = "queued") -> bool:
        if not self.can(name):  # off, or turned off by a failure earlier in this batch
            return False
        error = self._calls[name](*args)
        if error != 0:
            self.enabled = False
            log.warning(
                "%s failed (CUDA error %d): CUDA work goes through torch from now on", _CALLS[name][0], error
            )
            return False
        setattr(self, count, getattr(self, count) + 1)
        return True


class _RawTarget:
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


class Lane:
    """What one batch in flight owns on a GPU: streams, buffers, captured graphs.

    A lane is used by one batch at a time and taken again only after that batch was collected,
    so its pinned and device buffers are never overwritten while a queued copy still reads them,
    and its graphs' static buffers never hold two batches.
    """

    __slots__ = (
        "stream", "staging", "graphs", "pool", "done", "spun", "copy_stream", "copied", "inputs", "outputs",
    )  # fmt: skip

    def __init__(self, stream, pool, done, copy_stream=None, copied=None, spun=None):
        self.stream = stream  # None: the device's current stream (one lane, the old behaviour)
        self.staging: dict[tuple, object] = {}
        self.graphs: dict[tuple, tuple] = {}
        self.pool = pool  # the memory pool this lane's graphs share (they never replay at once)
        self.done = done  # a blocking-sync CUDA event: waiting on it sleeps instead of spinning
        # a spinning event, for a lane whose stream may hold the next batch too (a twin's)
        self.spun = spun
        # a twin's: its copies in run here, beside the other twin's batch (None: on ``stream``)
        self.copy_stream = copy_stream
        self.copied = copied  # recorded on copy_stream after this lane's copies
        # device buffers per (slot, non-batch shape, dtype), as many rows as the largest batch yet
        self.inputs: dict[tuple, object] = {}
        # pinned host buffers a graph's outputs are copied into, per graph key (driver path)
        self.outputs: dict[tuple, list] = {}


def device_inputs(
    lane: Lane,
    arrays: list,
    device,
    staging: Staging,
    into: list | None = None,
    regions: PinnedRegions = REGIONS,
    driver: CudaDriver | None = DRIVER,
) -> list:
    """Each of ``arrays`` (numpy arrays or Rows) on the device, padded rows included.

    Copied into ``into`` when given (a captured graph's static inputs), else into the lane's own
    buffers. A lane with a copy stream (one of the twins that share a stream and graphs) copies
    there, into its own buffers, and the current stream waits for an event; otherwise the copies
    are queued on the current (the lane's) stream, which no other batch uses meanwhile."""
    import contextlib

    import torch

    # a 0-d input travels as one row
    scalars = [not isinstance(a, Rows) and a.ndim == 0 for a in arrays]
    arrays = [a.reshape(1) if scalar else a for a, scalar in zip(arrays, scalars, strict=True)]
    if into is not None:
        targets = [t.reshape(1) if scalar else t for t, scalar in zip(into, scalars, strict=True)]
    else:
        targets = [_device_buffer(lane, slot, a, device) for slot, a in enumerate(arrays)]
    side = lane.copy_stream
    with (
        torch.cuda.stream(side) if side is not None else contextlib.nullcontext(),
        regions.holding() as covers,
    ):
        for slot, (array, target) in enumerate(zip(arrays, targets, strict=True)):
            parts, rows = (array.parts, array.rows) if isinstance(array, Rows) else ([array], len(array))
            raw = driver.target(target) if driver is not None else None
            _copy_parts(
                parts, target, covers, lambda slot=slot, a=array: staging(slot, a.shape, a.dtype), raw
            )
            if rows < len(target):  # padding: the last real row again
                _pad(target, rows, raw)
        if side is not None:
            lane.copied.record(side)
    if side is not None:
        torch.cuda.current_stream(device).wait_event(lane.copied)
    return [t.reshape(()) if scalar else t for t, scalar in zip(targets, scalars, strict=True)]


def _copy_parts(
    parts: list,
    target,
    covers: Callable[[np.ndarray], bool],
    host: Callable[[], object],
    raw: _RawTarget | None = None,
) -> None:
    """Queue the copies of ``parts`` (end to end) into the device tensor ``target``: by the
    driver into ``raw`` (``target`` as :meth:`CudaDriver.target` gave it) where it can, else by
    ``Tensor.copy_``."""
    import torch

    staged = None  # the pinned staging tensor and its numpy view, once a part needs it
    run = None  # first row of the staged rows not copied yet
    at = 0
    for part in parts:
        count = len(part)
        if covers(part):
            if run is not None:
                if raw is None or not raw.put(run, staged[1][run:at]):
                    target[run:at].copy_(staged[0][run:at], non_blocking=True)
                run = None
            if raw is None or not raw.put(at, part):
                target[at : at + count].copy_(torch.from_numpy(part), non_blocking=True)
        else:
            if staged is None:
                tensor = host()
                staged = tensor, tensor.numpy()
            view = staged[1][at : at + count]
            if view.__array_interface__["data"][0] != part.__array_interface__["data"][0]:
                np.copyto(view, part, casting="same_kind")  # unless the part was built there
            run = at if run is None else run
        at += count
    if run is not None and (raw is None or not raw.put(run, staged[1][run:at])):
        target[run:at].copy_(staged[0][run:at], non_blocking=True)


def _pad(target, rows: int, raw: _RawTarget | None) -> None:
    """``target``'s rows from ``rows`` on as copies of row ``rows - 1``: by the driver in
    doubling runs (each copies every row filled so far), else by one ``Tensor.copy_``."""
    if raw is not None and raw.copier.can("dtod"):
        last = raw.address + (rows - 1) * raw.row_bytes
        filled, size = 1, len(target)  # rows rows-1 .. rows-2+filled hold the last row
        while rows - 1 + filled < size:
            count = min(filled, size - (rows - 1 + filled))
            at = last + filled * raw.row_bytes
            if not raw.copier.device_to_device(at, last, count * raw.row_bytes, raw.stream):
                break
            filled += count
        else:
            return
    target[rows:].copy_(target[rows - 1 : rows].expand(len(target) - rows, *target.shape[1:]))


def _device_buffer(lane: Lane, slot: int, array, device):
    """The lane's device tensor for this slot, ``array``'s shape and dtype (grown when too small)."""
    import torch

    dtype = np.dtype(array.dtype)
    key = (slot, tuple(array.shape[1:]), dtype.str)
    size = array.shape[0]
    buffer = lane.inputs.get(key)
    if buffer is None or len(buffer) < size:
        # the old one is no longer read: the lane's last batch was collected before this one
        torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        buffer = lane.inputs[key] = torch.empty((size, *key[1]), dtype=torch_dtype, device=device)
    return buffer[:size]
