"""AOTInductor packages run without holding the GIL (handlers/aoti_nogil.py), with torch's answers.

torch's own binding holds the GIL through the whole call; on a GPU host that stalled the host's
request reader and reply sender for every batch's kernel launches (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from handlers import aoti_nogil
from serving.types import ModelConfig
from tests.handlers.test_torch_handlers import expected, loaded

torch = pytest.importorskip("torch")

SIDE = 384


class Slow(torch.nn.Module):
    """~0.1-0.5 s of CPU per call: long enough to see whether other Python threads run meanwhile."""

    def forward(self, x):
        for _ in range(200):
            x = torch.tanh(x @ x.T @ x) * 0.5
        return x, x.sum(1)


@pytest.fixture(scope="session")
def extension():
    if aoti_nogil._extension() is None:
        pytest.skip("the GIL-free AOTInductor call cannot be built here (needs a C++ compiler and ninja)")


@pytest.fixture(scope="session")
def slow_package(tmp_path_factory, extension):
    path = tmp_path_factory.mktemp("aoti-slow") / "model.pt2"
    try:
        program = torch.export.export(Slow().eval(), (torch.randn(SIDE, SIDE),))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # no compiler toolchain on this host
        pytest.skip(f"AOTInductor compilation unavailable here: {type(exc).__name__}: {exc}")
    return path


def _spins_during(call) -> tuple[int, float]:
    """How often a spinning Python thread got to count while ``call()`` ran, and the call's seconds."""
    count, stop, running = [0], threading.Event(), threading.Event()

    def spin():
        running.set()
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    running.wait(5)
    before, started = count[0], time.perf_counter()
    call()
    spins, seconds = count[0] - before, time.perf_counter() - started
    stop.set()
    thread.join()
    return spins, seconds


def test_the_package_runs_while_other_python_threads_run(slow_package):
    x = np.random.default_rng(0).standard_normal((SIDE, SIDE)).astype(np.float32)
    free = loaded(slow_package)
    held = loaded(slow_package, ModelConfig(extra={"aoti_release_gil": False}))
    assert free.releases_gil and not held.releases_gil
    inputs = {free.signature.inputs[0].name: x}
    free.predict(inputs), held.predict(inputs)  # first calls allocate; measure the second
    spins_free, seconds_free = _spins_during(lambda: free.predict(inputs))
    spins_held, seconds_held = _spins_during(lambda: held.predict(inputs))
    # holding the GIL, the counter runs only in the call's Python edges (a switch interval or two)
    per_second_free, per_second_held = spins_free / seconds_free, spins_held / seconds_held
    assert per_second_free > 5 * per_second_held, (spins_free, seconds_free, spins_held, seconds_held)
    print(f"spins/s while the package ran: GIL released {per_second_free:,.0f}, held {per_second_held:,.0f}")
    assert seconds_held > 4 * sys.getswitchinterval()  # long enough for the comparison to mean something


def test_gil_free_calls_answer_exactly_as_torch_does_with_the_same_output_names(
    slow_package, aoti_package, torch_artifacts
):
    x = np.random.default_rng(1).standard_normal((SIDE, SIDE)).astype(np.float32)
    handler = loaded(slow_package)
    inputs = {handler.signature.inputs[0].name: x}
    free = handler.predict(inputs)
    held = loaded(slow_package, ModelConfig(extra={"aoti_release_gil": False})).predict(inputs)
    assert list(free) == list(held) and len(free) == 2
    for name in free:
        np.testing.assert_array_equal(free[name], held[name])
    _, model = torch_artifacts
    small = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    handler = loaded(aoti_package)
    assert handler.releases_gil
    np.testing.assert_allclose(
        handler.predict({"input": small})["output"], expected(model, small), rtol=1e-5, atol=1e-6
    )


def test_without_the_extension_the_handler_falls_back_to_torchs_call(
    aoti_package, torch_artifacts, monkeypatch
):
    monkeypatch.setattr(aoti_nogil, "_extension", lambda: None)
    handler = loaded(aoti_package)
    assert not handler.releases_gil
    _, model = torch_artifacts
    small = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(
        handler.predict({"input": small})["output"], expected(model, small), rtol=1e-5, atol=1e-6
    )


def test_aoti_release_gil_must_be_a_boolean(aoti_package):
    from serving.errors import ConfigError

    with pytest.raises(ConfigError, match="aoti_release_gil must be true or false"):
        loaded(aoti_package, ModelConfig(extra={"aoti_release_gil": "false"}))


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    # torch waits for its build lock to go away: a build killed halfway made every later load hang
    lock = tmp_path / "lock"
    lock.touch()
    assert not aoti_nogil.clear_stale_lock(str(tmp_path)) and lock.exists()  # a build running now
    old = time.time() - aoti_nogil.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert aoti_nogil.clear_stale_lock(str(tmp_path)) and not lock.exists()
    assert not aoti_nogil.clear_stale_lock(str(tmp_path))  # no lock at all
