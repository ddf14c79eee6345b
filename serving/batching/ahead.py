"""The pipelined worker with two batches on the device: the next one launched behind the running one.

With one batch on the device at a time (serving.batching.pipeline) the device waits, after each
batch, for the worker to collect it, build the next from the queue (for ResNet-50 images, a
copy of ~150 KB a row into pinned memory) and launch it: with one model host feeding an H200
at batches of ~80 rows, the GPU was busy 54% of the time while the host used 0.6 of a core.

Here the batcher's worker thread only builds and launches, and a collector thread only waits
for batches in launch order and passes them to the answering thread (it answers a batch itself
only when the server is idle: nothing else on the device, nothing queued). The worker launches:
- at once when nothing is on the device (no added latency at low load);
- behind the batch on the device once as many rows are queued as it holds, or a full batch: the
  device then starts it the moment the running one ends. With fewer queued the worker waits for
  the running batch to end, so a busy device is not handed a trickle of small batches.
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


def launch_ahead(batcher: Batcher, answers: queue.SimpleQueue) -> None:
    """Build and launch batches on this thread (the worker's, which ran the warm-up) until the
    batcher is closed and drained; a collector thread collects them and queues their answers."""
    in_flight: deque[Flight] = deque()  # launched, not yet collected (under the batcher's lock)
    launched: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()  # the collector's, in order
    collector = threading.Thread(
        target=_collect,
        args=(batcher, in_flight, launched, answers),
        name=f"{batcher._name}-collect",
        daemon=True,
    )
    collector.start()
    try:
        while (parts := _next(batcher, in_flight)) is not None:
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


def _next(batcher: Batcher, in_flight: deque[Flight]) -> list[Part] | None:
    """The next batch to launch (counted as running), or None once closed, drained and done."""
    with batcher._cond:
        while True:
            if len(in_flight) < batcher._depth and _worth_launching(batcher, in_flight):
                parts = batcher._next_batch(block=False)
                if parts is not None:
                    batcher._running += 1
                    return parts
            if batcher._closing and not in_flight and batcher._live_head(batcher._clock()) is None:
                return None
            # woken by a submit, a collected batch or close (a max_delay_ms by the timeout)
            if in_flight or batcher._queue:
                batcher._cond.wait(batcher._delay or None)
            else:
                batcher.wait_starved(batcher._delay or None)


def _worth_launching(batcher: Batcher, in_flight: deque[Flight]) -> bool:
    """Nothing on the device, or a queue at least as large as the batch there (or a full batch)."""
    if not in_flight:
        return True
    head = batcher._live_head(batcher._clock())
    if head is None:
        return False
    return batcher._rows_by_key.get(head.key, 0) >= min(batcher._cap, in_flight[-1].rows)


def _collect(
    batcher: Batcher, in_flight: deque[Flight], launched: queue.SimpleQueue, answers: queue.SimpleQueue
) -> None:
    """Wait for each launched batch in turn; hand its answers on and free its place."""
    while (flight := launched.get()) is not None:
        # the device finishes it; the GIL is free meanwhile
        batcher._guarded(batcher._flights.collect, flight)
        with batcher._cond:
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
