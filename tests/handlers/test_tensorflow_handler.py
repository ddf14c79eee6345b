"""TensorFlow SavedModel handler: signatures chosen and read, answers against numpy, TF errors mapped."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from handlers.registry import check_compatible, detect, handler_class
from handlers.tensorflow_savedmodel import op_message
from serving.errors import BadRequest, ConfigError, InsufficientMemory
from serving.host.model_config import load_model_config
from serving.host.validation import conform_inputs
from serving.types import BatchMode, Device, ModelConfig
from tests.support import models
from tests.support.models import reference

pytestmark = pytest.mark.tensorflow
tf = pytest.importorskip("tensorflow", reason="needs tensorflow (pip install 'onebox[tensorflow]')")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One SavedModel with the signatures serving_default, pair and rows (tests/support/models.py)."""
    return models.saved_model(tmp_path_factory.mktemp("savedmodel"))


def loaded(model_dir, toml: str = "", device=Device("cpu")):
    """The handler loaded as a host would: detection, compatibility, onebox.toml, load."""
    (model_dir / "onebox.toml").write_text(toml)
    try:
        art = detect(model_dir)
        check_compatible(art, ["cpu"])
        handler = handler_class(art.handler)()
        handler.load(art, device, load_model_config(model_dir, ModelConfig()))
    finally:
        (model_dir / "onebox.toml").unlink()
    return handler


def test_saved_model_is_detected_and_served_by_the_tensorflow_handler(model_dir):
    art = detect(model_dir)
    assert (art.kind, art.handler, art.path.name) == ("tf_savedmodel", "tf_savedmodel", "1")
    done = subprocess.run(
        [sys.executable, "-m", "serving", "detect", str(model_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "handler:  tf_savedmodel" in done.stdout and "not available" not in done.stdout


def test_detection_and_the_handler_module_import_no_tensorflow(model_dir):
    script = (
        "import sys; from pathlib import Path\n"
        "from handlers.registry import check_compatible, describe_detection, detect, handler_class\n"
        f"art = detect(Path({str(model_dir)!r})); describe_detection(art); check_compatible(art, ['cpu'])\n"
        "handler_class(art.handler)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serving_default_signature_computes_x_at_w_plus_b_at_any_batch(model_dir):
    handler = loaded(model_dir)
    sig = handler.signature
    assert sig.batch is BatchMode.DYNAMIC
    assert [(s.name, s.dtype, s.shape) for s in sig.inputs] == [("x", "float32", (-1, 4))]
    assert [(s.name, s.dtype, s.shape) for s in sig.outputs] == [("y", "float32", (-1, 3))]
    handler.warmup([1, 2, 3])
    for rows in (1, 5):
        x = np.random.default_rng(rows).standard_normal((rows, 4))  # float64: cast to float32
        np.testing.assert_allclose(handler.predict({"x": x})["y"], reference(x), rtol=1e-5)


def test_onebox_toml_names_a_two_input_two_output_signature(model_dir):
    handler = loaded(model_dir, 'signature_name = "pair"\n')
    assert [(s.name, s.dtype, s.shape) for s in handler.signature.inputs] == [
        ("a", "float32", (-1, 4)),
        ("n", "int32", (-1,)),
    ]
    assert {s.name: s.dtype for s in handler.signature.outputs} == {"sum": "float32", "twice": "int32"}
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = handler.predict({"a": a, "n": np.array([1, -2, 7])})
    np.testing.assert_allclose(out["sum"], reference(a), rtol=1e-6)
    assert out["twice"].tolist() == [2, -4, 14] and out["twice"].dtype == np.int32


def test_unknown_signature_is_refused_naming_the_ones_there(model_dir):
    with pytest.raises(ConfigError, match=r"no signature 'nope'.*\['pair', 'rows', 'serving_default'\]"):
        loaded(model_dir, 'signature_name = "nope"\n')


def test_tags_that_name_no_meta_graph_are_refused(model_dir):
    with pytest.raises(ConfigError, match="MetaGraph with tags.*serve.*choose tags in onebox.toml"):
        loaded(model_dir, 'tags = ["gpu"]\n')
    with pytest.raises(ConfigError, match="tags must be a list of strings"):
        loaded(model_dir, "tags = 5\n")


def test_static_batch_saved_model_is_fixed_batch(tmp_path):
    handler = loaded(models.saved_model(tmp_path, batch=2))
    assert (handler.signature.batch, handler.signature.batch_sizes) == (BatchMode.FIXED, (2,))
    handler.warmup([2])
    with pytest.raises(BadRequest, match=r"must have shape \[2, 4\], got \[3, 4\]"):
        handler.predict({"x": np.zeros((3, 4), np.float32)})


def test_wrong_shape_dtype_or_names_are_bad_requests_before_tensorflow_runs(model_dir):
    handler = loaded(model_dir, 'signature_name = "pair"\n')
    a = np.zeros((2, 4), np.float32)
    with pytest.raises(BadRequest, match=r"input 'a' must have shape \[\?, 4\], got \[2, 5\]"):
        handler.predict({"a": np.zeros((2, 5), np.float32), "n": np.zeros(2, np.int32)})
    # dtypes: the host's check of each request against the handler's signature, which casts
    with pytest.raises(BadRequest, match="input 'n' must be int32, got non-integer values"):
        handler.predict(conform_inputs({"a": a, "n": np.array([0.5, 1.0])}, handler.signature))
    conformed = conform_inputs({"a": a.astype(np.float64), "n": np.array([1.0, 2.0])}, handler.signature)
    assert handler.predict(conformed)["twice"].tolist() == [2, 4]
    with pytest.raises(BadRequest, match="missing input 'n'"):
        handler.predict({"a": a})


def test_graph_refusal_is_a_bad_request_without_tensorflow_internals(tmp_path):
    class Free(tf.Module):  # no dimension known: only the graph's MatMul can refuse a shape
        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(x, tf.constant(models.W))}

    module = Free()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures=module.serve)
    handler = loaded(tmp_path)
    np.testing.assert_allclose(handler.predict({"x": np.ones((1, 4))})["y"], np.ones((1, 4)) @ models.W)
    with pytest.raises(BadRequest, match="Matrix size-incompatible") as info:
        handler.predict({"x": np.ones((2, 5), np.float32)})
    assert "Detected at node" not in info.value.message and "[Op:" not in info.value.message


@pytest.mark.slow  # TensorFlow's allocator retries for ~10 s before it gives up
def test_running_out_of_memory_in_a_batch_is_507(tmp_path):
    class Huge(tf.Module):  # k rows of 2**30 floats: 4 GiB per row, refused by the allocator
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="k")])
        def serve(self, k):
            return {"s": tf.reduce_sum(tf.fill(tf.stack([k[0], tf.constant(1 << 30, tf.int64)]), 1.0), 1)}

    module = Huge()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures=module.serve)
    handler = loaded(tmp_path, "warmup = false\n")
    with pytest.raises(InsufficientMemory, match="OOM when allocating") as info:
        handler.predict({"k": np.array([4096])})
    assert info.value.status == 507


