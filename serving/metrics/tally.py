"""A frontend worker's invocations, counted in plain memory and added to the metrics once a second.

The ``loop`` worker answers an image request in about a quarter of a millisecond of CPU; taking
prometheus_client's locks and writing its memory-mapped files for three histograms and a counter
on every request would add a noticeable share. So each worker counts into a :class:`Tally` (a
dict lookup and a few additions per request, no lock, no system call) and its loop, once a
second, adds what was counted to the Prometheus families in one step per bucket
(:func:`serving.metrics.families.add_observations`) and hands it to the CloudWatch EMF writer.
Workers that run requests on several threads (gthread, gevent, the loop worker's pool) use a
:class:`LockedTally`.
"""

from __future__ import annotations

import threading

from serving.metrics import families
from serving.metrics.emf import EmfWriter

_BOUNDS = families.LATENCY_BUCKETS
_N = len(_BOUNDS)
#: the model label of an invocation of a model no host holds (404): a client's made-up names
#: must not each become a series
UNKNOWN_MODEL = "-"


class Tally:
    """Invocations counted since the last :meth:`flush`, by model and status (one thread)."""

    def __init__(self, emf: EmfWriter | None = None):
        self.emf = emf
        # (model, status) -> [count, seconds, bucket counts, model calls, model seconds,
        #                     model bucket counts, overhead seconds, overhead bucket counts]
        self._counts: dict[tuple[str, int], list] = {}

    def record(self, model: str, status: int, seconds: float, model_seconds: float | None) -> None:
        """One invocation of ``model`` answered ``status`` after ``seconds``, of which
        ``model_seconds`` were its host call (None: it never reached a host)."""
        if status == 404:
            model = UNKNOWN_MODEL
        entry = self._counts.get((model, status))
        if entry is None:
            entry = self._counts[(model, status)] = [0, 0.0, [0] * _N, 0, 0.0, [0] * _N, 0.0, [0] * _N]
        entry[0] += 1
        entry[1] += seconds
        entry[2][families.bucket_index(_BOUNDS, seconds)] += 1
        overhead = seconds
        if model_seconds is not None:
            entry[3] += 1
            entry[4] += model_seconds
            entry[5][families.bucket_index(_BOUNDS, model_seconds)] += 1
            overhead = max(seconds - model_seconds, 0.0)
        entry[6] += overhead
        entry[7][families.bucket_index(_BOUNDS, overhead)] += 1
        if self.emf is not None:
            self.emf.record(model, status, seconds, model_seconds)

    def take(self) -> dict[tuple[str, int], list]:
        """What was counted since the last take, leaving nothing."""
        counts, self._counts = self._counts, {}
        return counts

    def flush(self) -> None:
        """Add what was counted to the Prometheus families; write EMF lines that are due."""
        _publish(self.take())
        if self.emf is not None:
            self.emf.flush_if_due()

    def close(self) -> None:
        """The worker is stopping: publish everything, EMF included."""
        _publish(self.take())
        if self.emf is not None:
            self.emf.flush()


class LockedTally(Tally):
    """A :class:`Tally` that threads may record into at once."""

    def __init__(self, emf: EmfWriter | None = None):
        super().__init__(emf)
        self._lock = threading.Lock()

    def record(self, model: str, status: int, seconds: float, model_seconds: float | None) -> None:
        with self._lock:
            super().record(model, status, seconds, model_seconds)

    def take(self) -> dict[tuple[str, int], list]:
        with self._lock:
            return super().take()

    def flush(self) -> None:
        _publish(self.take())
        if self.emf is not None:
            with self._lock:  # the writer is fed under the lock too
                self.emf.flush_if_due()

    def close(self) -> None:
        _publish(self.take())
        if self.emf is not None:
            with self._lock:
                self.emf.flush()


def _publish(counts: dict[tuple[str, int], list]) -> None:
    for (model, status), entry in counts.items():
        code = str(status)
        families.REQUESTS.labels(model, code).inc(entry[0])
        families.add_observations(families.REQUEST_SECONDS.labels(model, code), entry[2], entry[1])
        if entry[3]:
            families.add_observations(families.MODEL_SECONDS.labels(model), entry[5], entry[4])
        families.add_observations(families.OVERHEAD_SECONDS.labels(model), entry[7], entry[6])
