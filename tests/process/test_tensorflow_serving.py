"""A TensorFlow SavedModel through a real `onebox serve`: JSON and npy bodies, signatures chosen in
onebox.toml, concurrent clients batched together each getting their own rows, and 400s that
leave the server serving."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support import models
from tests.support.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]
pytest.importorskip("tensorflow", reason="needs tensorflow (pip install 'onebox[tensorflow]')")

NPY = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server per onebox.toml, started on first use, over copies of one SavedModel."""
    source = models.saved_model(tmp_path_factory.mktemp("savedmodel"))
    running: dict[str, Server] = {}

    def get(toml: str) -> Server:
        if toml not in running:
            import shutil

            model_dir = tmp_path_factory.mktemp("served")
            shutil.copytree(source / "1", model_dir / "1")
            (model_dir / "onebox.toml").write_text(toml)
            running[toml] = Server(model_dir, workers=2, threads=16).__enter__()
        return running[toml]

    yield get
    for server in running.values():
        server.stop()


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_json_and_npy_bodies_answer_x_at_w_plus_b(servers):
    server = servers("")
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]], dtype=np.float32)
    reply = server.post_json(x.tolist())
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(reply.json(), models.reference(x), rtol=1e-6)
    reply = server.request("POST", "/invocations", _npy(x), NPY)
    assert reply.status == 200 and reply.content_type == "application/x-npy", reply.body
    np.testing.assert_allclose(reply.npy(), models.reference(x), rtol=1e-6)
    reply = server.post_json({"instances": x.tolist()}, headers={"Accept": "text/csv"})
    assert reply.status == 200 and len(reply.body.decode().strip().splitlines()) == 2


def test_bad_shape_answers_400_and_the_server_keeps_serving(servers):
    server = servers("")
    for body in ([[1.0, 2.0, 3.0]], [1.0, 2.0, 3.0, 4.0], {"x": [[1, 2, 3, 4]], "z": [[1]]}):
        reply = server.post_json(body)
        assert reply.status == 400, (body, reply.body)
        error = reply.json()["error"]
        assert error["type"] == "BadRequest" and "Traceback" not in reply.body.decode()
    reply = server.post_json([[1.0, 1.0, 1.0, 1.0]])
    assert reply.status == 200
    np.testing.assert_allclose(reply.json(), models.reference([[1.0] * 4]), rtol=1e-6)


def test_two_input_signature_named_in_onebox_toml_takes_named_inputs(servers):
    server = servers('signature_name = "pair"\nmax_batch_size = 8\n')
    a = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]]
    reply = server.post_json({"inputs": {"a": a, "n": [3, 4]}})
    assert reply.status == 200, reply.body
    answer = reply.json()
    np.testing.assert_allclose(answer["sum"], models.reference(a), rtol=1e-6)
    assert answer["twice"] == [6, 8]
    buf = io.BytesIO()
    np.savez(buf, a=np.asarray(a, np.float32), n=np.array([5, 6], np.int32))
    reply = server.request("POST", "/invocations", buf.getvalue(), {"Content-Type": "application/x-npz"})
    assert reply.status == 200 and reply.json()["twice"] == [10, 12], reply.body
    reply = server.post_json({"inputs": {"a": a, "n": [0.5, 1]}})  # floats into an int32 input
    assert reply.status == 400 and "int32" in reply.json()["error"]["message"]


def test_concurrent_clients_are_batched_together_and_each_get_their_own_rows(servers):
    # the "rows" signature also answers, per row, how many rows its batch had
    server = servers('signature_name = "rows"\nmax_batch_size = 32\nmax_delay_ms = 200\n')
    clients = 12
    payloads = [
        np.full((1 + i % 3, 4), float(i), dtype=np.float32) + np.arange(4, dtype=np.float32)
        for i in range(clients)
    ]
    start = threading.Barrier(clients)

    def call(i: int):
        start.wait()
        if i % 2:
            return server.post_json(payloads[i].tolist())
        return server.request(
            "POST", "/invocations", _npy(payloads[i]), {"Content-Type": "application/x-npy"}
        )

    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(call, range(clients)))
    batch_rows = []
    for x, reply in zip(payloads, replies, strict=True):
        assert reply.status == 200, reply.body
        answer = json.loads(reply.body)
        np.testing.assert_allclose(answer["y"], models.reference(x), rtol=1e-6)
        assert len(set(answer["rows"])) == 1 and answer["rows"][0] >= len(x)
        batch_rows.append(answer["rows"][0])
    assert max(batch_rows) > 3, f"no request shared a batch: {batch_rows}"
