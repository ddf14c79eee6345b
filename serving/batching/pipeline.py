"""The pipelined worker: for a runner that computes on a device while the host goes on (CUDA).

With one batch on the device at a time (``pipeline_depth`` 1), when batch N's outputs are back
the worker builds N+1 from what queued meanwhile, launches it, and only then answers N, so the
answers (and the next requests they let in) cost no device time. N's answers go to a thread of
their own when N+1 was launched: a launch can take milliseconds of CPU without the GIL (an
AOTInductor ResNet-50 makes ~2.7 ms of kernel launches per batch), and the answers then go out
meanwhile instead of after it. With nothing launched they are sent on the worker, sparing an
idle server a thread hand-off. With two (``pipeline_depth`` 2) the worker runs
serving.batching.ahead instead.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

from serving.batching.ahead import launch_ahead
from serving.batching.records import Flight

if TYPE_CHECKING:
    from serving.batching.batcher import Batcher


def run_pipelined(batcher: Batcher) -> None:
    """The worker thread's loop until the batcher is closed and drained, with its answering thread."""
    answers: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()
    answerer = threading.Thread(
        target=_answer, args=(batcher, answers), name=f"{batcher._name}-answers", daemon=True
    )
    answerer.start()
    try:
        if batcher._depth > 1:
            launch_ahead(batcher, answers)
        else:
            _one_on_the_device(batcher, answers)
    finally:
        answers.put(None)
        answerer.join()


def _answer(batcher: Batcher, answers: queue.SimpleQueue) -> None:
    while (flight := answers.get()) is not None:
        batcher._guarded(batcher._finish, flight)


def _one_on_the_device(batcher: Batcher, answers: queue.SimpleQueue) -> None:
    """Collect N, launch N+1 from the queue, then answer N (on the answering thread if N+1 runs)."""
    flight: Flight | None = None
    while True:
        if flight is not None:
            # the device finishes N; the GIL is free meanwhile
            batcher._guarded(batcher._flights.collect, flight)
            if flight.error is not None:
                # failed: answer at once, so the rest of a split request is not launched
                batcher._guarded(batcher._finish, flight)
        with batcher._cond:
            if flight is not None:
                batcher._running -= 1
            parts = batcher._next_batch(block=flight is None)
            if parts is not None:
                batcher._running += 1
        if parts is None and flight is None:
            return
        launched = None
        if parts is not None:
            launched = batcher._guarded(batcher._flights.begin, parts)
            if launched is None:  # a bug, already failed and logged: the runner is free again
                with batcher._cond:
                    batcher._running -= 1
        if flight is not None and flight.error is None:
            if launched is not None:
                answers.put(flight)  # N's answers while N+1 is launched and runs
            else:
                batcher._guarded(batcher._finish, flight)
        flight = launched
