"""What the batcher keeps per request and per batch in flight, and how a request is settled."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import InvalidStateError

from serving.batching.outcome import Outcome
from serving.batching.shaping import concatenate, take_rows
from serving.errors import ServingError
from serving.types import Tensors


class Request:
    """A queued request; ``taken`` rows of it already went into batches."""

    __slots__ = (
        "inputs",
        "rows",
        "key",
        "deadline",
        "submitted",
        "future",
        "taken",
        "parts",
        "received",
        "done",
    )

    def __init__(self, inputs: Tensors, rows: int, key: Hashable, deadline: float, submitted: float):
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.deadline = deadline
        self.submitted = submitted
        self.future = Outcome()
        self.taken = 0
        self.parts: list[
            tuple[int, Tensors]
        ] = []  # (first row, outputs) of the parts done so far, when split
        self.received = 0  # rows of outputs received so far, when split
        self.done = False

    def deliver(self, first: int, stop: int, outputs: Tensors, parts_lock: threading.Lock) -> None:
        """Rows ``first:stop`` of this request are done; settle it once all of its rows are."""
        if self.done:
            return  # an earlier part of this split request already failed
        if first == 0 and stop == self.rows:
            settle(self, result=outputs)
            return
        with parts_lock:  # parts of one request may finish on different workers, in any order
            self.parts.append((first, outputs))
            self.received += stop - first
            if self.received < self.rows:
                return
            ordered = [out for _, out in sorted(self.parts, key=lambda part: part[0])]
            self.parts = []
        settle(self, result=concatenate(ordered))


# (request, first row, end row) of one request's share of a batch
Part = tuple[Request, int, int]
#: starts a batch on the device and returns what waits for its outputs (see ``Batcher``)
Launch = Callable[[Tensors], Callable[[], Tensors]]


class Flight:
    """One batch from its launch to its answers: parts, padding, and its outputs or error."""

    __slots__ = (
        "parts", "rows", "size", "whole", "queue_times", "built", "began", "launched", "collect", "outputs", "error",
    )  # fmt: skip

    def __init__(self, parts: list[Part], rows: int, size: int, whole: bool, queue_times: tuple):
        self.parts = parts
        self.rows = rows
        self.size = size
        self.whole = whole  # one whole request, unpadded (or unsplittable): its outputs go back as they are
        self.queue_times = queue_times
        self.built = 0.0  # seconds its rows took to assemble
        self.began = 0.0  # clock() when it went into the runner
        self.launched = 0.0  # clock() when the runner's launch returned (pipelined runners)
        self.collect: Callable[[], Tensors] | None = None
        self.outputs: Tensors | None = None
        self.error: ServingError | None = None

    def hand_out(self, outputs: Tensors, parts_lock: threading.Lock) -> None:
        """Give every request of the batch its rows of ``outputs``."""
        parts = self.parts
        if self.whole or (len(parts) == 1 and self.size == self.rows):
            request, first, stop = parts[0]
            request.deliver(first, stop, outputs, parts_lock)
            return
        offset = 0
        for request, a, b in parts:
            whole = b - a == request.rows
            # A whole request gets a copy so it does not pin or alias the shared batch arrays;
            # a part is copied anyway when its request's parts are joined.
            request.deliver(a, b, take_rows(outputs, offset, offset + b - a, copy=whole), parts_lock)
            offset += b - a


def settle(request: Request, *, result: Tensors | None = None, error: BaseException | None = None) -> None:
    """Resolve a request's future once; a caller's cancel or an earlier failure wins."""
    request.done = True
    try:
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)
    except InvalidStateError:
        pass
