"""Run the data-driven SageMaker cases against real `onebox serve` processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.contract.cases import CASES, ELSEWHERE, Case, Y
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow

BUILDERS = {
    "onnx": lambda d: models.onnx_model(d),
    "torchscript": lambda d: models.torchscript_model(d),
    "export": lambda d: models.exported_program_model(d),
    "script": lambda d: models.user_script_model(d, models.TOOLKIT_SCRIPT),
    "savedmodel": lambda d: models.saved_model(d),
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server per (model kind, environment), started on first use."""
    running: dict = {}

    def get(case: Case) -> Server:
        key = (case.model, case.env)
        if key not in running:
            if case.model in ("torchscript", "export"):
                pytest.importorskip("torch")
            if case.model == "onnx":
                pytest.importorskip("onnxruntime")
            if case.model == "savedmodel":
                pytest.importorskip(
                    "tensorflow", reason="needs tensorflow (pip install 'onebox[tensorflow]')"
                )
            model_dir = BUILDERS[case.model](tmp_path_factory.mktemp(case.model))
            running[key] = Server(model_dir, env=dict(case.env)).__enter__()
        return running[key]

    yield get
    for server in running.values():
        server.stop()


def test_every_single_model_case_is_covered():
    numbers = {c.number for c in CASES} | ELSEWHERE
    assert set(range(1, 34)) - numbers == set()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.number:02d}-{c.model}-{c.title}")
def test_contract_case(case: Case, servers):
    server = servers(case)
    reply = server.request(case.method, case.path, case.body, case.headers, chunked=case.chunked)
    assert reply.status == case.status, reply.body[:500]
    if case.content_type:
        assert reply.content_type.split(";")[0].strip() == case.content_type
    if case.json is not None:
        np.testing.assert_allclose(
            np.asarray(reply.json(), dtype=np.float64), np.asarray(case.json), rtol=1e-5
        )
    if case.csv_rows is not None:
        lines = reply.body.decode().strip().splitlines()
        assert len(lines) == case.csv_rows
        got = np.array([[float(v) for v in line.split(",")] for line in lines])
        np.testing.assert_allclose(got, Y, rtol=1e-5)
    if case.npy is not None:
        np.testing.assert_allclose(reply.npy(), np.asarray(case.npy), rtol=1e-5)
    if case.error:
        error = json.loads(reply.body)["error"]
        assert error["type"] and error["message"]
        assert "Traceback" not in reply.body.decode()
    if case.empty_body:
        assert reply.body == b""
        assert reply.headers.get("content-length") == "0"
    if case.header_absent:
        assert case.header_absent not in reply.headers
    # the server keeps serving after every case, good or bad
    assert server.request("GET", "/ping").status == 200
