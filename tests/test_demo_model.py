"""The committed demo model (build/demo/model/model.onnx) is current and runs in ONNX Runtime."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the demo model is built with onnx.helper")
ort = pytest.importorskip("onnxruntime", reason="the demo model is checked by running it in ONNX Runtime")

DEMO = Path(__file__).resolve().parents[1] / "build" / "demo"
MODEL = DEMO / "model" / "model.onnx"
IRIS = np.array(
    [
        [5.1, 3.5, 1.4, 0.2],
        [7.0, 3.2, 4.7, 1.4],
        [6.3, 3.3, 6.0, 2.5],
        [4.9, 3.0, 1.4, 0.2],
        [6.4, 3.2, 4.5, 1.5],
    ],
    dtype=np.float32,
)


def _make_model_module():
    spec = importlib.util.spec_from_file_location("make_model", DEMO / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


def test_committed_model_is_what_make_model_builds(tmp_path):
    out = tmp_path / "model.onnx"
    assert _make_model_module().main(["make_model.py", str(out)]) == 0
    assert out.read_bytes() == MODEL.read_bytes()
    assert MODEL.stat().st_size < 8192


def test_model_declares_a_dynamic_batch_ir_10_and_opset_17():
    model = onnx.load(MODEL)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (features,) = model.graph.input
    (probabilities,) = model.graph.output
    assert features.name == "features" and probabilities.name == "probabilities"
    dims = [d.dim_param or d.dim_value for d in features.type.tensor_type.shape.dim]
    assert dims == ["batch", 4]


@pytest.mark.parametrize("batch", [1, 5])
def test_runs_at_batch_sizes_and_returns_probabilities(session, batch):
    (probabilities,) = session.run(None, {"features": IRIS[:batch]})
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (batch, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_classic_iris_examples_land_in_three_different_classes(session):
    (probabilities,) = session.run(None, {"features": IRIS})
    assert probabilities.argmax(axis=1).tolist() == [0, 1, 2, 0, 1]
    assert (probabilities.max(axis=1) > 0.8).all()


def test_rows_are_independent_of_their_batch(session):
    (alone,) = session.run(None, {"features": IRIS[2:3]})
    (batched,) = session.run(None, {"features": IRIS})
    np.testing.assert_allclose(batched[2:3], alone, rtol=1e-6)
