"""Tiny real models of every kind, all computing the same function so answers can be checked.

``reference(x) = x @ W + b`` with ``x`` of shape ``[rows, 4]`` (float32) and 3 outputs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

W = np.array([[1.0, 0.5, -1.0], [0.0, 2.0, 1.0], [-0.5, 1.0, 0.0], [2.0, -1.0, 0.5]], dtype=np.float32)
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def reference(x) -> np.ndarray:
    """What every model here returns for ``x``."""
    return np.asarray(x, dtype=np.float32) @ W + B


def onnx_model(model_dir: Path, batch: int | None = None) -> Path:
    """An ONNX Runtime model: input ``x`` [batch, 4] -> output ``y`` [batch, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim = batch if batch is not None else "batch"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_dir / "model.onnx"))
    return model_dir


def _torch_module():
    import torch

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(W.copy()))
            self.b = torch.nn.Parameter(torch.from_numpy(B.copy()))

        def forward(self, x):
            return x @ self.w + self.b

    return Linear().eval()


def torchscript_model(model_dir: Path) -> Path:
    """A traced TorchScript module in ``model.pt``."""
    import torch

    model_dir.mkdir(parents=True, exist_ok=True)
    traced = torch.jit.trace(_torch_module(), torch.zeros(2, 4))
    torch.jit.save(traced, str(model_dir / "model.pt"))
    return model_dir


def exported_program_model(model_dir: Path, static_batch: int | None = None) -> Path:
    """A torch.export ExportedProgram in ``model.pt2`` (dynamic batch up to 64 unless static)."""
    import torch

    model_dir.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(static_batch or 2, 4),)
    dynamic = None if static_batch else ({0: torch.export.Dim("batch", min=1, max=64)},)
    program = torch.export.export(_torch_module(), example, dynamic_shapes=dynamic)
    torch.export.save(program, str(model_dir / "model.pt2"))
    return model_dir


def user_script_model(model_dir: Path, source: str, requirements: str | None = None,
                      program: str = "inference.py") -> Path:  # fmt: skip
    """A model directory holding only ``code/<program>`` (and optionally requirements.txt)."""
    code = model_dir / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / program).write_text(textwrap.dedent(source))
    if requirements is not None:
        (code / "requirements.txt").write_text(requirements)
    return model_dir


#: an inference.py written the way SageMaker users write them, importing the toolkit's helpers
TOOLKIT_SCRIPT = """
import json
import numpy as np
from sagemaker_inference import content_types, decoder, encoder, errors

W = np.array(__W__, dtype=np.float32)
B = np.array(__B__, dtype=np.float32)

def model_fn(model_dir):
    return {"w": W, "b": B}

def input_fn(input_data, content_type):
    if content_type == content_types.JSON:
        return np.asarray(json.loads(input_data), dtype=np.float32)
    if content_type == "application/x-fail":
        raise errors.GenericInferenceToolkitError(422, "the script refused this input")
    return decoder.decode(input_data, content_type).astype(np.float32)

def predict_fn(data, model):
    if data.ndim != 2:
        raise ValueError("expected rows")
    return data @ model["w"] + model["b"]

def output_fn(prediction, accept):
    return encoder.encode(prediction, accept)
""".replace("__W__", str(W.tolist())).replace("__B__", str(B.tolist()))


def saved_model(model_dir: Path, batch: int | None = None) -> Path:
    """A TensorFlow SavedModel in ``model_dir/1`` (TF Serving's version folder; a ``tf.Module`` saved
    with three signatures).

    - ``serving_default``: ``x`` [batch, 4] float32 -> ``y`` [batch, 3] (``reference``);
    - ``pair``: ``a`` [batch, 4] float32 and ``n`` [batch] int32 -> ``sum`` (``reference(a)``) and
      ``twice`` (``2 * n``);
    - ``rows``: ``x`` -> ``y`` and ``rows``, each row's count of rows in the batch it ran in, so a
      client sees the batch its request joined.

    ``batch`` fixes the leading dimension (a static-batch model); None leaves it free.
    """
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = tf.Variable(W), tf.Variable(B)

        @tf.function(input_signature=[tf.TensorSpec([batch, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(x, self.w) + self.b}

        @tf.function(
            input_signature=[
                tf.TensorSpec([batch, 4], tf.float32, name="a"),
                tf.TensorSpec([batch], tf.int32, name="n"),
            ]
        )
        def pair(self, a, n):
            return {"sum": tf.matmul(a, self.w) + self.b, "twice": n * 2}

        @tf.function(input_signature=[tf.TensorSpec([batch, 4], tf.float32, name="x")])
        def rows(self, x):
            count = tf.shape(x)[0]
            return {"y": tf.matmul(x, self.w) + self.b, "rows": tf.fill([count], count)}

    module = Linear()
    signatures = {"serving_default": module.serve, "pair": module.pair, "rows": module.rows}
    model_dir.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(model_dir / "1"), signatures=signatures)
    return model_dir