def test_keras_export_is_served_through_its_serving_default(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(3)])
    model.layers[-1].set_weights([models.W, models.B])
    model.export(str(tmp_path / "exported"), verbose=False)
    handler = loaded(tmp_path)
    assert [s.name for s in handler.signature.inputs] == ["features"]
    x = np.eye(4, dtype=np.float32)
    (out,) = handler.predict({"features": x}).values()
    np.testing.assert_allclose(out, reference(x), rtol=1e-6)


def test_threads_set_tensorflow_intra_op_pool_before_its_runtime_starts(model_dir):
    script = (
        "from pathlib import Path; import tensorflow as tf\n"
        "from handlers.registry import detect, handler_class\n"
        "from serving.types import Device, ModelConfig\n"
        f"art = detect(Path({str(model_dir)!r}))\n"
        "for threads in (1, 2):  # the second load finds the runtime started: kept, not failed\n"
        "    handler_class(art.handler)().load(art, Device('cpu'), ModelConfig(threads=threads))\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "1"
    assert "TensorFlow kept its earlier setting for threads" in out.stderr


def test_cuda_without_a_gpu_tensorflow_is_refused_not_run_on_the_cpu(model_dir):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this TensorFlow sees a GPU")
    with pytest.raises(ConfigError, match="tensorflow-cpu has no GPU support"):
        loaded(model_dir, device=Device("cuda", 0))


def test_op_message_keeps_what_a_client_can_act_on():
    error = tf.errors.InvalidArgumentError(
        None,
        None,
        "Graph execution error:\n\nDetected at node add defined at (most recent call last):\n"
        "<stack traces unavailable>\nIn[0] is not a matrix\n\t [[{{node add}}]] [Op:__inference_serve_1]",
    )
    assert op_message(error) == "In[0] is not a matrix"
