"""Custom `inference.py` served by a real `onebox serve` (contract cases 25, 28, 30–33)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile

import pytest

from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow

ECHO_ATTRIBUTES = """
import json

def model_fn(model_dir, context):
    return "m"

def input_fn(data, content_type, context):
    return json.loads(data)

def predict_fn(data, model, context):
    attrs = context.get_request_header(0, "X-Amzn-SageMaker-Custom-Attributes")
    if attrs:
        context.set_response_header(0, "X-Amzn-SageMaker-Custom-Attributes", "seen=" + attrs)
    return {"rows": len(data)}

def output_fn(prediction, accept, context):
    return json.dumps(prediction)
"""

TRANSFORM_TEXT = """
def model_fn(model_dir):
    return str.upper

def transform_fn(model, data, content_type, accept):
    text = data if isinstance(data, str) else data.decode()
    return model(text), "text/plain"
"""

TRANSFORM_AND_INPUT = """
def model_fn(model_dir):
    return 1

def input_fn(data, content_type):
    return data

def transform_fn(model, data, content_type, accept):
    return data
"""

SLEEPY = """
import json, time

def model_fn(model_dir):
    return 1

def input_fn(data, content_type):
    return json.loads(data)

def predict_fn(data, model):
    time.sleep(data["sleep"])
    return data

def output_fn(prediction, accept):
    return json.dumps(prediction)
"""

USES_REQUIREMENT = """
import json
import onebox_testdep

def model_fn(model_dir):
    return onebox_testdep.ANSWER

def input_fn(data, content_type):
    return json.loads(data)

def predict_fn(data, model):
    return {"answer": model}

def output_fn(prediction, accept):
    return json.dumps(prediction)
"""


def test_custom_attributes_reach_the_script_and_come_back(tmp_path):
    # case 25 (with context arguments: case 31)
    model_dir = models.user_script_model(tmp_path / "attrs", ECHO_ATTRIBUTES)
    with Server(model_dir) as server:
        reply = server.post_json([[1], [2]], headers={"X-Amzn-SageMaker-Custom-Attributes": "trace=abc"})
        assert reply.status == 200, reply.body
        assert reply.json() == {"rows": 2}
        assert reply.headers["x-amzn-sagemaker-custom-attributes"] == "seen=trace=abc"
        plain = server.post_json([[1]])
        assert "x-amzn-sagemaker-custom-attributes" not in plain.headers


def test_transform_fn_sets_the_content_type(tmp_path):
    # case 30, without context arguments (case 31)
    model_dir = models.user_script_model(tmp_path / "transform", TRANSFORM_TEXT)
    with Server(model_dir) as server:
        reply = server.request("POST", "/invocations", b"hello", {"Content-Type": "text/plain"})
        assert reply.status == 200
        assert reply.content_type.startswith("text/plain")
        assert reply.body == b"HELLO"


def test_transform_fn_with_input_fn_never_becomes_ready(tmp_path):
    # case 32
    model_dir = models.user_script_model(tmp_path / "both", TRANSFORM_AND_INPUT)
    with Server(model_dir, expect_ready=False) as server:
        for _ in range(5):
            assert server.request("GET", "/ping").status == 503
            time.sleep(0.2)
        assert "transform_fn" in server.log()


def test_a_call_over_the_timeout_is_answered_in_time_and_the_server_recovers(tmp_path):
    # case 28
    model_dir = models.user_script_model(tmp_path / "sleepy", SLEEPY)
    with Server(model_dir, env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "2"}) as server:
        started = time.monotonic()
        slow = server.post_json({"sleep": 4})
        elapsed = time.monotonic() - started
        assert slow.status == 504
        assert json.loads(slow.body)["error"]["type"] == "DeadlineExceeded"
        assert elapsed < 2 + 5
        time.sleep(2.5)  # the script finishes its sleep; the next call is served
        assert server.post_json({"sleep": 0}).status == 200
        assert server.request("GET", "/ping").status == 200


def _make_wheel(directory) -> str:
    """A minimal pure-Python wheel that pip installs offline."""
    name = "onebox_testdep-0.1-py3-none-any.whl"
    path = directory / name
    dist = "onebox_testdep-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("onebox_testdep.py", "ANSWER = 42\n")
        whl.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: onebox-testdep\nVersion: 0.1\n")
        whl.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{dist}/RECORD", "")
    return str(path)


def test_sagemaker_program_picks_the_module_and_requirements_are_installed_before_ready(tmp_path):
    # case 33
    wheel = _make_wheel(tmp_path)
    model_dir = models.user_script_model(
        tmp_path / "custom", USES_REQUIREMENT, requirements=f"{wheel}\n", program="custom.py"
    )
    (model_dir / "code" / "inference.py").write_text(
        "raise RuntimeError('the default module must not be used')\n"
    )
    try:
        with Server(model_dir, env={"SAGEMAKER_PROGRAM": "custom.py"}) as server:
            reply = server.post_json({})
            assert reply.status == 200, reply.body
            assert reply.json() == {"answer": 42}
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "onebox-testdep"], check=False)
