"""CloudWatch Embedded Metric Format lines on stdout (``ONEBOX_CLOUDWATCH_EMF=true``).

Each frontend worker writes, every ``ONEBOX_CLOUDWATCH_EMF_INTERVAL`` seconds (60 by default)
and once more when it stops, one line per model it answered in that interval: a JSON object whose
``_aws`` member declares, in namespace ``ONEBOX_CLOUDWATCH_NAMESPACE`` with the dimension
``ModelName``, SageMaker's own metric names:

- ``Invocations``, ``Invocation4XXErrors``, ``Invocation5XXErrors`` (Count): the interval's sums;
- ``ModelLatency`` (Microseconds): the host call of each invocation that reached a model host;
- ``OverheadLatency`` (Microseconds): the rest of each invocation's time in the frontend.

The two latencies go as arrays of at most 100 values (contract §6.2): every value when the
interval had at most 100, else a uniform random sample of 100 of them, so CloudWatch's averages
and percentiles estimate the interval's while its ``SampleCount`` of a latency is not a request
count (``Invocations`` is). CloudWatch adds up the lines of several workers.

DESIGN §7 says never one line per request, and contract case 61 says each invocation writes one
line; ``ONEBOX_CLOUDWATCH_EMF_INTERVAL=0`` gives case 61's one line per invocation (a write on
every request: for tests and low-traffic endpoints), the default gives DESIGN's.

A line is written with one ``os.write`` (a few hundred bytes to ~2 KB, under a pipe's atomic
4 KiB), so lines of several processes sharing stdout do not interleave.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable

SAMPLES = 100  # values per metric in one line, at most (EMF)
_COUNTS = (("Invocations", "Count"), ("Invocation4XXErrors", "Count"), ("Invocation5XXErrors", "Count"))


class EmfWriter:
    """Invocations summed per model over an interval, written as EMF lines (one thread at a time)."""

    def __init__(self, namespace: str, interval_s: float, write: Callable[[bytes], None] | None = None,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self.namespace = namespace
        self.interval_s = interval_s
        self.write = write or write_stdout
        self.clock = clock
        self.due = clock() + interval_s
        # model -> [invocations, 4xx, 5xx, model latencies seen, their sample (µs),
        #           overhead latencies seen, their sample (µs)]
        self._models: dict[str, list] = {}
        self._random = random.Random()

    def record(self, model: str, status: int, seconds: float, model_seconds: float | None) -> None:
        """One invocation (see :meth:`serving.metrics.tally.Tally.record`)."""
        overhead = seconds if model_seconds is None else max(seconds - model_seconds, 0.0)
        if self.interval_s == 0:
            self.write(document(self.namespace, model, self.clock(), 1, int(400 <= status < 500),
                                int(status >= 500), _us_list(model_seconds), [_us(overhead)]))  # fmt: skip
            return
        entry = self._models.get(model)
        if entry is None:
            entry = self._models[model] = [0, 0, 0, 0, [], 0, []]
        entry[0] += 1
        if status >= 500:
            entry[2] += 1
        elif status >= 400:
            entry[1] += 1
        if model_seconds is not None:
            entry[3] += 1
            self._sample(entry[4], entry[3], _us(model_seconds))
        entry[5] += 1
        self._sample(entry[6], entry[5], _us(overhead))

    def _sample(self, sample: list, seen: int, value: int) -> None:
        # reservoir sampling: after n values each is in the sample with probability SAMPLES / n
        if len(sample) < SAMPLES:
            sample.append(value)
        else:
            slot = int(self._random.random() * seen)
            if slot < SAMPLES:
                sample[slot] = value

    def flush_if_due(self) -> None:
        """Write the interval's lines once it is over."""
        if self.interval_s and self.clock() >= self.due:
            self.flush()

    def flush(self) -> None:
        """Write a line per model answered since the last flush, and start a new interval."""
        now = self.clock()
        self.due = now + self.interval_s
        models, self._models = self._models, {}
        for model, (n, n4, n5, _, model_us, _, overhead_us) in models.items():
            self.write(document(self.namespace, model, now, n, n4, n5, model_us, overhead_us))


def document(namespace: str, model: str, now: float, invocations: int, errors_4xx: int, errors_5xx: int,
             model_us: list[int], overhead_us: list[int]) -> bytes:  # fmt: skip
    """One EMF line (with its newline) for ``model``: counts, and latency values in microseconds
    (a list of at most 100; empty: the metric is left out)."""
    metrics = [{"Name": name, "Unit": unit} for name, unit in _COUNTS]
    body: dict = {"ModelName": model, "Invocations": invocations, "Invocation4XXErrors": errors_4xx,
                  "Invocation5XXErrors": errors_5xx}  # fmt: skip
    for name, values in (("ModelLatency", model_us), ("OverheadLatency", overhead_us)):
        if values:
            metrics.append({"Name": name, "Unit": "Microseconds"})
            body[name] = values[0] if len(values) == 1 else values[:SAMPLES]
    directive = {"Namespace": namespace, "Dimensions": [["ModelName"]], "Metrics": metrics}
    line = {"_aws": {"Timestamp": int(now * 1000), "CloudWatchMetrics": [directive]}, **body}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def write_stdout(data: bytes) -> None:
    """``data`` to file descriptor 1 in one write where it can (a metric never stops a worker)."""
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:
        pass


def _us(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


def _us_list(seconds: float | None) -> list[int]:
    return [] if seconds is None else [_us(seconds)]
