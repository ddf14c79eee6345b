"""TorchScript archives (``torch.jit.save``) on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from handlers.base import Handler, batch_signature
from handlers.torch_common import TorchRunner, compute_dtype, release_cuda_memory, torch_device
from handlers.torch_signature import declared_specs, outputs_from_sample
from serving.types import Artifact, Device, ModelConfig, Tensors, TensorSpec


class TorchScriptHandler(Handler):
    """Loads with ``torch.jit.load``; input names come from the ``forward`` schema."""

    name = "torchscript"

    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Load onto ``device`` in ``config.precision``; dtypes/shapes from ``extra.inputs`` if declared."""
        import torch

        module = torch.jit.load(str(artifact.path), map_location=torch_device(device)).eval()
        dtype = compute_dtype(config)
        if dtype != torch.float32:
            module = module.to(dtype)
        self.module = module
        declared = declared_specs(config)
        self._shapes_known = declared is not None
        inputs = declared or tuple(
            TensorSpec(arg.name, "float32", (-1,)) for arg in module.forward.schema.arguments[1:]
        )
        signature = batch_signature(inputs)
        sizes = signature.batch_sizes or config.batch_sizes
        self.runner = TorchRunner(module, device, config, [s.name for s in inputs], graph_sizes=sizes)
        self.concurrent_batches = self.runner.concurrency
        self.pipelined = self.runner.pipelined
        self.launch_depth = self.runner.depth
        self.takes_rows = self.runner.takes_rows
        outputs = declared_specs(config, "outputs")
        if outputs is None and declared:
            outputs = outputs_from_sample(self.runner, signature)
        self.signature = replace(signature, outputs=outputs or ())

    def warmup(self, batch_sizes: list[int]) -> None:
        """Warm up only when ``extra.inputs`` declared the shapes (a TorchScript file does not record them)."""
        if self._shapes_known:
            super().warmup(batch_sizes)

    def predict(self, inputs: Tensors) -> Tensors:
        """Run ``forward`` on one batch."""
        return self.runner(inputs)

    def launch(self, inputs: Tensors) -> Callable[[], Tensors]:
        """Start ``forward`` on one batch (on CUDA without waiting for it)."""
        return self.runner.launch(inputs)

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The runner's pinned staging buffer to assemble the next batch in (CUDA, one lane)."""
        return self.runner.input_buffer(name, shape, dtype)

    def unload(self) -> None:
        """Drop the module and release cached device memory."""
        self.module = self.runner = None
        release_cuda_memory()
