"""Concurrency and bad input through a real `onebox serve` with an ONNX model."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path_factory.mktemp("onnx"))
    with Server(model_dir, workers=2, threads=16) as srv:
        yield srv


def _npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_64_concurrent_clients_each_get_their_own_answer(server):
    rng = np.random.default_rng(1)
    payloads = [rng.standard_normal((1 + i % 5, 4)).astype(np.float32) for i in range(64)]

    def call(x):
        if len(x) % 2:
            return server.post_json(x.tolist())
        return server.request("POST", "/invocations", _npy(x), {"Content-Type": "application/x-npy",
                                                                  "Accept": "application/x-npy"})  # fmt: skip

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(call, payloads))
    for x, reply in zip(payloads, replies, strict=True):
        assert reply.status == 200, reply.body
        got = reply.npy() if reply.content_type == "application/x-npy" else np.asarray(reply.json())
        np.testing.assert_allclose(got, models.reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("worker_class", ["loop", "gthread", "gevent"])
def test_bodies_through_shared_memory_come_back_to_their_own_senders(tmp_path, worker_class):
    # from 4 KiB (ONEBOX_IPC_SHM_MIN_BYTES) the tensors cross to the host through each frontend
    # thread's (or greenlet's) shared-memory region, which every call on it rewrites; answers of
    # up to 100 KB arrive in several reads, interleaved between greenlets under gevent
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    rng = np.random.default_rng(2)
    payloads = [rng.standard_normal((256 + 173 * i, 4)).astype(np.float32) for i in range(48)]
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    env = {"ONEBOX_IPC_SHM_MIN_BYTES": "4096", "ONEBOX_MAX_QUEUE": "1000000",
           "ONEBOX_FRONTEND_WORKER_CLASS": worker_class}  # fmt: skip
    with Server(model_dir, env=env, workers=2, threads=8) as srv:
        with ThreadPoolExecutor(12) as pool:
            replies = list(
                pool.map(lambda x: srv.request("POST", "/invocations", _npy(x), headers), payloads)
            )
        assert srv.request("GET", "/ping").status == 200
    for x, reply in zip(payloads, replies, strict=True):
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(reply.npy(), models.reference(x), rtol=1e-5, atol=1e-6)


BAD = [
    ("malformed JSON", b'{"instances": [[1, 2', "application/json", 400),
    ("ragged JSON", b"[[1, 2, 3, 4], [1, 2]]", "application/json", 400),
    ("strings in JSON", b'[["a", "b", "c", "d"]]', "application/json", 400),
    ("malformed CSV", b"1,2,3,4\n1,2,x,4\n", "text/csv", 400),
    ("ragged CSV", b"1,2,3,4\n1,2\n", "text/csv", 400),
    ("garbage npy", b"\x93NUMPY garbage", "application/x-npy", 400),
    ("pickled npy", _npy(np.array([object()], dtype=object), allow_pickle=True), "application/x-npy", 400),
    ("wrong shape", b"[[1, 2, 3]]", "application/json", 400),
    ("wrong rank", b"[1, 2, 3, 4]", "application/json", 400),
    ("empty body", b"", "application/json", 400),
    ("unsupported Content-Type", b"[[1, 2, 3, 4]]", "application/xml", 415),
    ("missing Content-Type", b"[[1, 2, 3, 4]]", None, 415),
]


@pytest.mark.parametrize("title,body,content_type,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_error_and_the_next_request_succeeds(server, title, body, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    reply = server.request("POST", "/invocations", body, headers)
    assert reply.status == status, reply.body
    error = json.loads(reply.body)["error"]
    assert error["message"] and "Traceback" not in reply.body.decode()
    good = server.post_json([[1, 2, 3, 4]])
    assert good.status == 200
    np.testing.assert_allclose(good.json(), models.reference([[1, 2, 3, 4]]), rtol=1e-5)


def test_unacceptable_accept_is_406_and_over_limit_is_413(server):
    reply = server.post_json([[1, 2, 3, 4]], headers={"Accept": "image/png"})
    assert reply.status == 406
    reply = server.request(
        "POST", "/invocations", b"[" * (7 * 1024 * 1024), {"Content-Type": "application/json"}
    )
    assert reply.status == 413
    assert server.post_json([[1, 2, 3, 4]]).status == 200


def test_execution_parameters_for_batch_transform(server):
    reply = server.request("GET", "/execution-parameters")
    assert reply.status == 200
    params = reply.json()
    assert params == {"MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 6}


def test_two_hosts_on_one_device_share_the_load_and_answer_correctly(tmp_path):
    import time as _time

    from serving.ipc.client import HostClient
    from serving.ipc.directory import read_hosts_file

    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    run_dir = tmp_path / "run"
    env = {"ONEBOX_HOSTS_PER_DEVICE": "2", "ONEBOX_RUN_DIR": str(run_dir)}
    with Server(model_dir, env=env, workers=2, threads=16) as srv:
        hosts = read_hosts_file(run_dir)
        assert [h["name"] for h in hosts] == ["cpu-0", "cpu-1"]
        rng = np.random.default_rng(7)
        payloads = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(64)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda x: srv.post_json(x.tolist()), payloads))
        for x, reply in zip(payloads, replies, strict=True):
            assert reply.status == 200
            np.testing.assert_allclose(np.asarray(reply.json()), models.reference(x), rtol=1e-5, atol=1e-6)
        served = []
        for host in hosts:
            client = HostClient(host["socket"])
            served.append(client.stats(_time.time() + 5)["models"]["model"]["requests"])
            client.close()
        assert all(count > 0 for count in served), served
