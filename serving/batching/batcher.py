"""The dynamic batcher: one queue, worker threads forming batches, an outcome per request (DESIGN §5)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from serving.batching.copying import RowCopier
from serving.batching.flights import Flights
from serving.batching.outcome import Outcome
from serving.batching.pipeline import run_pipelined
from serving.batching.policy import BatchPolicy
from serving.batching.records import Flight, Launch, Part, Request, settle
from serving.batching.shaping import Allocate, count_rows, shape_key
from serving.batching.stats import BatchStats
from serving.batching.timing import WorkerTimes
from serving.errors import DeadlineExceeded, ModelError, NotReady, PayloadTooLarge, QueueFull, ServingError
from serving.types import Tensors

log = logging.getLogger(__name__)


class Batcher:
    """Queues requests for one model and runs them through ``run`` in batches.

    ``submit`` never blocks on the runner: it validates, enqueues and returns a future. Batches
    run on ``policy.concurrent_batches`` worker threads (one by default); with two, one batch's
    host-side work (concatenating, copying, answering) overlaps the other's device compute.

    ``launch``, for a runner that computes on a device while the host goes on (CUDA), starts a
    batch and returns a function that waits for its outputs. With it, and one batch at a time,
    the worker pipelines (serving.batching.pipeline): N+1 is launched before N is answered.
    With ``depth`` 2 (a runner that can hold two launches apart: a CUDA runner with two staging
    sets on one stream) the next batch is launched behind the running one (serving.batching.ahead).
    ``allocate`` (used only then, when no batch is in the runner) may hand out the arrays a
    batch is assembled in, such as the runner's pinned staging buffers: one copy fewer per batch.

    ``copy_threads`` (more than 1) assembles a batch's rows with that many threads
    (serving.batching.copying): one thread copies ~5 GB/s, and a device waits for the copy.
    ``gather``, for a runner that takes :class:`~serving.types.Rows`, leaves the rows unjoined:
    the runner copies each request's rows to its device itself (then neither is used).

    ``warmup`` runs first on every worker thread, and batches then run only on those threads
    (``run_here`` is ignored): what a warm-up builds may belong to its thread, as cuDNN's
    execution plans do. :meth:`wait_warm` returns when every worker is warm.
    """

    def __init__(
        self,
        run: Callable[[Tensors], Tensors],
        policy: BatchPolicy,
        *,
        launch: Launch | None = None,
        allocate: Allocate | None = None,
        observe: Callable[[BatchStats], None] | None = None,
        warmup: Callable[[], None] | None = None,
        name: str = "model",
        clock: Callable[[], float] = time.time,
        depth: int = 1,
        copy_threads: int = 1,
        gather: bool = False,
    ):
        policy.validate()
        self._launch = launch if policy.concurrent_batches == 1 else None
        # batches launched ahead of the one being collected (the pipelined worker only)
        self._depth = max(1, depth) if self._launch is not None else 1
        allocate = allocate if self._launch is not None and not gather else None
        copy_threads = 1 if gather else copy_threads
        self._copier = RowCopier(copy_threads, name) if copy_threads > 1 and policy.splittable else None
        self._flights = Flights(
            run,
            policy,
            launch=self._launch,
            allocate=allocate,
            observe=observe,
            clock=clock,
            name=name,
            copier=self._copier,
            gather=gather,
        )
        self.gathers = gather  # batches reach the runner as unjoined Rows
        self._policy = policy
        self._name = name
        self._clock = clock
        self._cap = policy.max_batch_size if policy.splittable else 1
        self._delay = policy.max_delay_ms / 1000.0
        self._queue: deque[Request] = deque()
        self._queued_rows = 0
        self._rows_by_key: dict[Hashable, int] = {}
        self._closing = False
        self._cond = threading.Condition()
        self._parts_lock = threading.Lock()
        # batches in the runner at once: the workers', or the pipelined worker's launches
        self._concurrency = max(policy.concurrent_batches, self._depth)
        self._running = 0  # batches in the runner now, on workers or on callers' threads
        self._times = WorkerTimes()  # starved and answering seconds (timings())
        self._warmup = warmup
        self._cold = policy.concurrent_batches if warmup else 0  # workers still warming up
        self._warmup_error: BaseException | None = None
        loop = self._loop if self._launch is None else self._pipeline_loop
        self._threads = [
            threading.Thread(target=self._work, args=(loop,), name=f"batcher-{name}-{i}", daemon=True)
            for i in range(policy.concurrent_batches)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Tensors, deadline: float, *, run_here: bool = False) -> Outcome:
        """Queue ``inputs`` to run before ``deadline`` (absolute ``clock()`` seconds).

        Returns an :class:`Outcome` (a lighter ``Future``) of the outputs for exactly these rows.
        Raises ``BadRequest`` for inputs that cannot be batched, ``PayloadTooLarge`` for a request
        larger than the whole queue, ``QueueFull`` (with Retry-After) when its rows do not fit now, ``NotReady`` after
        ``close``. With ``run_here``, a caller that would wait for the result anyway runs the
        batch itself when the runner is idle and nothing is queued (the future is then done on
        return); otherwise it queues as usual.
        """
        if self._policy.splittable:
            rows, key = count_rows(inputs), shape_key(inputs)
        else:
            rows, key = 1, None  # opaque inputs: one request is one unit of work
        limit = self._policy.max_queue
        if rows > limit:
            raise PayloadTooLarge(
                f"the request has {rows} rows; model {self._name!r} queues at most {limit} rows"
            )
        request = Request(inputs, rows, key, deadline, self._clock())
        with self._cond:
            if self._closing:
                raise NotReady(f"model {self._name!r} is shutting down")
            # Idle runner, empty queue, no delay asked for: this request is the whole batch, so
            # run it on the caller's thread instead of waking a worker for it (two thread
            # hand-offs fewer per request at low load, where batching must add nothing).
            # (never beside a pipelined worker with launches queued: the runner's order is its own)
            inline = run_here and not self._warmup and not self._delay and not self._queue
            inline = inline and self._depth == 1
            inline = inline and self._running < self._concurrency
            inline = inline and rows <= self._cap
            if inline:
                self._running += 1
            else:
                if self._queued_rows + rows > limit:
                    raise QueueFull(
                        f"the queue of model {self._name!r} is full ({self._queued_rows} of {limit} rows waiting)",
                        retry_after=self._retry_after(),
                    )
                self._queue.append(request)
                self._queued_rows += rows
                self._rows_by_key[key] = self._rows_by_key.get(key, 0) + rows
                self._cond.notify()
        if inline:
            self._run_inline(request)
        return request.future

    @property
    def policy(self) -> BatchPolicy:
        """The policy this batcher forms batches by."""
        return self._policy

    @property
    def copy_threads(self) -> int:
        """Threads that assemble a batch's rows (1: the worker's own)."""
        return self._copier.threads if self._copier is not None else 1

    def wait_warm(self) -> None:
        """Wait until every worker has run ``warmup``; raise the first error one of them met."""
        with self._cond:
            self._cond.wait_for(lambda: not self._cold)
            if self._warmup_error is not None:
                raise self._warmup_error

    def timings(self) -> dict[str, float]:
        """Where the worker's time went since it started (serving.batching.timing): ``starved_s``
        waiting with nothing queued and nothing in the runner (a device idle for want of
        requests), and ``answer_s`` handing batches' rows to their requests (replies included)."""
        return self._times.snapshot()

    def wait_starved(self, timeout: float | None) -> None:
        """Wait on the lock's condition (held) for a request, counting the wait as starved."""
        self._times.wait_starved(self._cond, timeout)

    def queue_depth(self) -> int:
        """Rows waiting for a batch."""
        return self._queued_rows

    def close(self, drain: bool = True) -> None:
        """Stop the worker: after finishing the queue (``drain``), or failing it with ``NotReady``."""
        with self._cond:
            self._closing = True
            if not drain:
                error = NotReady(f"model {self._name!r} shut down before the request ran")
                while self._queue:
                    request = self._queue.popleft()
                    self._unqueue(request)
                    settle(request, error=error)
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        if self._copier is not None:
            self._copier.close()

    # --- worker -------------------------------------------------------------------------

    def _work(self, loop: Callable[[], None]) -> None:
        """The worker thread: the warm-up, then batches (none after a failed warm-up)."""
        error = None
        if self._warmup is not None:
            try:
                self._warmup()
            except BaseException as exc:
                error = exc
            with self._cond:
                self._cold -= 1
                self._warmup_error = self._warmup_error or error
                self._cond.notify_all()
        if error is None:
            loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                parts = self._next_batch()
                if parts is not None:
                    self._running += 1
            if parts is None:
                return
            self._execute_counted(parts)

    def _pipeline_loop(self) -> None:
        run_pipelined(self)  # serving.batching.pipeline: one batch on the device, or two (ahead)

    def _guarded(self, step: Callable, arg):
        """``step(arg)``; a bug in it fails the batch's requests instead of killing the worker."""
        try:
            return step(arg)
        except Exception as exc:
            log.exception("batcher %s failed to handle a batch", self._name)
            parts = arg.parts if isinstance(arg, Flight) else arg
            self._fail(parts, ModelError(f"{type(exc).__name__}: {exc}"))
            return None

    def _run_inline(self, request: Request) -> None:
        if request.deadline <= self._clock() or not request.future.set_running_or_notify_cancel():
            with self._cond:
                self._running -= 1
            if not request.future.cancelled():
                settle(request, error=DeadlineExceeded(f"deadline passed before model {self._name!r} ran"))
            return
        request.taken = request.rows
        self._execute_counted([(request, 0, request.rows)])

    def _execute_counted(self, parts: list[Part]) -> None:
        """Run a batch while counted in ``_running``; wake a worker for what queued meanwhile."""
        try:
            self._execute(parts)
        except Exception as exc:  # a bug here must not kill a worker or strand a caller
            log.exception("batcher %s failed to handle a batch", self._name)
            self._fail(parts, ModelError(f"{type(exc).__name__}: {exc}"))
        finally:
            with self._cond:
                self._running -= 1
                if self._queue:
                    self._cond.notify()

    def _next_batch(self, block: bool = True) -> list[Part] | None:
        """Wait (holding the lock) for the next batch; None once closed and empty.

        Without ``block``: the batch that can start now, or None at once.
        """
        while True:
            now = self._clock()
            head = self._live_head(now)
            if head is None:
                if not block or (self._closing and not self._running):
                    return None
                timeout = None if not self._closing else 0.05
                if self._running:
                    self._cond.wait(timeout)
                else:
                    self.wait_starved(timeout)
                continue
            if self._running >= self._concurrency:
                if not block:
                    return None
                self._cond.wait()  # a batch (maybe on a caller's thread) holds the runner
                continue
            if self._delay and not self._closing and self._rows_by_key[head.key] < self._cap:
                # Only a positive max_delay_ms ever holds a batch back to let it fill.
                left = head.submitted + self._delay - now
                if left > 0:
                    if not block:
                        return None
                    self._cond.wait(left)
                    continue
            parts = self._take(head.key, now)
            if parts:
                if self._queue:
                    self._cond.notify()  # another worker may start on what is left
                return parts

    def _live_head(self, now: float) -> Request | None:
        while self._queue:
            if not self._drop_if_dead(self._queue[0], now):
                return self._queue[0]
            self._queue.popleft()
        return None

    def _take(self, key: Hashable, now: float) -> list[Part]:
        """Up to ``cap`` rows of the oldest requests shaped like ``key``, in queue order.

        Requests of other shapes are passed over and keep their places for a later batch.
        """
        parts: list[Part] = []
        skipped: list[Request] = []
        rows = 0
        queue = self._queue
        while queue and rows < self._cap:
            request = queue.popleft()
            if self._drop_if_dead(request, now):
                continue
            if request.key != key:
                skipped.append(request)
                continue
            if request.taken == 0 and not request.future.set_running_or_notify_cancel():
                self._unqueue(request)  # cancelled by its caller while it waited
                continue
            start = request.taken
            count = min(request.rows - start, self._cap - rows)
            parts.append((request, start, start + count))
            self._consume(request, count)
            rows += count
            if request.taken < request.rows:
                queue.appendleft(request)  # the rest of a split request goes first next time
        queue.extendleft(reversed(skipped))
        return parts

    def _drop_if_dead(self, request: Request, now: float) -> bool:
        """True (and the request settled) when it must not run: failed, cancelled or expired."""
        if request.done or request.future.cancelled():
            self._unqueue(request)
            return True
        if request.deadline <= now:
            self._unqueue(request)
            waited = now - request.submitted
            settle(
                request,
                error=DeadlineExceeded(
                    f"deadline passed after {waited:.3f}s waiting in the queue of model {self._name!r}"
                ),
            )
            return True
        return False

    def _consume(self, request: Request, count: int) -> None:
        request.taken += count
        self._queued_rows -= count
        left = self._rows_by_key[request.key] - count
        if left:
            self._rows_by_key[request.key] = left
        else:
            del self._rows_by_key[request.key]

    def _unqueue(self, request: Request) -> None:
        if request.taken < request.rows:
            self._consume(request, request.rows - request.taken)

    def _execute(self, parts: list[Part]) -> None:
        """Run one batch and hand every request its rows, or the batch's error."""
        flight = self._flights.begin(parts)
        self._flights.collect(flight)
        self._finish(flight)

    def _finish(self, flight: Flight) -> None:
        """Hand every request of the batch its rows, or the batch's error."""
        parts, outputs = flight.parts, flight.outputs
        if flight.error is not None or outputs is None:
            self._fail(parts, flight.error or ModelError("the batch gave no outputs"))
            return
        began = time.perf_counter()
        flight.hand_out(outputs, self._parts_lock)
        self._times.answered(time.perf_counter() - began)

    def _fail(self, parts: list[Part], error: ServingError) -> None:
        with self._cond:
            for request, _, _ in parts:
                self._unqueue(request)  # the unsent rest of a split request fails with it
        for request, _, _ in parts:
            settle(request, error=error)

    def _retry_after(self) -> int:
        """Retry-After: whole seconds the rows already queued would take to run, at least 1."""
        batches_ahead = math.ceil(self._queued_rows / self._cap)
        return max(1, math.ceil(batches_ahead * self._flights.compute_avg))
