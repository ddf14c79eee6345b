"""A request's rows copied to the device as the request arrives, while the batch before it runs.

At ``pipeline_depth`` 1 the device waits while the next batch is launched, and most of that
launch is one host-to-device copy per request: ~0.8 ms for a batch of ~100 ResNet-50 images from
~17 frontend calls on an H200, a sixth of the cycle (benchmarks/RESULTS.md). Here the host's
reader thread queues each request's copy when the request is submitted: from the frontend's
registered region (handlers.host_memory) into a ring in device memory, on a stream of its own,
so the copy runs beside the batch on the device. The launch then takes the batch's rows from
the ring with device-to-device copies, one per run of requests that lie end to end there
(requests are queued, and batched, in the order they arrive, so mostly one), after making its
stream wait for the ring's copies.

The request's arrays come back as :class:`Prefetched` views that carry their ring entry, so a
part of a batch can only ever be matched with its own rows' copy: slices (a request split over
batches) keep the entry, and an array made anew (a cast, a join) has none and is copied from the
host as before. The ring is reused oldest first; an entry is given up only when no batch still
to be collected reads it (else the new request is not prefetched), and a request still queued
whose entry was given up is copied from the host at launch.

Only with the driver path (handlers.cuda_driver) and registered regions: the copies must be
queued without waiting, from page-locked memory. ``ENABLED`` (Settings.cuda_prefetch) turns it off.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from handlers.cuda_driver import DRIVER, CudaDriver
from handlers.host_memory import REGIONS, PinnedRegions

log = logging.getLogger(__name__)

#: whether CUDA runners made from now on prefetch (the host sets it from Settings.cuda_prefetch)
ENABLED = True
#: a ring holds this many of the largest batches (one running, one being formed, and the queue)
RING_BATCHES = 4
#: and never more than this many bytes
RING_MAX_BYTES = 512 << 20
#: this process's prefetches: request inputs queued ahead, batch parts read from a ring, and
#: inputs not queued because the space they needed was still read by a batch in flight
TOTALS = {"copied": 0, "read": 0, "full": 0}


class Prefetched(np.ndarray):
    """A request's input whose rows were also queued into a device ring (``entry``)."""

    entry: _Entry | None

    def __array_finalize__(self, obj) -> None:
        self.entry = getattr(obj, "entry", None)


class _Entry:
    """One request's rows in a ring: where they lie on the host and on the device."""

    __slots__ = ("host", "device", "nbytes", "start", "rows", "valid", "readers")

    def __init__(self, host: int, device: int, nbytes: int, start: int, rows: int):
        self.host, self.device, self.nbytes = host, device, nbytes
        self.start, self.rows = start, rows  # rows of the ring it holds
        self.valid = True  # False once its rows were given to a later request
        self.readers = 0  # launched batches not yet collected that read it


class _Ring:
    """Device memory for ``rows`` rows of one input shape, handed out oldest first."""

    __slots__ = ("address", "rows", "row_bytes", "entries", "keep")

    def __init__(self, address: int, rows: int, row_bytes: int, keep=None):
        self.address, self.rows, self.row_bytes = address, rows, row_bytes
        self.entries: deque[_Entry] = deque()  # in the order they were made: ring order
        self.keep = keep  # what owns the memory (a torch tensor)

    def allocate(self, rows: int) -> int | None:
        """The first of ``rows`` free rows, the oldest entries given up for them; None when an
        entry in the way is still read by a batch in flight."""
        if rows > self.rows:
            return None
        entries = self.entries
        while entries:
            tail, last = entries[0].start, entries[-1]
            head = last.start + last.rows
            if last.start >= tail:  # the entries lie in [tail, head)
                if self.rows - head >= rows:
                    return head
                if tail >= rows:
                    return 0
            elif tail - head >= rows:  # wrapped: they lie in [tail, end) and [0, head)
                return head
            oldest = entries[0]
            if oldest.readers:
                return None
            oldest.valid = False
            entries.popleft()
        return 0


