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

The copies are queued through the CUDA driver (:class:`DriverCopy`: ``cuMemcpyHtoDAsync`` by
``ctypes.PyDLL``), which keeps the GIL for the microseconds a queued copy takes; ``Tensor.copy_``
releases and retakes it for each copy. Queuing a batch's ~18 copies beside a busy Python thread
took 0.17 ms against 24 ms that way, but served throughput on an H200 did not move: the host's
other threads mostly wait in I/O (benchmarks/RESULTS.md, sixteenth session).
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


class DriverCopy:
    """Host-to-device copies queued by the CUDA driver, holding the GIL (``ctypes.PyDLL``).

    Only for sources in page-locked memory (registered regions, pinned staging): from pageable
    memory the driver would copy synchronously, GIL held. The calling thread must have the
    device's context current, as a thread that ran CUDA work through torch has; a call that
    fails turns the driver path off for the process (logged once) and the copy goes through
    torch.
    """

    def __init__(self, enabled: bool = True, call: Callable[[int, int, int, int], int] | None = None):
        """``call(device_address, host_address, nbytes, stream) -> CUresult``: the driver's
        ``cuMemcpyHtoDAsync`` unless given (tests give one that copies between CPU buffers)."""
        self.enabled = enabled  # the host sets it from Settings.cuda_copy
        self._call = call
        self._loaded = call is not None
        self.queued = 0  # copies the driver took

    @classmethod
    def load(cls) -> DriverCopy | None:
        """A copier with the driver library loaded now; None where there is none."""
        copier = cls()
        return copier if copier._function() is not None else None

    def _function(self):
        if not self._loaded:
            self._loaded = True
            try:
                call = ctypes.PyDLL("libcuda.so.1").cuMemcpyHtoDAsync_v2
            except (OSError, AttributeError):
                log.info("the CUDA driver library is not loadable: copies go through torch")
            else:
                call.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                call.restype = ctypes.c_int
                self._call = call
        return self._call

    def target(self, tensor) -> _RawTarget | None:
        """``tensor`` (a CUDA tensor, rows on its first axis) as a target of raw copies on the
        current stream, or None when the driver path cannot fill it."""
        if not self.enabled or self._function() is None or not tensor.is_contiguous() or tensor.ndim == 0:
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
        if not self.enabled:  # turned off by a failure earlier in this batch
            return False
        error = self._call(device_address, host_address, nbytes, stream)
        if error != 0:
            self.enabled = False
            log.warning(
                "cuMemcpyHtoDAsync failed (CUDA error %d): copies go through torch from now on", error
            )
            return False
        self.queued += 1
        return True


class _RawTarget:
    """A contiguous device tensor that rows are copied into by the driver."""

    __slots__ = ("copier", "address", "rows", "row_shape", "row_bytes", "dtype", "stream")

    def __init__(self, copier: DriverCopy, address: int, shape: tuple, dtype: np.dtype, stream: int):
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
DRIVER = DriverCopy()


class Lane:
    """What one batch in flight owns on a GPU: streams, buffers, captured graphs.

    A lane is used by one batch at a time and taken again only after that batch was collected,
    so its pinned and device buffers are never overwritten while a queued copy still reads them,
    and its graphs' static buffers never hold two batches.
    """

    __slots__ = ("stream", "staging", "graphs", "pool", "done", "spun", "copy_stream", "copied", "inputs")

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


def device_inputs(
    lane: Lane,
    arrays: list,
    device,
    staging: Staging,
    into: list | None = None,
    regions: PinnedRegions = REGIONS,
    driver: DriverCopy | None = DRIVER,
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
                target[rows:].copy_(target[rows - 1 : rows].expand(len(target) - rows, *target.shape[1:]))
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
    driver into ``raw`` (``target`` as :meth:`DriverCopy.target` gave it) where it can, else by
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
