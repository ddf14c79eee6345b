"""A model's warm-up runs on the threads that will run its batches, and a failed one fails the load.

On CUDA what a warm-up builds can belong to its thread: cuDNN keeps its execution plans per
thread, and an AOTInductor ResNet-50 warmed on the loading thread planned every convolution again
(~40 ms of CPU per new batch size) on the thread that served it (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from handlers.onnx_runtime import OnnxHandler
from serving.errors import InsufficientMemory
from serving.host.process import Host
from serving.host.registry import State
from serving.settings import Settings
from serving.types import Device
from tests.support.models import onnx_model, reference

pytest.importorskip("onnxruntime")


def _record_threads(monkeypatch) -> tuple[list[int], list[int]]:
    warmed, ran = [], []
    warmup, predict = OnnxHandler.warmup, OnnxHandler.predict

    def recording_warmup(self, sizes):
        warmed.append(threading.get_ident())
        return warmup(self, sizes)

    def recording_predict(self, inputs):
        ran.append(threading.get_ident())
        return predict(self, inputs)

    monkeypatch.setattr(OnnxHandler, "warmup", recording_warmup)
    monkeypatch.setattr(OnnxHandler, "predict", recording_predict)
    return warmed, ran


def _batcher_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"batcher-{name}-")]


@pytest.mark.parametrize("concurrent_batches", [1, 2])
def test_every_batch_runs_on_a_thread_that_ran_the_warmup(tmp_path, monkeypatch, concurrent_batches):
    warmed, ran = _record_threads(monkeypatch)
    path = onnx_model(tmp_path / "linear")
    (path / "onebox.toml").write_text(f"max_batch_size = 4\nconcurrent_batches = {concurrent_batches}\n")
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    try:
        model = host.registry.load("linear", path)
        assert model.state is State.READY
        # one warm-up per worker thread, none on the loading thread; its batches (sizes 1..4) ran there
        assert len(set(warmed)) == concurrent_batches and threading.get_ident() not in warmed
        assert set(ran) <= set(warmed) and len(ran) == 4 * concurrent_batches
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for _ in range(5):  # the registry's default path may run an idle request on the caller
            out = host.registry.infer("linear", {"x": x}, time.time() + 5)
            np.testing.assert_allclose(out["y"], reference(x), rtol=1e-6)
    finally:
        host.registry.close()
    assert len(ran) > 4 * concurrent_batches and set(ran) <= set(warmed)


def test_a_warmup_that_fails_fails_the_load_and_stops_the_models_threads(tmp_path, monkeypatch):
    def failing_warmup(self, sizes):
        raise RuntimeError(f"CUDA error: out of memory warming up batch {max(sizes)}")

    monkeypatch.setattr(OnnxHandler, "warmup", failing_warmup)
    path = onnx_model(tmp_path / "linear")
    (path / "onebox.toml").write_text("max_batch_size = 4\n")
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    # out of memory: a multi-model endpoint answers 507 so that SageMaker unloads another model
    with pytest.raises(InsufficientMemory, match="warming up batch 4"):
        host.registry.load("broken", path)
    model = host.registry.models()[0]
    assert model.state is State.FAILED and "warming up batch 4" in model.error
    assert _batcher_threads("broken") == []
    assert host.dispatch({"op": "health"}, [])[0]["ready"] is False