class Prefetcher:
    """A CUDA runner's rings and the stream their copies are queued on.

    :meth:`prefetch` runs on the threads that submit requests, :meth:`reading` and
    :meth:`release` on the batcher's; a lock orders them. ``stream`` and ``event`` are raw
    handles (a torch stream's ``cuda_stream``, a created event's ``cuda_event``); ``context``
    the CUDA context the submitting threads are given before their first copy.
    """

    def __init__(
        self,
        stream: int,
        event: int,
        context: int = 0,
        driver: CudaDriver = DRIVER,
        regions: PinnedRegions = REGIONS,
    ):
        self._stream, self._event, self._context = stream, event, context
        self._driver, self._regions = driver, regions
        self._lock = threading.Lock()
        self._rings: dict[tuple, _Ring] = {}
        self._threads = threading.local()  # whether this thread has the context current

    @classmethod
    def for_device(cls, device) -> Prefetcher | None:
        """One for ``device`` (a CUDA torch.device), or None when prefetching is off or cannot work."""
        if not (
            ENABLED and REGIONS.enabled and all(DRIVER.can(c) for c in ("htod", "dtod", "event", "wait"))
        ):
            return None
        import torch

        stream = torch.cuda.Stream(device)
        event = torch.cuda.Event()
        event.record(stream)  # torch creates the event on its first record
        context = DRIVER.context()  # the loading thread's, for the threads that submit
        if not context:
            return None
        prefetcher = cls(stream.cuda_stream, event.cuda_event, context)
        prefetcher._keep = (stream, event)
        return prefetcher

    def has_ring(self, key: tuple) -> bool:
        return key in self._rings

    def add_ring(self, key: tuple, address: int, rows: int, row_bytes: int, keep=None) -> None:
        """A ring of ``rows`` rows at ``address`` for inputs whose rows are ``key``:
        ``(row shape, dtype str)``; ``keep`` owns the memory."""
        with self._lock:
            self._rings = {**self._rings, key: _Ring(address, rows, row_bytes, keep)}

    def prefetch(self, array):
        """``array`` as a :class:`Prefetched` view whose rows are queued for the device, or
        ``array`` itself where they cannot be (no ring for its rows, not wholly in registered
        memory, the ring's space still read)."""
        if not isinstance(array, np.ndarray) or array.ndim == 0 or not array.flags.c_contiguous:
            return array
        ring = self._rings.get((array.shape[1:], array.dtype.str))
        if ring is None or len(array) == 0 or not self._driver.enabled or not self._on_thread():
            return array
        with self._regions.holding() as covers, self._lock:
            if not covers(array):
                return array
            start = ring.allocate(len(array))
            if start is None:
                TOTALS["full"] += 1
                return array
            device = ring.address + start * ring.row_bytes
            host = array.__array_interface__["data"][0]
            if not self._driver.host_to_device(device, host, array.nbytes, self._stream):
                return array
            entry = _Entry(host, device, array.nbytes, start, len(array))
            ring.entries.append(entry)
            TOTALS["copied"] += 1
        view = array.view(Prefetched)
        view.entry = entry
        return view

    def _on_thread(self) -> bool:
        """The context current on this thread (made so once); False where it cannot be."""
        ready = getattr(self._threads, "ready", None)
        if ready is None:
            ready = self._threads.ready = not self._context or self._driver.use_context(self._context)
        return ready

    @contextmanager
    def reading(self, stream: int, readers: list) -> Iterator[Callable[[np.ndarray], int | None]]:
        """``source(part)``: the device address of ``part``'s rows in a ring, or None (copy it from
        the host). The first part found makes ``stream`` wait for the ring's copies; each entry
        read is added to ``readers`` and not given up before :meth:`release` of them."""
        waited = False

        def source(part: np.ndarray) -> int | None:
            nonlocal waited
            entry = getattr(part, "entry", None)
            if entry is None or not entry.valid or not part.flags.c_contiguous:
                return None
            offset = part.__array_interface__["data"][0] - entry.host
            if offset < 0 or offset + part.nbytes > entry.nbytes:
                return None
            if not waited:
                if not (
                    self._driver.record(self._event, self._stream) and self._driver.wait(stream, self._event)
                ):
                    return None
                waited = True
            entry.readers += 1
            readers.append(entry)
            TOTALS["read"] += 1
            return entry.device + offset

        with self._lock:
            yield source

    def abandon(self, readers: list, stream) -> None:
        """A launch failed after reading these entries: :meth:`release` them once ``stream``
        (a torch stream, or the device whose current stream it is) ran what was queued."""
        if not readers:
            return
        import torch

        try:
            (
                stream if isinstance(stream, torch.cuda.Stream) else torch.cuda.current_stream(stream)
            ).synchronize()
        except Exception:  # the device failed: nothing it still runs reads the ring any more
            log.exception("waiting for a failed launch's copies")
        self.release(readers)

    def release(self, readers: list) -> None:
        """The batch that read these entries was collected: their rows may be given up."""
        if not readers:
            return
        with self._lock:
            for entry in readers:
                entry.readers -= 1
        readers.clear()


def make_rings(prefetch: Prefetcher, arrays: list, device, largest: int) -> None:
    """A ring for each of a batch's inputs whose rows (shape past the first axis, dtype) have
    none yet: ``RING_BATCHES`` batches of ``largest`` rows (this batch's when 0), up to
    ``RING_MAX_BYTES``. On the batcher's thread, which owns the device's allocations."""
    for array in arrays:
        if array.ndim == 0:
            continue
        dtype = np.dtype(array.dtype)
        key = (tuple(array.shape[1:]), dtype.str)
        if prefetch.has_ring(key):
            continue
        import torch

        row_bytes = max(1, int(np.prod(key[0], dtype=np.int64)) * dtype.itemsize)
        rows = min(RING_BATCHES * (largest or len(array)), RING_MAX_BYTES // row_bytes)
        if rows < 1:
            continue
        ring = torch.empty((rows, *key[0]), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, device=device)
        prefetch.add_ring(key, ring.data_ptr(), rows, row_bytes, keep=ring)
