"""One batch's run: built from its requests' rows, started (launched or run), its outputs collected."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

from serving.batching.copying import RowCopier
from serving.batching.policy import BatchPolicy
from serving.batching.records import Flight, Launch, Part
from serving.batching.shaping import Allocate, check_outputs, concatenate, gather, padded_size, take_rows
from serving.batching.stats import BatchStats
from serving.errors import ModelError, ServingError
from serving.types import Tensors

log = logging.getLogger(__name__)

# Weight of the newest batch in the running compute-time average behind Retry-After.
_EMA_WEIGHT = 0.2


class Flights:
    """Builds, starts and collects a batcher's batches, and reports each one's stats.

    ``launch`` (pipelined runners) starts a batch and returns the function that collects it;
    without it a batch runs when collected. ``allocate`` may hand out the arrays a batch is
    assembled in (the batcher passes it only when pipelining, and calls :meth:`begin` only when
    no batch is in the runner); ``copier`` assembles them with several threads. With ``gather``
    (a runner that takes :class:`~serving.types.Rows`) a batch's rows are not joined here at all:
    the runner copies each request's rows to its device (``allocate`` and ``copier`` go unused).
    """

    def __init__(
        self,
        run: Callable[[Tensors], Tensors],
        policy: BatchPolicy,
        *,
        launch: Launch | None = None,
        allocate: Allocate | None = None,
        observe: Callable[[BatchStats], None] | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "model",
        copier: RowCopier | None = None,
        gather: bool = False,
    ):
        self._run = run
        self._gather = gather
        self._copier = copier
        self._policy = policy
        self._launch = launch
        self._allocate = allocate
        self._observe = observe
        self._clock = clock
        self._name = name
        self.compute_avg = 0.0  # running average of a batch's compute seconds (Retry-After)

    def begin(self, parts: list[Part]) -> Flight:
        """Build the batch and start it: launched (pipelined) or run to the end."""
        start = self._clock()
        queue_times = tuple(start - request.submitted for request, _, _ in parts)
        rows = sum(stop - first for _, first, stop in parts)
        size = padded_size(rows, self._policy.batch_sizes)
        first_request, first, stop = parts[0]
        whole = len(parts) == 1 and size == rows and stop - first == first_request.rows
        if not self._policy.splittable or whole:
            batch = first_request.inputs
        else:
            pieces = [take_rows(request.inputs, a, b) for request, a, b in parts]
            if self._gather:
                batch = gather(pieces, size)
            else:
                batch = concatenate(pieces, size, self._allocate, self._copier)
        flight = Flight(parts, rows, size, whole or not self._policy.splittable, queue_times)
        flight.began = self._clock()
        flight.built = flight.began - start
        try:
            if self._launch is not None:
                flight.collect = self._launch(batch)
                flight.launched = self._clock()
            else:
                flight.collect = partial(self._run, batch)
        except ServingError as exc:
            flight.error = exc
        except Exception as exc:
            flight.error = ModelError(f"{type(exc).__name__}: {exc}")
        return flight

    def collect(self, flight: Flight) -> None:
        """Wait for the batch's outputs (or its error) and report its stats."""
        if flight.error is None:
            try:
                outputs = flight.collect()
                if self._policy.splittable:
                    outputs = check_outputs(outputs, flight.size)
                flight.outputs = outputs
            except ServingError as exc:
                flight.error = exc
            except Exception as exc:
                flight.error = ModelError(f"{type(exc).__name__}: {exc}")
        flight.collect = None
        compute = self._clock() - flight.began
        self.compute_avg += _EMA_WEIGHT * (compute - self.compute_avg)
        launch = flight.launched - flight.began if flight.launched else 0.0
        stats = BatchStats(
            flight.rows,
            flight.size - flight.rows,
            len(flight.parts),
            flight.queue_times,
            compute,
            flight.built,
            launch,
        )
        self._report(stats)

    def _report(self, stats: BatchStats) -> None:
        if self._observe is None:
            return
        try:
            self._observe(stats)
        except Exception:  # metrics must never take the model down
            log.exception("batch observer of model %s failed", self._name)
