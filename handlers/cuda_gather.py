"""A batch's input read by the device itself from host memory (zero-copy): one ``torch.cat``.

The copy path (handlers.cuda_inputs) queues one host-to-device copy per part of a batch, ~17 for
a ResNet-50 batch of ~90 images at concurrency 256, and each call costs the launching thread
8–30 µs in the driver while the device waits (benchmarks/RESULTS.md). A device whose threads may
use host pointers of registered memory (``CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM``, as an H100
or H200 on Linux) can instead read every part where it lies: each part becomes a CUDA view of
its registered region (or of the lane's pinned staging buffer, which CUDA maps at its host
address too), and one ``torch.cat`` into the target gathers them, 8 bytes a load when every
part is aligned. Queuing 18 parts took 20 µs against 157 for 18 driver copies on one H200, and
the device read them at 47 GB/s against 43 (``benchmarks/gpu_copy_calls.py``).

Only memory that stays registered until the device has read it is viewed: a region the host
table holds while the gather is queued (handlers.host_memory retires a region only after the
device finished what was queued), or the lane's staging buffer. ``ONEBOX_CUDA_COPY=zerocopy``
turns it on; anything it cannot take (a dtype or row shape that differs from the target's, a
strided part) goes the copy path, and an error turns it off for the process, logged once.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable

import numpy as np

from handlers.cuda_driver import _numpy_dtype

log = logging.getLogger(__name__)

#: CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM
_HOST_POINTER_ATTRIBUTE = 91
#: cached views of host memory beyond which the cache is emptied (regions come and go)
_MAX_VIEWS = 1024

#: ``view(address, nbytes, itemsize, device)``: that host memory as a 1-D tensor of
#: ``itemsize``-byte unsigned items on ``device``
View = Callable[[int, int, int, object], object]
#: ``span(array)``: ``(start, end)`` of the registered region holding ``array``, or None
Span = Callable[[np.ndarray], "tuple[int, int] | None"]


class _CudaArray:
    """Host memory as a CUDA array (``__cuda_array_interface__``) at its host address."""

    def __init__(self, address: int, nbytes: int, itemsize: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes // itemsize,),
            "typestr": f"<u{itemsize}" if itemsize > 1 else "|u1",
            "data": (address, False),
            "version": 3,
        }


def cuda_view(address: int, nbytes: int, itemsize: int, device):
    """Registered or pinned host memory as a CUDA tensor the device reads over the bus."""
    import torch

    return torch.as_tensor(_CudaArray(address, nbytes, itemsize), device=device)


def host_pointers_usable(device_index: int) -> bool:
    """Whether the device may read registered host memory at its host address."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, value = ctypes.c_int(), ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0:
            return False
        return cuda.cuDeviceGetAttribute(ctypes.byref(value), _HOST_POINTER_ATTRIBUTE, device) == 0 and bool(
            value.value
        )
    except (OSError, AttributeError):
        return False


class HostGather:
    """Queues a batch input's parts as one gather the device runs, reading host memory.

    ``view`` makes the tensors parts are read through (default: CUDA views at host addresses,
    after checking the device can use them); tests give CPU tensors over the same memory.
    """

    def __init__(self, enabled: bool = False, view: View | None = None):
        self.enabled = enabled  # the host sets it from Settings.cuda_copy
        self._view = view
        self._checked = view is not None  # the device's capability, checked on first use
        self._views: dict[tuple[int, int, int], object] = {}
        self.gathered = 0  # inputs gathered this way
        self.pieces = 0  # views read by those gathers

    def gather(self, parts: list[np.ndarray], target, span: Span, host: Callable[[], object]) -> bool:
        """Queue the parts (end to end from row 0) into ``target`` (a contiguous tensor, rows on
        its first axis) on the current stream; False, with nothing queued, when this path does
        not take them (the copy path then does). ``span`` must be called with the region table
        held; ``host()`` gives the pinned staging tensor that parts outside regions are put in."""
        if not self.enabled or not self._usable(target.device):
            return False
        dtype = _numpy_dtype(target.dtype)
        if dtype is None or target.ndim == 0 or not target.is_contiguous():
            return False
        row_shape = tuple(target.shape[1:])
        rows = 0
        for part in parts:
            if part.dtype != dtype or part.shape[1:] != row_shape or not part.flags.c_contiguous:
                return False
            rows += len(part)
        if rows == 0 or rows > len(target):
            return False
        row_bytes = math.prod(row_shape) * target.element_size()
        pieces = self._pieces(parts, span, host, row_bytes)
        aligned = target.data_ptr() % 8 == 0 and all(
            start % 8 == 0 and base[0] % 8 == 0 and nbytes % 8 == 0 for (start, base), nbytes in pieces
        )
        itemsize = 8 if aligned else 1
        try:
            inputs = [
                self._base(base, itemsize, target.device)[(start - base[0]) // itemsize : (start - base[0] + nbytes) // itemsize]
                for (start, base), nbytes in pieces
            ]  # fmt: skip
            out = _items(target, itemsize)[: rows * row_bytes // itemsize]
            if len(inputs) == 1:
                out.copy_(inputs[0], non_blocking=True)
            else:
                import torch

                torch.cat(inputs, out=out)
        except Exception as exc:  # any failure: the copy path, for good
            self.enabled = False
            log.warning("reading a batch from host memory on the device failed (%s): copies from now on", exc)
            return False
        self.gathered += 1
        self.pieces += len(inputs)
        return True

    def _pieces(
        self, parts, span: Span, host, row_bytes: int
    ) -> list[tuple[tuple[int, tuple[int, int]], int]]:
        """``((address, (region start, region end)), nbytes)`` per piece to read: a part where
        it lies in a region, or a run of parts put end to end in the staging buffer."""
        pieces: list = []
        staged = None  # the staging tensor's numpy view and span, once a part needs it
        at = 0
        for part in parts:
            where = span(part)
            if where is not None:
                pieces.append(((part.ctypes.data, where), part.nbytes))
            else:
                if staged is None:
                    tensor = host()
                    staged = tensor.numpy(), (tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes)
                view = staged[0][at : at + len(part)]
                if view.__array_interface__["data"][0] != part.__array_interface__["data"][0]:
                    np.copyto(view, part, casting="same_kind")  # unless the part was built there
                address = staged[1][0] + at * row_bytes
                last = pieces[-1] if pieces else None
                if last is not None and last[0][1] == staged[1] and last[0][0] + last[1] == address:
                    pieces[-1] = (last[0], last[1] + part.nbytes)  # the run goes on
                else:
                    pieces.append(((address, staged[1]), part.nbytes))
            at += len(part)
        return pieces

    def _base(self, span: tuple[int, int], itemsize: int, device):
        """The whole of ``span`` as a tensor of ``itemsize``-byte items (made once per span)."""
        key = (span[0], span[1], itemsize)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            view = self._views[key] = (self._view or cuda_view)(span[0], span[1] - span[0], itemsize, device)
        return view

    def _usable(self, device) -> bool:
        if not self._checked:
            self._checked = True
            if device.type != "cuda" or not host_pointers_usable(device.index or 0):
                self.enabled = False
                log.info("this device cannot read host memory at its host address: batches are copied")
                return False
        return self.enabled


def _items(target, itemsize: int):
    """``target``'s bytes as a flat tensor of ``itemsize``-byte items."""
    import torch

    flat = target.reshape(-1).view(torch.uint8)
    return flat if itemsize == 1 else flat.view(torch.int64)


#: the gather of this process's CUDA runners (on when Settings.cuda_copy is ``zerocopy``)
GATHER = HostGather()
