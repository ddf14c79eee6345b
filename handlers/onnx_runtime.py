"""ONNX and ORT-format models on ONNX Runtime (CPU, CUDA or TensorRT execution providers)."""

from __future__ import annotations

import numpy as np

from handlers.base import Handler, batch_signature
from serving.errors import BadRequest, ConfigError, ServingError
from serving.types import Artifact, Device, ModelConfig, Signature, Tensors, TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


class ProviderNotAttached(ServingError):
    """ONNX Runtime fell back to the CPU although an accelerator provider was asked for."""


def providers_for(device: Device, config: ModelConfig) -> list:
    """The execution-provider list for ``device``; ``extra.tensorrt = true`` puts TensorRT first on CUDA."""
    if device.kind == "cpu":
        return ["CPUExecutionProvider"]
    if device.kind != "cuda":
        raise ConfigError(f"ONNX Runtime here runs on cpu or cuda, not {device.name}")
    index = device.index or 0
    providers: list = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if config.extra.get("tensorrt"):
        trt = {
            "device_id": index,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(config.extra.get("trt_cache_dir", "/tmp/onebox-trt-cache")),
        }
        providers.insert(0, ("TensorrtExecutionProvider", trt))
    return providers


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, _ORT_TYPES.get(node.type, "float32"), shape)


def session_signature(session) -> Signature:
    """Inputs/outputs from the session; a fixed leading dim means FIXED batch, symbolic means DYNAMIC."""
    inputs = tuple(_spec(i) for i in session.get_inputs())
    outputs = tuple(_spec(o) for o in session.get_outputs())
    return batch_signature(inputs, outputs)


class OnnxHandler(Handler):
    """An ``onnxruntime.InferenceSession`` whose accelerator provider is checked to have attached."""

    name = "onnx"

    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Create the session (by path, so external data resolves) and verify its providers."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if config.threads:
            options.intra_op_num_threads = config.threads
        wanted = providers_for(device, config)
        available = set(ort.get_available_providers())
        first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
        if first not in available:
            raise ProviderNotAttached(
                f"{first} is not in this onnxruntime build (available: {sorted(available)}); install "
                "onnxruntime-gpu with matching CUDA libraries, or serve on cpu"
            )
        self.session = ort.InferenceSession(str(artifact.path), sess_options=options, providers=wanted)
        attached = self.session.get_providers()
        if device.kind == "cuda" and not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(
            attached
        ):
            raise ProviderNotAttached(
                f"ONNX Runtime did not attach the CUDA provider on {device.name} (attached: {attached}); "
                "check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed"
            )
        self.signature = session_signature(self.session)
        self._output_names = [o.name for o in self.signature.outputs]

    def predict(self, inputs: Tensors) -> Tensors:
        """Run one batch; inputs are cast to the dtypes the model declares."""
        feed = {}
        for spec in self.signature.inputs:
            if spec.name not in inputs:
                raise BadRequest(
                    f"missing input {spec.name!r}; the model takes {[s.name for s in self.signature.inputs]}"
                )
            feed[spec.name] = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
        results = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, results, strict=True))

    def unload(self) -> None:
        """Release the session."""
        self.session = None
