"""ONNX Runtime handler: providers, signature from the session, predictions against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.onnx_runtime import providers_for
from handlers.registry import detect, handler_class
from serving.errors import BadRequest, ServingError
from serving.types import BatchMode, Device, ModelConfig
from tests.handlers.conftest import build_onnx

pytest.importorskip("onnxruntime")


def load(tmp_path, config=ModelConfig(), device=Device("cpu"), **kw):
    w, b = build_onnx(tmp_path / "model.onnx", **kw)
    handler = handler_class("onnx")()
    handler.load(detect(tmp_path), device, config)
    return handler, w, b


def test_dynamic_onnx_predicts_relu_affine_at_any_batch(tmp_path):
    handler, w, b = load(tmp_path, ModelConfig(threads=1))
    assert handler.signature.batch is BatchMode.DYNAMIC
    assert [(s.name, s.dtype, s.shape) for s in handler.signature.inputs] == [("x", "float32", (-1, 4))]
    assert [s.name for s in handler.signature.outputs] == ["y"]
    x = np.random.default_rng(0).standard_normal((6, 4))  # float64 in: cast to the declared float32
    np.testing.assert_allclose(
        handler.predict({"x": x})["y"], np.maximum(x.astype(np.float32) @ w + b, 0), rtol=1e-5
    )


def test_static_onnx_is_fixed_batch(tmp_path):
    handler, *_ = load(tmp_path, batch=2)
    assert (handler.signature.batch, handler.signature.batch_sizes) == (BatchMode.FIXED, (2,))
    handler.warmup([2])


def test_missing_onnx_input_is_a_bad_request(tmp_path):
    handler, *_ = load(tmp_path)
    with pytest.raises(BadRequest, match="missing input 'x'"):
        handler.predict({"z": np.zeros((1, 4), np.float32)})


def test_cuda_providers_carry_the_device_id_and_tensorrt_when_asked():
    assert providers_for(Device("cuda", 1), ModelConfig()) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    providers = providers_for(Device("cuda", 0), ModelConfig(extra={"tensorrt": True}))
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[0][1]["device_id"] == 0


def test_cuda_request_without_gpu_provider_is_refused_not_silently_cpu(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")
    with pytest.raises(ServingError, match="CUDAExecutionProvider is not in this onnxruntime build"):
        load(tmp_path, device=Device("cuda", 0))
