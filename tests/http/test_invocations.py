"""POST /invocations answered ahead of Flask: the same statuses, headers and bodies as the views.

The process tests and the contract cases drive it through a real server; these pin the error
paths no real model produces on demand (a bug in the frontend, a full queue) with a stand-in
router, through Flask's test client so the middleware sits where gunicorn calls it.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from serving.errors import QueueFull
from serving.http.app import create_app
from serving.ipc.protocol import decode_tensors, encode_tensors
from serving.settings import Settings


class Router:
    """Answers like a HostRouter with one tensor model: ``infer`` is what the test makes it."""

    def __init__(self, infer):
        self._infer = infer
        self.calls = 0

    def describe(self, model, deadline):
        return {"raw": False}

    def input_specs(self, model):
        return ()

    def call(self, header, buffers, deadline):
        """The host's side of an infer message: decode, run ``infer``, encode the answer."""
        self.calls += 1
        specs, out = encode_tensors(self._infer(decode_tensors(header["inputs"], buffers)))
        return {"ok": True, "outputs": specs}, out

    def ready(self, models=True):
        return True


def client(infer):
    router = Router(infer)
    return create_app(Settings.from_env({}), router).test_client(), router


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_answer_keeps_its_rows_and_media_type():
    http, router = client(lambda inputs: {"y": next(iter(inputs.values())) * 2})
    reply = http.post("/invocations", data=npy(np.arange(6, dtype=np.float32).reshape(2, 3)),
                      headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})  # fmt: skip
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/x-npy"
    assert int(reply.headers["Content-Length"]) == len(reply.data)
    np.testing.assert_array_equal(np.load(io.BytesIO(reply.data)), np.arange(6).reshape(2, 3) * 2)
    assert router.calls == 1


def test_a_bug_is_a_500_without_its_traceback_and_the_app_keeps_answering(caplog):
    def broken(inputs):
        raise KeyError("secret internals")

    http, _ = client(broken)
    with caplog.at_level(logging.ERROR, logger="onebox.http"):
        reply = http.post("/invocations", data=b"[[1, 2]]", content_type="application/json")
    assert reply.status_code == 500
    assert reply.get_json() == {"error": {"type": "InternalError", "message": "internal server error"}}
    assert b"secret" not in reply.data and b"Traceback" not in reply.data
    assert "secret internals" in caplog.text  # the traceback goes to the log
    assert http.get("/ping").status_code == 200


def test_a_serving_error_keeps_its_status_and_headers():
    def full(inputs):
        raise QueueFull("the queue of model 'model' is full", retry_after=3)

    http, _ = client(full)
    reply = http.post("/invocations", data=b"[[1, 2]]", content_type="application/json")
    assert reply.status_code == 429
    assert reply.headers["Retry-After"] == "3"
    assert reply.headers["Content-Type"] == "application/json"
    assert json.loads(reply.data)["error"]["message"] == "the queue of model 'model' is full"


@pytest.mark.parametrize(
    ("headers", "data", "status"),
    [
        ({"Content-Type": "application/json"}, b"", 400),  # empty body
        ({"Content-Type": "application/json", "X-Onebox-Timeout-Ms": "soon"}, b"[[1]]", 400),
        ({"Content-Type": "text/html"}, b"<p>", 415),
        ({"Content-Type": "application/json", "Accept": "image/png"}, b"[[1]]", 406),
        ({"Content-Type": "application/json"}, b"[" * 10 + b"1", 400),
    ],
    ids=["empty", "bad-timeout", "unsupported-type", "not-acceptable", "malformed"],
)
def test_bad_requests_are_refused_before_any_model_call(headers, data, status):
    http, router = client(lambda inputs: inputs)
    reply = http.post("/invocations", data=data, headers=headers)
    assert reply.status_code == status
    assert reply.get_json()["error"]["message"]
    assert router.calls == 0


def test_a_body_over_the_limit_is_413():
    router = Router(lambda inputs: inputs)
    app = create_app(Settings.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}), router)
    reply = app.test_client().post("/invocations", data=b"1" * (1024 * 1024 + 1), content_type="text/csv")
    assert reply.status_code == 413
    assert router.calls == 0


def test_other_methods_still_reach_flask_for_405_with_allow():
    http, _ = client(lambda inputs: inputs)
    reply = http.get("/invocations")
    assert reply.status_code == 405
    assert "POST" in reply.headers["Allow"]
    assert reply.get_json()["error"]["type"]
