"""The multi-model endpoint against a real ``onebox serve`` (SAGEMAKER_MULTI_MODEL=true).

SageMaker acceptance cases 34–52 (../shared/spec/sagemaker-contract.md §7), in order; case 48 (a
GPU out of memory during an invocation answers 507) needs a GPU and is
tests/handlers/test_torch_gpu.py::test_out_of_memory_is_507_and_the_handler_keeps_serving.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.http.timings import read_all
from serving.ipc.client import HostClient
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")

X = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]]

#: a user script whose predictions take as long as the number in its directory's file "sleep"
SLOW_SCRIPT = """
import json, os, time
import numpy as np

def model_fn(model_dir):
    return model_dir

def input_fn(data, content_type):
    return np.asarray(json.loads(data), dtype=np.float32)

def predict_fn(data, model_dir):
    time.sleep(float(open(os.path.join(model_dir, "sleep")).read()))
    return data * 2

def output_fn(prediction, accept):
    return json.dumps(prediction.tolist())
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """``$SAGEMAKER_BASE_DIR`` with models m1..m4 (ONNX) and slow (a user script) extracted."""
    root = tmp_path_factory.mktemp("ml")
    for name in ("m1", "m2", "m3", "m4"):
        models.onnx_model(root / "models" / name / "model")
    slow = models.user_script_model(root / "models" / "slow" / "model", SLOW_SCRIPT)
    (slow / "sleep").write_text("1.0")
    return root


@pytest.fixture(scope="module")
def server(base):
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BASE_DIR": str(base)}
    with Server(None, env=env) as running:
        yield running


def url(base: Path, name: str) -> str:
    return str(base / "models" / name / "model")


def load(server: Server, name: str, path: str, **kw):
    return server.post_json({"model_name": name, "url": path}, path="/models", **kw)


def names(server: Server) -> set[str]:
    reply = server.request("GET", "/models")
    assert reply.status == 200, reply.body
    return {m["modelName"] for m in reply.json()["models"]}


def error(reply) -> str:
    body = reply.json()["error"]
    assert body["type"] and "Traceback" not in body["message"]
    return body["message"]


def test_34_35_ping_is_200_and_nothing_is_listed_before_any_load(server):
    assert server.request("GET", "/ping").status == 200
    reply = server.request("GET", "/models")
    assert (reply.status, reply.json()) == (200, {"models": []})


def test_36_to_43_load_list_describe_invoke_and_unload(server, base):
    reply = load(server, "m1", url(base, "m1"))
    assert reply.status == 200, reply.body
    assert reply.json() == {"modelName": "m1", "modelUrl": url(base, "m1")}
    again = load(server, "m1", url(base, "m1"))
    assert again.status == 409 and "already loaded" in error(again)  # 37
    assert load(server, "m2", url(base, "m2")).status == 200  # 38
    listed = server.request("GET", "/models").json()["models"]
    assert sorted(listed, key=lambda m: m["modelName"]) == [
        {"modelName": "m1", "modelUrl": url(base, "m1")},
        {"modelName": "m2", "modelUrl": url(base, "m2")},
    ]
    one = server.request("GET", "/models/m1")  # 39
    assert (one.status, one.json()) == (200, {"modelName": "m1", "modelUrl": url(base, "m1")})
    assert server.request("GET", "/models/nope").status == 404
    # 40: the same answer as /invocations would give, with or without the Target-Model header
    for headers in ({}, {"X-Amzn-SageMaker-Target-Model": "dir/m1.tar.gz"}):
        answer = server.post_json(X, path="/models/m1/invoke", headers=headers)
        assert answer.status == 200, answer.body
        np.testing.assert_allclose(answer.json(), models.reference(X), rtol=1e-5)
    missing = server.post_json(X, path="/models/nope/invoke")  # 41
    assert missing.status == 404 and "nope" in error(missing)
    assert server.request("DELETE", "/models/m1").status == 200  # 42
    assert server.request("GET", "/models/m1").status == 404
    assert server.post_json(X, path="/models/m1/invoke").status == 404
    assert names(server) == {"m2"}
    assert server.post_json(X, path="/models/m2/invoke").status == 200  # the other stays
    assert server.request("DELETE", "/models/never-loaded").status == 404  # 43
    assert server.request("DELETE", "/models/m2").status == 200
    assert load(server, "m1", url(base, "m1")).status == 200  # a name unloaded can load again
    assert server.request("DELETE", "/models/m1").status == 200


