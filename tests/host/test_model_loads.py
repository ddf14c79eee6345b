"""Loading into a host's registry as a multi-model endpoint does: no failed entry kept, a memory
cap, running out of memory as 507 (serving.host.registry)."""

from __future__ import annotations

import pytest

from handlers.onnx_runtime import OnnxHandler
from serving.errors import InsufficientMemory, NotFound
from serving.host.process import Host
from serving.host.registry import State
from serving.settings import Settings
from serving.types import Device
from tests.support.models import onnx_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def host():
    made: list[Host] = []

    def make(**env) -> Host:
        made.append(Host(Settings.from_env(env), Device.parse("cpu")))
        return made[-1]

    yield make
    for each in made:
        each.registry.close()


def test_a_failed_load_keeps_its_reason_for_the_single_model_and_nothing_otherwise(host, tmp_path):
    registry = host().registry
    with pytest.raises(NotFound):
        registry.load("kept", tmp_path / "missing")
    assert [(m.name, m.state) for m in registry.models()] == [("kept", State.FAILED)]
    with pytest.raises(NotFound):
        registry.load("gone", tmp_path / "missing", keep_failure=False)
    assert [m.name for m in registry.models()] == ["kept"]


def test_the_load_op_leaves_no_entry_when_the_load_fails(host, tmp_path):
    serving = host()
    with pytest.raises(NotFound):
        serving.dispatch({"op": "load", "model": "m", "path": str(tmp_path / "missing")}, [])
    assert serving.registry.models() == []


def test_models_past_the_memory_cap_are_refused_until_one_is_unloaded(host, tmp_path):
    small = onnx_model(tmp_path / "small")
    big = onnx_model(tmp_path / "big")
    size = sum(p.stat().st_size for p in small.iterdir())
    (big / "weights.bin").write_bytes(b"\0" * (1024 * 1024 - 2 * size))  # big alone fits in 1 MB
    registry = host(ONEBOX_MODEL_MEMORY_MB="1").registry
    assert registry.load("small", small, keep_failure=False).footprint == size
    registry.load("small2", onnx_model(tmp_path / "small2"), keep_failure=False)
    with pytest.raises(InsufficientMemory, match="ONEBOX_MODEL_MEMORY_MB"):
        registry.load("big", big, keep_failure=False)
    assert sorted(m.name for m in registry.models()) == ["small", "small2"]
    registry.unload("small")
    registry.unload("small2")
    assert registry.load("big", big, keep_failure=False).state is State.READY


def test_no_cap_by_default(host, tmp_path):
    model = host().registry.load("m", onnx_model(tmp_path / "m"))
    assert model.footprint == 0 and model.describe()["footprint"] == 0


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     type("OutOfMemoryError", (RuntimeError,), {})("CUDA error")],
)  # fmt: skip
def test_a_load_that_runs_out_of_memory_is_507(host, tmp_path, monkeypatch, error):
    def out_of_memory(self, artifact, device, config):
        raise error

    monkeypatch.setattr(OnnxHandler, "load", out_of_memory)
    registry = host().registry
    with pytest.raises(InsufficientMemory, match="not enough memory to load model 'm'"):
        registry.load("m", onnx_model(tmp_path / "m"), keep_failure=False)
    assert registry.models() == []


def test_other_load_errors_keep_their_own_status(host, tmp_path, monkeypatch):
    def broken(self, artifact, device, config):
        raise ValueError("a corrupt graph")

    monkeypatch.setattr(OnnxHandler, "load", broken)
    with pytest.raises(ValueError, match="corrupt"):
        host().registry.load("m", onnx_model(tmp_path / "m"), keep_failure=False)
