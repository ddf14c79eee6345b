"""What a model host reports: each batch, each load and unload, its restarts, its queues.

Called by serving.host.process: :meth:`HostMetrics.batch` from a batcher thread after every
batch (the batcher's ``observe`` hook, serving.batching.stats), a handful of histogram updates
per batch however many requests it held; :meth:`HostMetrics.sample` once a second from the
host's sampling thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from serving.metrics import families
from serving.metrics.process import ProcessSampler

_BOUNDS = families.LATENCY_BUCKETS


class HostMetrics:
    """The metrics of one model host, labelled with its device (``cpu``, ``cuda0``, ...)."""

    def __init__(self, device: str):
        self.device = device
        self._children: dict[str, tuple] = {}  # model -> its labelled batch families
        self._depths: set[str] = set()  # models whose queue depth was set
        self.process = ProcessSampler("host", device)

    def _of(self, model: str) -> tuple:
        children = self._children.get(model)
        if children is None:
            labels = (model, self.device)
            children = self._children[model] = (
                families.BATCH_SIZE.labels(*labels),
                families.BATCH_PADDING.labels(*labels),
                families.QUEUE_SECONDS.labels(*labels),
                families.COMPUTE_SECONDS.labels(*labels),
            )
        return children

    def batch(
        self, model: str, rows: int, padding: int, queue_times: Sequence[float], compute_s: float
    ) -> None:
        """One batch of ``model`` ran: ``rows`` real rows and ``padding`` added ones, its parts'
        waits in the queue, its time in the runner."""
        size, pad, queue, compute = self._of(model)
        size.observe(rows)
        if padding:
            pad.inc(padding)
        counts = [0] * len(_BOUNDS)
        for seconds in queue_times:
            counts[families.bucket_index(_BOUNDS, seconds)] += 1
        families.add_observations(queue, counts, sum(queue_times))
        compute.observe(compute_s)

    def loaded(self, model: str, seconds: float, status: int) -> None:
        """A load of ``model`` ended with ``status`` (200: ready) after ``seconds``."""
        families.LOAD_SECONDS.labels(model, self.device, str(status)).observe(seconds)

    def unloaded(self, model: str, seconds: float) -> None:
        """``model`` was unloaded in ``seconds``."""
        families.UNLOAD_SECONDS.labels(model, self.device).observe(seconds)

    def holding(self, count: int) -> None:
        """The host now holds ``count`` ready models."""
        families.MODELS_LOADED.labels(self.device).set(count)

    def restarted(self) -> None:
        """This host was started again after its predecessor died."""
        families.HOST_RESTARTS.labels(self.device).inc()

    def sample(self, depths: Iterable[tuple[str, int]]) -> None:
        """Once a second: the process's CPU and memory, and each model's queue depth."""
        self.process.sample()
        seen = set()
        for model, depth in depths:
            families.QUEUE_DEPTH.labels(model, self.device).set(depth)
            seen.add(model)
        for gone in self._depths - seen:  # unloaded: its queue is no more
            families.QUEUE_DEPTH.labels(gone, self.device).set(0)
        self._depths = seen
