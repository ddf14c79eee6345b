"""User scripts (code/inference.py) called as the SageMaker inference toolkit calls them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest

from handlers.registry import detect, handler_class
from handlers.user_module import install_requirements
from serving.errors import ConfigError, ModelError, NotAcceptable, UnsupportedMediaType, UserCodeError
from serving.types import Device, ModelConfig, RawRequest
from tests.handlers.conftest import build_onnx


def script(tmp_path, source: str, name: str = "inference.py"):
    (tmp_path / "code").mkdir(exist_ok=True)
    (tmp_path / "code" / name).write_text(textwrap.dedent(source))
    return tmp_path


def load(model_dir, config=ModelConfig(), program=None):
    handler = handler_class("user_script")()
    handler.load(detect(model_dir, program=program), Device("cpu"), config)
    return handler


def request(body=b"[[1, 2]]", content_type="application/json", accept="application/json", attrs=None):
    return RawRequest(body=body, content_type=content_type, accept=accept, custom_attributes=attrs)


def test_toolkit_defaults_decode_predict_and_encode_json(tmp_path):
    handler = load(
        script(
            tmp_path,
            """
        import numpy as np
        from sagemaker_inference import decoder, encoder, content_types

        def model_fn(model_dir):
            return lambda x: np.asarray(x) * 2
        """,
        )
    )
    response = handler.invoke_raw(request(b"[[1, 2], [3, 4]]"))
    assert json.loads(response.body) == [[2, 4], [6, 8]] and response.content_type == "application/json"


def test_str_body_only_for_exact_json_and_csv(tmp_path):
    handler = load(
        script(
            tmp_path,
            """
        def model_fn(model_dir):
            return None

        def transform_fn(model, data, content_type, accept):
            return type(data).__name__
        """,
        )
    )
    assert handler.invoke_raw(request(b"1", "application/json")).body == b"str"
    assert handler.invoke_raw(request(b"1", "text/csv")).body == b"str"
    assert handler.invoke_raw(request(b"1", "application/json; charset=utf-8")).body == b"bytes"
    assert handler.invoke_raw(request(b"1", "application/octet-stream")).body == b"bytes"


def test_context_argument_reads_and_sets_custom_attributes(tmp_path):
    handler = load(
        script(
            tmp_path,
            """
        def model_fn(model_dir, context):
            assert context.system_properties["model_dir"] == model_dir
            return "m"

        def input_fn(data, content_type, context):
            return context.get_request_header(0, "x-amzn-sagemaker-custom-attributes")

        def predict_fn(data, model, context):
            return f"{model}:{data}"

        def output_fn(prediction, accept, context):
            context.set_response_header(0, "X-Amzn-SageMaker-Custom-Attributes", "seen=" + prediction)
            return prediction
        """,
        )
    )
    response = handler.invoke_raw(request(attrs="trace=1"))
    assert response.body == b"m:trace=1" and response.custom_attributes == "seen=m:trace=1"


def test_transform_fn_tuple_overrides_the_content_type(tmp_path):
    handler = load(
        script(
            tmp_path,
            """
        def model_fn(model_dir):
            return None

        def transform_fn(model, data, content_type, accept):
            return "hello", "text/plain"
        """,
        )
    )
    response = handler.invoke_raw(request())
    assert (response.body, response.content_type) == (b"hello", "text/plain")


def test_transform_fn_with_input_fn_is_a_load_error(tmp_path):
    with pytest.raises(ModelError, match="cannot use transform_fn together with input_fn"):
        load(
            script(
                tmp_path,
                """
            def model_fn(d): return None
            def input_fn(b, c): return b
            def transform_fn(m, b, c, a): return b
            """,
            )
        )


def test_toolkit_error_keeps_its_status_and_other_errors_are_500(tmp_path):
    handler = load(
        script(
            tmp_path,
            """
        from sagemaker_inference.errors import BaseInferenceToolkitError

        def model_fn(model_dir):
            return None

        def predict_fn(data, model):
            if data.sum() > 100:
                raise BaseInferenceToolkitError(422, "too big", "Unprocessable")
            raise KeyError("boom")
        """,
        )
    )
    with pytest.raises(UserCodeError) as err:
        handler.invoke_raw(request(b"[1000]"))
    assert (int(err.value.status), err.value.message) == (422, "too big")
    with pytest.raises(ModelError) as err:
        handler.invoke_raw(request(b"[1]"))
    assert err.value.message == "predict_fn raised KeyError: 'boom'" and "Traceback" not in err.value.message


def test_unsupported_content_type_and_accept_map_to_415_and_406(tmp_path):
    handler = load(script(tmp_path, "def model_fn(d):\n    return lambda x: x\n"))
    with pytest.raises(UnsupportedMediaType):
        handler.invoke_raw(request(b"x", "image/png"))
    with pytest.raises(NotAcceptable):
        handler.invoke_raw(request(accept="image/png"))


def test_accept_wildcard_uses_the_default_and_first_supported_type_wins(tmp_path):
    handler = load(
        script(tmp_path, "def model_fn(d):\n    return lambda x: x\n"),
        ModelConfig(extra={"default_accept": "text/csv"}),
    )
    assert handler.invoke_raw(request(b"[1, 2]", accept="*/*")).content_type == "text/csv"
    response = handler.invoke_raw(request(b"[1, 2]", accept="image/png, application/x-npy"))
    assert response.content_type == "application/x-npy"


def test_pickled_npy_is_rejected(tmp_path):
    import io

    handler = load(script(tmp_path, "def model_fn(d):\n    return lambda x: x\n"))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelError, match="ValueError"):
        handler.invoke_raw(request(buf.getvalue(), "application/x-npy"))


def test_script_without_model_fn_uses_the_onnx_model_beside_it(tmp_path):
    w, b = build_onnx(tmp_path / "model.onnx")
    handler = load(
        script(
            tmp_path,
            """
        def output_fn(prediction, accept):
            return str(prediction.shape)
        """,
        )
    )
    assert handler.invoke_raw(request(b"[[1, 2, 3, 4], [0, 0, 0, 0]]")).body == b"(2, 3)"


def test_torch_module_model_runs_under_no_grad_by_default(tmp_path):
    torch = pytest.importorskip("torch")
    handler = load(
        script(
            tmp_path,
            """
        import torch

        def model_fn(model_dir):
            torch.manual_seed(0)
            return torch.nn.Linear(2, 1)
        """,
        )
    )
    out = json.loads(handler.invoke_raw(request(b"[[1, 2]]")).body)
    torch.manual_seed(0)
    reference = torch.nn.Linear(2, 1)
    with torch.no_grad():
        np.testing.assert_allclose(out, reference(torch.tensor([[1.0, 2.0]])).numpy(), rtol=1e-6)


def test_custom_program_name_and_helper_module_on_sys_path(tmp_path):
    script(tmp_path, "FACTOR = 3\n", name="helpers.py")
    handler = load(
        script(
            tmp_path,
            """
        import numpy as np
        import helpers

        def model_fn(model_dir):
            return lambda x: np.asarray(x) * helpers.FACTOR
        """,
            name="custom.py",
        ),
        program="custom.py",
    )
    assert json.loads(handler.invoke_raw(request(b"[1]")).body) == [3]


def test_batched_prepare_predict_finish_round_trip(tmp_path):
    handler = load(
        script(
            tmp_path,
            """
        import numpy as np

        def model_fn(model_dir):
            return lambda x: np.asarray(x).sum(axis=1)
        """,
        ),
        ModelConfig(batch=True, max_batch_size=8),
    )
    first, second = request(b"[[1, 2]]"), request(b"[[3, 4], [5, 6]]")
    batch = np.concatenate([handler.prepare(first)["input"], handler.prepare(second)["input"]])
    out = handler.predict({"input": batch})["output"]
    assert json.loads(handler.finish({"output": out[1:]}, second).body) == [7, 11]


def test_model_fn_failure_is_a_model_error_at_load(tmp_path):
    with pytest.raises(ModelError, match="model_fn raised RuntimeError: no weights"):
        load(script(tmp_path, "def model_fn(d):\n    raise RuntimeError('no weights')\n"))


def test_requirements_with_only_comments_install_nothing(tmp_path):
    (tmp_path / "requirements.txt").write_text("# nothing to install\n")
    install_requirements(tmp_path, [sys.executable, "-m", "pip"])


def test_requirements_failure_raises_a_clear_error(tmp_path):
    (tmp_path / "requirements.txt").write_text("no-such-package-onebox==0\n")
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    with mock.patch("handlers.user_module.subprocess.run", return_value=failed) as run:
        with pytest.raises(ConfigError, match="No matching distribution"):
            install_requirements(tmp_path, ["pip"])
    assert run.call_args.args[0][:3] == ["pip", "install", "--no-input"]


def test_missing_requirements_file_runs_nothing(tmp_path):
    with mock.patch("handlers.user_module.subprocess.run") as run:
        install_requirements(tmp_path, ["pip"])
    run.assert_not_called()
