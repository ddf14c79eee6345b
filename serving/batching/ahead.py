"""The pipelined worker with two batches on the device: the next one launched behind the running one.

With one batch on the device at a time (serving.batching.pipeline) the device waits, after each
batch, for the worker to collect it, build the next from the queue (for ResNet-50 images, a
copy of ~150 KB a row into pinned memory) and launch it: with one model host feeding an H200
at batches of ~80 rows, the GPU was busy 54% of the time while the host used 0.6 of a core.

Here the batcher's worker thread only builds and launches, and a collector thread only waits
for batches in launch order and passes them to the answering thread (it answers a batch itself
only when the server is idle: nothing else on the device, nothing queued). The worker launches:
- at once when nothing is on the device (no added latency at low load);
- behind the batch on the device when a full batch is queued, or when the running batch is due
  to end within the lead (:class:`DeviceTimes`): its copies in then run under the end of the
  running batch, and the device starts it the moment the running one ends. Until then it waits,
  so the next batch holds what queues meanwhile, as large as at depth 1. (Launching it as soon as
  as many rows were queued as the running batch held made batches of ~78 rows against ~98 at
  depth 1 on an H200, and the host slower: benchmarks/RESULTS.md, eighteenth session.)
No more than ``depth`` (2) batches are on the device: the runner keeps two sets of staging
buffers, and batches are collected in the order they were launched.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import TYPE_CHECKING

from serving.batching.records import Flight, Part

if TYPE_CHECKING:
    from serving.batching.batcher import Batcher


class DeviceTimes:
    """When the batch on the device is due to end, from how long batches of its size took there.

    A batch's device time is from when it could start (its launch returned, or the batch before
    it ended, whichever is later) to when it was collected: for a batch queued behind another,
    the collector's wake-up is in both ends and cancels. Kept per padded size as a running
    average; a size not yet seen is scaled from the nearest one that was. The lead is how long
    before that end the next batch is launched: twice the running average of a launch (its
    copies are queued on the host and then run on the copy engine) and half a millisecond, but
    never more than half the running batch's time: when launches are slow, a lead longer than a
    small batch would launch each batch the moment the last one went in, and batches would stay
    small (depth 2 on an H100 fell to batches of 12 rows: benchmarks/RESULTS.md).
    """

    def __init__(self, weight: float = 0.2):
        self._weight = weight
        self._by_size: dict[int, float] = {}
        self._launch = 0.0  # running average of a launch's seconds on the host
        self._last_end = 0.0  # when the last collected batch was collected

    def ended(self, flight: Flight, now: float) -> None:
        """Record a collected batch (the batches are collected in launch order)."""
        if flight.launched and flight.error is None:
            took = now - max(flight.launched, self._last_end)
            old = self._by_size.get(flight.size)
            self._by_size[flight.size] = took if old is None else old + self._weight * (took - old)
            self._launch += self._weight * (flight.launched - flight.began - self._launch)
        self._last_end = now

    def due(self, flight: Flight) -> float | None:
        """When to launch behind ``flight``, the one batch on the device; None: not known yet."""
        took = self._by_size.get(flight.size)
        if took is None:
            if not self._by_size:
                return None
            nearest = min(self._by_size, key=lambda size: abs(size - flight.size))
            took = self._by_size[nearest] * flight.size / nearest
        lead = min(2 * self._launch + 0.0005, took / 2)
        return max(flight.launched, self._last_end) + took - lead


def launch_ahead(batcher: Batcher, answers: queue.SimpleQueue) -> None:
    """Build and launch batches on this thread (the worker's, which ran the warm-up) until the
    batcher is closed and drained; a collector thread collects them and queues their answers."""
    in_flight: deque[Flight] = deque()  # launched, not yet collected (under the batcher's lock)
    launched: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()  # the collector's, in order
    times = DeviceTimes()
    collector = threading.Thread(
        target=_collect,
        args=(batcher, in_flight, launched, answers, times),
        name=f"{batcher._name}-collect",
        daemon=True,
    )
    collector.start()
    try:
        while (parts := _next(batcher, in_flight, times)) is not None:
            flight = batcher._guarded(batcher._flights.begin, parts)
            with batcher._cond:
                if flight is None:  # a bug, already failed and logged: the runner is free again
                    batcher._running -= 1
                    continue
                in_flight.append(flight)
            launched.put(flight)
    finally:
        launched.put(None)  # after the last collected: _next ends only with nothing in flight
        collector.join()


def _next(batcher: Batcher, in_flight: deque[Flight], times: DeviceTimes) -> list[Part] | None:
    """The next batch to launch (counted as running), or None once closed, drained and done."""
    with batcher._cond:
        while True:
            wait = batcher._delay or None
            if len(in_flight) < batcher._depth:
                launch, until = _launch_now(batcher, in_flight, times)
                if launch:
                    parts = batcher._next_batch(block=False)
                    if parts is not None:
                        batcher._running += 1
                        return parts
                elif until is not None:
                    wait = until if wait is None else min(wait, until)
            if batcher._closing and not in_flight and batcher._live_head(batcher._clock()) is None:
                return None
            # woken by a submit, a collected batch or close; a due time or max_delay_ms by the timeout
            if in_flight or batcher._queue:
                batcher._cond.wait(wait)
            else:
                batcher.wait_starved(wait)


def _launch_now(batcher: Batcher, in_flight: deque[Flight], times: DeviceTimes) -> tuple[bool, float | None]:
    """Whether to launch now: nothing on the device, a full batch queued, or the batch on the
    device due to end within the lead. Else the seconds until that is due (None: unknown)."""
    if not in_flight:
        return True, None
    now = batcher._clock()
    head = batcher._live_head(now)
    if head is None:
        return False, None
    if batcher._rows_by_key.get(head.key, 0) >= batcher._cap:
        return True, None
    due = times.due(in_flight[-1])
    if due is None:
        return False, None
    return now >= due, max(due - now, 0.0001)


def _collect(
    batcher: Batcher,
    in_flight: deque[Flight],
    launched: queue.SimpleQueue,
    answers: queue.SimpleQueue,
    times: DeviceTimes,
) -> None:
    """Wait for each launched batch in turn; hand its answers on and free its place."""
    while (flight := launched.get()) is not None:
        # the device finishes it; the GIL is free meanwhile
        batcher._guarded(batcher._flights.collect, flight)
        with batcher._cond:
            times.ended(flight, batcher._clock())
            in_flight.popleft()
            batcher._running -= 1
            batcher._cond.notify_all()
            # idle: nothing else on the device and nothing queued to launch next
            idle = not in_flight and not batcher._queue
        if flight.error is not None or idle:
            # answered here: a failure at once (its split rest must not wait), and on an idle
            # server a thread hand-off is spared (as the one-batch pipeline does). Under load
            # the answering thread sends them, so the batch launched meanwhile is collected the
            # moment it ends (answered here, a batch waited for the last one's answers: a
            # profile of depth 2 had the collector answering 78% of its time)
            batcher._guarded(batcher._finish, flight)
        else:
            answers.put(flight)
