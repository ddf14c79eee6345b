"""Where a batcher's worker spends its time: starved for requests, and answering batches.

These feed the host's ``stats`` op and the GPU benchmark's profile (benchmarks/gpu_resnet50.py).
"""

from __future__ import annotations

import threading
import time


class WorkerTimes:
    """Seconds (``perf_counter``) a batcher's workers waited with nothing to run, and answered."""

    def __init__(self):
        self._lock = threading.Lock()
        self._starved = 0.0
        self._since: float | None = None  # when the present starved wait began
        self._answering = 0.0

    def wait_starved(self, cond: threading.Condition, timeout: float | None) -> None:
        """``cond.wait(timeout)`` (its lock held), counted as starved.

        With several workers idle at once the time is counted once: by the first to wait.
        """
        with self._lock:
            first = self._since is None
            if first:
                began = self._since = time.perf_counter()
        cond.wait(timeout)
        if first:
            with self._lock:
                self._starved += time.perf_counter() - began
                self._since = None

    def answered(self, seconds: float) -> None:
        """A batch's answers took ``seconds`` to hand out."""
        with self._lock:
            self._answering += seconds

    def snapshot(self) -> dict[str, float]:
        """``starved_s`` (a wait in progress counts so far) and ``answer_s``."""
        with self._lock:
            starved = self._starved
            if self._since is not None:
                starved += time.perf_counter() - self._since
            return {"starved_s": starved, "answer_s": self._answering}