@pytest.mark.parametrize(
    "body",
    [b'{"model_name": "bad", "url": ', b"[1, 2]", b'{"url": "/x"}', b'{"model_name": "bad"}',
     b'{"model_name": "a/b", "url": "/x"}', b'{"model_name": 7, "url": "/x"}'],
)  # fmt: skip
def test_44_a_malformed_load_is_400_and_nothing_is_listed(server, body):
    reply = server.request("POST", "/models", body, {"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    error(reply)
    assert names(server) == set()


def test_45_a_url_without_a_model_directory_is_404_and_not_listed(server, base):
    reply = load(server, "ghost", url(base, "ghost"))
    assert reply.status == 404 and "does not exist" in error(reply)
    assert names(server) == set()
    assert server.request("GET", "/models/ghost").status == 404
    assert server.post_json(X, path="/models/ghost/invoke").status == 404  # not 503 "failed to load"
    # the name is free: the failed load left nothing behind
    assert load(server, "ghost", url(base, "m3")).status == 200
    assert server.request("DELETE", "/models/ghost").status == 200


def _outside(base: Path, tmp_path: Path, where: str) -> str:
    """A load url that is not under the models directory, by way of ``where``."""
    if where == "elsewhere":  # a real model, in the wrong place
        return str(models.onnx_model(tmp_path / "elsewhere"))
    if where == "escaping":  # a real model reached from the models directory through ".."
        models.onnx_model(base / "escaped")
        return str(base / "models" / ".." / "escaped")
    if where == "relative":
        return "models/m1/model"
    return where


@pytest.mark.parametrize("where", ["/proc/self", "/etc", "elsewhere", "escaping", "relative"])
def test_46_a_url_outside_the_models_directory_is_400(server, base, tmp_path, where):
    reply = load(server, "x", _outside(base, tmp_path, where))
    assert reply.status == 400, reply.body
    error(reply)
    assert names(server) == set()


def test_49_pages_of_the_model_list(server, base):
    for name in ("m1", "m2", "m3"):
        assert load(server, name, url(base, name)).status == 200
    try:
        first = server.request("GET", "/models?limit=2").json()
        assert [m["modelName"] for m in first["models"]] == ["m1", "m2"]
        rest = server.request("GET", f"/models?limit=2&next_page_token={first['nextPageToken']}").json()
        assert rest == {"models": [{"modelName": "m3", "modelUrl": url(base, "m3")}]}  # no token: the end
        assert server.request("GET", "/models?next_page_token=x").status == 400
    finally:
        for name in ("m1", "m2", "m3"):
            server.request("DELETE", f"/models/{name}")


def test_50_concurrent_loads_of_one_name_one_wins_and_invokes_go_on_during_a_load(server, base):
    assert load(server, "m1", url(base, "m1")).status == 200
    statuses: list[int] = []
    invokes: list[int] = []
    stop = threading.Event()

    def invoke_m1():
        while not stop.is_set():
            invokes.append(server.post_json(X, path="/models/m1/invoke").status)

    def load_m2():
        statuses.append(load(server, "m2", url(base, "m2")).status)

    invoker = threading.Thread(target=invoke_m1)
    invoker.start()
    loaders = [threading.Thread(target=load_m2) for _ in range(2)]
    for thread in loaders:
        thread.start()
    for thread in loaders:
        thread.join()
    stop.set()
    invoker.join()
    try:
        assert sorted(statuses) == [200, 409]
        assert invokes and set(invokes) == {200}
        assert names(server) == {"m1", "m2"}
    finally:
        server.request("DELETE", "/models/m1")
        server.request("DELETE", "/models/m2")


def test_51_an_unload_lets_the_invocations_in_flight_finish(server, base):
    assert load(server, "slow", url(base, "slow")).status == 200
    answers: list = []

    def invoke():
        answers.append(server.post_json([[1.0, 2.0]], path="/models/slow/invoke"))

    threads = [threading.Thread(target=invoke) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # at the host by now: one asleep in predict_fn (1 s each), two queued behind it
    assert server.request("DELETE", "/models/slow").status == 200
    for thread in threads:
        thread.join()
    assert [(a.status, a.json()) for a in answers] == [(200, [[2.0, 4.0]])] * 3
    assert server.post_json([[1.0, 2.0]], path="/models/slow/invoke").status == 404


def test_52_a_load_of_100k_one_byte_chunks_is_refused_and_the_server_goes_on(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        try:
            sock.sendall(b"1\r\n \r\n" * 100_000 + b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the last chunk
        status = int(sock.recv(4096).split(b" ", 2)[1])
    assert status in (400, 413)
    assert server.request("GET", "/ping").status == 200
    assert names(server) == set()


def test_47_a_load_past_the_memory_cap_is_507_until_another_is_unloaded(base, tmp_path):
    size = sum(p.stat().st_size for p in Path(url(base, "m1")).rglob("*") if p.is_file())
    # room for one of these models, not two
    cap_mb = 1
    env = {
        "SAGEMAKER_MULTI_MODEL": "true",
        "SAGEMAKER_BASE_DIR": str(base),
        "ONEBOX_MODEL_MEMORY_MB": str(cap_mb),
    }
    big = base / "models" / "big" / "model"
    models.onnx_model(big)
    (big / "weights.bin").write_bytes(b"\0" * (1024 * 1024 - 2 * size))  # just under the cap alone
    with Server(None, env=env, workers=1) as running:
        assert load(running, "m1", url(base, "m1")).status == 200
        assert load(running, "m2", url(base, "m2")).status == 200
        full = load(running, "big", str(big))
        assert full.status == 507 and "ONEBOX_MODEL_MEMORY_MB" in error(full)
        assert names(running) == {"m1", "m2"}  # no partial entry
        assert running.request("DELETE", "/models/m1").status == 200
        assert running.request("DELETE", "/models/m2").status == 200
        assert load(running, "big", str(big)).status == 200
        assert running.post_json(X, path="/models/big/invoke").status == 200


def test_models_are_on_every_host_and_unloaded_from_every_host(base, tmp_path):
    run = tmp_path / "run"
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BASE_DIR": str(base),
           "ONEBOX_HOSTS_PER_DEVICE": "2", "ONEBOX_RUN_DIR": str(run)}  # fmt: skip
    with Server(None, env=env, workers=2) as running:
        hosts = [HostClient(str(run / f"host-cpu-{i}.sock")) for i in range(2)]
        assert load(running, "m1", url(base, "m1")).status == 200
        assert [_ready_models(host) for host in hosts] == [["m1"], ["m1"]]
        before = [_requests(host) for host in hosts]  # the warm-up's batches count too
        replies: list = []

        def invoke():
            replies.extend(running.post_json(X, path="/models/m1/invoke").status for _ in range(10))

        threads = [threading.Thread(target=invoke) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert replies == [200] * 60
        served = [_requests(host) - was for host, was in zip(hosts, before, strict=True)]
        # both hosts answered; each counts parts, and max_batch_size 1 splits a request into its rows
        assert all(served) and sum(served) == 60 * len(X), served
        assert load(running, "m1", url(base, "m1")).status == 409
        assert running.request("DELETE", "/models/m1").status == 200
        assert [_ready_models(host) for host in hosts] == [[], []]
        assert running.post_json(X, path="/models/m1/invoke").status == 404


def _requests(host) -> int:
    return host.stats(time.time() + 5)["models"]["m1"]["requests"]


def _ready_models(host) -> list[str]:
    return [m["name"] for m in host.health(time.time() + 5)["models"] if m["state"] == "ready"]


def test_invocations_of_a_named_model_are_answered_by_the_loop_worker(base, tmp_path):
    timings = tmp_path / "timings"
    timings.mkdir()
    env = {
        "SAGEMAKER_MULTI_MODEL": "true",
        "SAGEMAKER_BASE_DIR": str(base),
        "ONEBOX_FRONTEND_TIMINGS": str(timings),
    }
    with Server(None, env=env, workers=1) as running:
        assert load(running, "m1", url(base, "m1")).status == 200
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        body = json.dumps(X).encode()
        headers = {"Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": "m1.tar.gz"}
        for _ in range(11):  # the first goes by the pool, which fetches the description
            conn.request("POST", "/models/m1/invoke", body, headers)
            answer = conn.getresponse()
            assert answer.status == 200
            np.testing.assert_allclose(json.loads(answer.read()), models.reference(X), rtol=1e-5)
        assert running.request("DELETE", "/models/m1").status == 200
        # the worker that unloaded it forgot its description: the pool asks the host, which says 404
        conn.request("POST", "/models/m1/invoke", body, headers)
        gone = conn.getresponse()
        assert gone.status == 404 and "not loaded" in json.loads(gone.read())["error"]["message"]
        conn.close()
        end = time.monotonic() + 10
        while (sums := read_all(timings))["requests"] < 10 and time.monotonic() < end:
            time.sleep(0.2)
    assert sums["requests"] == 10  # every answer after the first, by the loop


def test_a_restarted_host_loads_again_the_models_it_held(base, tmp_path):
    import psutil

    run = tmp_path / "run"
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BASE_DIR": str(base), "ONEBOX_RUN_DIR": str(run)}
    with Server(None, env=env, workers=1) as running:
        for name in ("m1", "m2"):
            assert load(running, name, url(base, name)).status == 200
        assert running.request("DELETE", "/models/m2").status == 200
        host = next(p for p in psutil.Process(running.proc.pid).children() if "host" in p.cmdline())
        host.kill()
        client = HostClient(str(run / "host-cpu.sock"))
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if _ready_models(client) == ["m1"]:
                    break
            except Exception:  # not yet restarted
                client.close()
            time.sleep(0.1)
        assert _ready_models(client) == ["m1"]  # m2 was unloaded before the crash: not loaded again
        assert running.post_json(X, path="/models/m1/invoke").status == 200
        assert names(running) == {"m1"}
    # a new start forgets what the hosts of the last one held
    with Server(None, env=env, workers=1) as running:
        assert names(running) == set()


def test_a_single_model_endpoint_has_no_models_api(tmp_path):
    with Server(models.onnx_model(tmp_path / "model")) as running:
        assert running.request("GET", "/models").status == 404
        assert running.request("POST", "/models", json.dumps({}).encode()).status in (404, 405)


def test_every_multi_model_case_is_here():
    import re

    here = {
        int(n) for name in globals() if name.startswith("test_") for n in re.findall(r"_(\d\d)(?=_)", name)
    }
    shown = {
        n
        for low, high in re.findall(r"test_(\d\d)_to_(\d\d)_", " ".join(globals()))
        for n in range(int(low), int(high) + 1)
    }
    assert set(range(34, 53)) - here - shown == {48}  # 48 needs a GPU: tests/handlers/test_torch_gpu.py


def test_a_model_directory_given_to_a_multi_model_endpoint_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SAGEMAKER_MULTI_MODEL": "true"}
    cmd = [sys.executable, "-m", "serving", "serve", str(models.onnx_model(tmp_path / "m"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "POST /models" in proc.stderr
