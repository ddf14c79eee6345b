"""torch.export ExportedProgram archives (``torch.export.save`` ``.pt2``)."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from handlers.base import Handler
from handlers.torch_common import (
    EXPORT_DTYPES,
    TorchRunner,
    compute_dtype,
    output_names,
    release_cuda_memory,
    torch_device,
)
from handlers.torch_signature import check_batch
from serving.types import Artifact, BatchMode, Device, ModelConfig, Signature, Tensors, TensorSpec

_SYMBOL = re.compile(r"Symbol\('(\w+)'")


def read_program_signature(path: Path, model_json: str) -> Signature:
    """The signature recorded in ``models/*.json``, read without executing anything.

    A static leading dimension gives FIXED batch sizes; a symbolic one gives DYNAMIC with the
    upper bound from ``range_constraints``.
    """
    with zipfile.ZipFile(path) as z:
        program = json.loads(z.read(model_json))
    graph_module = program["graph_module"]
    metas = graph_module["graph"]["tensor_values"]
    ranges = program.get("range_constraints", {})
    spec = graph_module["signature"]
    user_in = [s["user_input"]["arg"] for s in spec["input_specs"] if "user_input" in s]
    user_out = [s["user_output"]["arg"] for s in spec["output_specs"] if "user_output" in s]

    def tensor(name: str, arg: dict) -> tuple[TensorSpec, object]:
        meta = metas[arg["as_tensor"]["name"]]
        dims, first = [], None
        for i, size in enumerate(meta["sizes"]):
            if "as_int" in size:
                dims.append(size["as_int"])
            else:
                dims.append(-1)
            if i == 0:
                first = size
        return TensorSpec(name, EXPORT_DTYPES.get(meta["dtype"], "float32"), tuple(dims)), first

    inputs = [tensor(a["as_tensor"]["name"], a) for a in user_in if "as_tensor" in a]
    outputs = [
        tensor(n, a)[0]
        for n, a in zip(output_names(len(user_out)), user_out, strict=True)
        if "as_tensor" in a
    ]
    leading = [first for _, first in inputs if first is not None]
    specs = tuple(s for s, _ in inputs)
    if not leading:
        return Signature(inputs=specs, outputs=tuple(outputs), batch=BatchMode.NONE)
    if all("as_int" in d for d in leading):
        size = leading[0]["as_int"]
        return Signature(
            inputs=specs, outputs=tuple(outputs), batch=BatchMode.FIXED, batch_sizes=(size,), max_batch=size
        )
    symbol = _SYMBOL.search(json.dumps(leading[0]))
    bound = ranges.get(symbol.group(1), {}).get("max_val") if symbol else None
    max_batch = bound if isinstance(bound, int) and bound < 2**31 else None
    return Signature(inputs=specs, outputs=tuple(outputs), batch=BatchMode.DYNAMIC, max_batch=max_batch)


class TorchExportHandler(Handler):
    """Loads with ``torch.export.load(...).module()``, moved to the device when it is CUDA."""

    name = "torch_export"

    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Load, place and cast the program; the signature comes from its JSON."""
        import torch

        self.signature = read_program_signature(artifact.path, artifact.details["model_json"])
        target = torch_device(device)
        program = torch.export.load(str(artifact.path))
        if target.type != "cpu":
            from torch.export.passes import move_to_device_pass  # a submodule torch.export does not import

            program = move_to_device_pass(program, target)
        module = program.module()
        dtype = compute_dtype(config)
        if dtype != torch.float32:
            module = module.to(dtype)
        self.module = module
        sizes = self.signature.batch_sizes or config.batch_sizes
        self.runner = TorchRunner(
            module, device, config, [s.name for s in self.signature.inputs], graph_sizes=sizes
        )
        self.concurrent_batches = self.runner.concurrency
        self.pipelined = self.runner.pipelined
        self.launch_depth = self.runner.depth
        self.takes_rows = self.runner.takes_rows

    def predict(self, inputs: Tensors) -> Tensors:
        """Run the program on one batch (its guards reject shapes it was not exported for)."""
        return self.launch(inputs)()

    def launch(self, inputs: Tensors) -> Callable[[], Tensors]:
        """Start the program on one batch (on CUDA without waiting for it)."""
        check_batch(self.signature, inputs)
        return self.runner.launch(inputs)

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The runner's pinned staging buffer to assemble the next batch in (CUDA, one lane)."""
        return self.runner.input_buffer(name, shape, dtype)

    def unload(self) -> None:
        """Drop the program and release cached device memory."""
        self.module = self.runner = None
        release_cuda_memory()
