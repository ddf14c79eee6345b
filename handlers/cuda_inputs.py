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

The copies are queued through the CUDA driver where it can take them
(handlers.cuda_driver: the GIL kept for the microseconds each takes), else by ``Tensor.copy_``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from handlers.cuda_driver import DRIVER, CudaDriver, RawTarget, record_event, wait_event
from handlers.host_memory import REGIONS, PinnedRegions
from serving.types import Rows

#: ``staging(slot, shape, dtype)``: the lane's pinned host tensor for this input slot and shape
Staging = Callable[[int, tuple, np.dtype], object]


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
            record_event(lane.copied, side)
    if side is not None:
        wait_event(torch.cuda.current_stream(device), lane.copied)
    return [t.reshape(()) if scalar else t for t, scalar in zip(targets, scalars, strict=True)]


def _copy_parts(
    parts: list,
    target,
    covers: Callable[[np.ndarray], bool],
    host: Callable[[], object],
    raw: RawTarget | None = None,
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


def _pad(target, rows: int, raw: RawTarget | None) -> None:
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
