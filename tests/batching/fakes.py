"""Fakes for the batcher tests: a recording numpy runner that can be held, and a manual clock."""

from __future__ import annotations

import threading

import numpy as np


def transform(x: np.ndarray) -> np.ndarray:
    """What the fake model computes per row: twice the row plus the row's sum."""
    return x * 2 + x.reshape(len(x), -1).sum(axis=1).reshape((len(x),) + (1,) * (x.ndim - 1))


class Runner:
    """A fake model: records every batch it sees; ``hold()`` makes the next batch wait for ``release()``."""

    def __init__(self):
        self.batches: list[dict[str, np.ndarray]] = []
        self.outputs: list[dict[str, np.ndarray]] = []
        self.started = threading.Event()
        self._gate: threading.Event | None = None  # taken by the next batch
        self._last_gate: threading.Event | None = None
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._gate = self._last_gate = threading.Event()
        self.started.clear()

    def release(self) -> None:
        assert self._last_gate is not None, "release() without hold()"
        self._last_gate.set()

    @property
    def sizes(self) -> list[int]:
        with self._lock:
            return [len(next(iter(batch.values()))) for batch in self.batches]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.launch(inputs)()

    def launch(self, inputs: dict[str, np.ndarray]):
        """Start a batch as a device would: recorded now, computed (and held) when collected."""
        with self._lock:
            self.batches.append({name: array.copy() for name, array in inputs.items()})
        self.started.set()
        gate, self._gate = self._gate, None

        def collect() -> dict[str, np.ndarray]:
            if gate is not None:
                assert gate.wait(10), "test never released the held batch"
            outputs = {"y": transform(inputs["x"])}
            with self._lock:
                self.outputs.append(outputs)
            return outputs

        return collect


def lazy_launch(run):
    """A ``launch`` for a plain ``run``: the batch is computed when its outputs are collected."""
    return lambda inputs: lambda: run(inputs)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
