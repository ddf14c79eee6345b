"""``Host.dispatch_nowait``, the path the host's I/O thread takes for model calls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.host.process import Host
from serving.ipc.protocol import encode_tensors
from serving.ipc.server import Pending
from serving.settings import Settings
from serving.types import Device
from tests.support.models import onnx_model, reference

pytest.importorskip("onnxruntime")


@pytest.fixture
def host(tmp_path):
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    host.load_at_start("linear", onnx_model(tmp_path / "linear"))
    yield host
    host.registry.close()


READER_INLINE_S = Settings().reader_inline_ms / 1000.0


def _call(host: Host, x: np.ndarray, alone: bool = True) -> Pending:
    specs, buffers = encode_tensors({"x": x})
    header = {"op": "infer", "model": "linear", "inputs": specs, "deadline": time.time() + 5}
    return host.dispatch_nowait(header, [memoryview(b) for b in buffers], alone)


def test_a_quick_idle_model_is_run_on_the_io_thread_itself(host):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    first = _call(host, x)  # how long this model's batches take is not known yet: queued
    assert isinstance(first, Pending)
    np.testing.assert_allclose(first.future.result(5)["y"], reference(x), rtol=1e-6)
    batcher = host.registry.get("linear").batcher
    assert batcher._recent_compute < READER_INLINE_S  # a one-row linear model takes microseconds
    ran_on = []
    runner = batcher._run
    batcher._run = lambda inputs: ran_on.append(threading.current_thread()) or runner(inputs)
    second = _call(host, x + 1)
    assert second.future.done()  # answered before dispatch_nowait returned
    assert ran_on == [threading.current_thread()]
    np.testing.assert_allclose(second.future.result()["y"], reference(x + 1), rtol=1e-6)


def test_a_call_that_arrived_with_others_is_queued_even_for_a_quick_model(host):
    x = np.ones((1, 4), dtype=np.float32)
    _call(host, x).future.result(5)  # measured: quick
    batcher = host.registry.get("linear").batcher
    runner = batcher._run
    ran_on = []
    batcher._run = lambda inputs: ran_on.append(threading.current_thread()) or runner(inputs)
    pending = _call(host, x, alone=False)  # others were readable: they may batch with it
    np.testing.assert_allclose(pending.future.result(5)["y"], reference(x), rtol=1e-6)
    assert ran_on and ran_on[0] is not threading.current_thread()


def test_reader_inline_ms_0_never_runs_a_model_on_the_io_thread(tmp_path):
    host = Host(Settings.from_env({"ONEBOX_READER_INLINE_MS": "0"}), Device.parse("cpu"))
    host.load_at_start("linear", onnx_model(tmp_path / "linear"))
    try:
        x = np.ones((1, 4), dtype=np.float32)
        _call(host, x).future.result(5)
        batcher = host.registry.get("linear").batcher
        runner = batcher._run
        ran_on = []
        batcher._run = lambda inputs: ran_on.append(threading.current_thread()) or runner(inputs)
        _call(host, x).future.result(5)
        assert ran_on and ran_on[0] is not threading.current_thread()
    finally:
        host.registry.close()


def test_a_slow_model_is_never_run_on_the_io_thread(host):
    x = np.ones((1, 4), dtype=np.float32)
    _call(host, x).future.result(5)
    batcher = host.registry.get("linear").batcher
    runner = batcher._run
    ran_on = []

    def slow(inputs):
        ran_on.append(threading.current_thread())
        time.sleep(READER_INLINE_S * 3)
        return runner(inputs)

    batcher._run = slow
    for _ in range(4):  # the recent average climbs over the limit within a few batches
        _call(host, x).future.result(5)
    ran_on.clear()
    pending = _call(host, x)
    np.testing.assert_allclose(pending.future.result(5)["y"], reference(x), rtol=1e-6)
    assert ran_on and ran_on[0] is not threading.current_thread()
