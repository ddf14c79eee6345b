"""Build the demo model: a tiny iris-style ONNX classifier, with onnx.helper only.

Input ``features`` float32 ``[batch, 4]`` (sepal length, sepal width, petal length, petal width,
in cm); output ``probabilities`` float32 ``[batch, 3]`` (setosa, versicolor, virginica).

The weights are set by hand rather than trained or drawn at random, so the file is byte-for-byte
reproducible and the three classic iris examples land in three different classes. The hidden
layer computes four ReLU features of the petal: "short petal", "petal length above 2.5 cm",
"petal length above 4.9 cm" and "petal width above 1.7 cm"; the output layer weighs them.

Run: ``.venv/bin/python build/demo/make_model.py`` (writes ``build/demo/model/model.onnx``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = ("setosa", "versicolor", "virginica")
OUTPUT_PATH = Path(__file__).resolve().parent / "model" / "model.onnx"

# Rows: sepal length, sepal width, petal length, petal width. Columns: hidden units.
W1 = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [-1.0, 1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ],
    dtype=np.float32,
)
B1 = np.array([2.5, -2.5, -4.9, -1.7], dtype=np.float32)
# Rows: hidden units. Columns: setosa, versicolor, virginica logits.
W2 = np.array(
    [
        [4.0, 0.0, 0.0],
        [0.0, 1.5, 0.5],
        [0.0, -4.0, 4.0],
        [0.0, -4.0, 4.0],
    ],
    dtype=np.float32,
)
B2 = np.zeros(3, dtype=np.float32)


def build_model() -> onnx.ModelProto:
    """The classifier as an ONNX model (IR version 10, opset 17) with a dynamic batch."""
    nodes = [
        helper.make_node("MatMul", ["features", "W1"], ["hidden_linear"]),
        helper.make_node("Add", ["hidden_linear", "B1"], ["hidden_biased"]),
        helper.make_node("Relu", ["hidden_biased"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "W2"], ["logits_linear"]),
        helper.make_node("Add", ["logits_linear", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "iris_mlp",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(W1, "W1"),
            numpy_helper.from_array(B1, "B1"),
            numpy_helper.from_array(W2, "W2"),
            numpy_helper.from_array(B2, "B2"),
        ],
    )
    model = helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="onebox build/demo/make_model.py",
        doc_string="Iris-style demo classifier: features[batch,4] -> probabilities[batch,3]",
    )
    helper.set_model_props(model, {"labels": ",".join(LABELS)})
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str]) -> int:
    """Write the model to the path given, or to ``build/demo/model/model.onnx``."""
    path = Path(argv[1]) if len(argv) > 1 else OUTPUT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(), path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
