"""Requests gathered into one host call by the loop worker (serving.http.gather), through a real
`onebox serve`: every client gets its own rows back, in its own format, and a request that is
refused, cast, expired or abandoned changes nothing for the others it arrived with."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.ipc.client import HostClient
from serving.ipc.directory import read_hosts_file
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow

CLIENTS = 24
REQUESTS = 15
# np.load reads an .npy header with ast.literal_eval, whose AST construction CPython 3.11 does
# not keep apart between threads (python/cpython#106905: "SystemError: AST constructor
# recursion depth mismatch", seen once in this test's client threads): the clients parse in turn
_NPY_PARSE = threading.Lock()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path_factory.mktemp("onnx"))
    (model_dir / "onebox.toml").write_text("max_batch_size = 64\n")
    run_dir = tmp_path_factory.mktemp("run")
    # one worker that keeps one call in flight: what arrives meanwhile leaves together
    env = {"ONEBOX_FRONTEND_MAX_CALLS": "1", "ONEBOX_RUN_DIR": str(run_dir)}
    with Server(model_dir, workers=1, threads=4, env=env) as srv:
        yield srv, run_dir


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _host_stats(run_dir: Path) -> dict:
    (entry,) = read_hosts_file(run_dir)
    client = HostClient(entry["socket"])
    try:
        return {"requests": 0, "rows": 0, **client.stats(time.time() + 5)["models"].get("model", {})}
    finally:
        client.close()


def _load(payload: bytes) -> np.ndarray:
    with _NPY_PARSE:
        return np.load(io.BytesIO(payload))


def _client(port: int, seed: int, failures: list, counts: dict) -> None:
    """Keep-alive requests of 1-3 distinct rows, as npy or JSON (some int32, some float64,
    which the host casts), now and then a bad shape or a deadline of 1 ms; checks each answer."""
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for i in range(REQUESTS):
            n = int(rng.integers(1, 4))
            x = rng.normal(size=(n, 4)).astype(np.float32)
            kind = (
                ("npy", "json", "int32", "float64", "bad", "expire")[int(rng.integers(0, 6))] if i else "npy"
            )
            headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
            if kind == "json":
                headers = {"Content-Type": "application/json", "Accept": "application/json"}
                body = json.dumps(x.tolist()).encode()
            elif kind == "int32":
                x = rng.integers(-5, 5, size=(n, 4)).astype(np.int32)
                body = _npy(x)
            elif kind == "float64":
                body = _npy(x.astype(np.float64))
            elif kind == "bad":
                body = _npy(np.zeros((n, 5), np.float32))
            else:
                body = _npy(x)
            if kind == "expire":
                headers["X-Onebox-Timeout-Ms"] = "1"
            conn.request("POST", "/invocations", body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "bad":
                ok = resp.status == 400 and b"must have shape" in payload and f"[{n}, 5]".encode() in payload
            elif kind == "expire":
                ok = resp.status in (200, 504)  # 200 only if it was answered within 1 ms
                ok = ok and (resp.status == 504 or np.allclose(_load(payload), models.reference(x)))
            elif resp.status != 200:
                ok = False
            else:
                got = np.asarray(json.loads(payload)) if kind == "json" else _load(payload)
                ok = got.shape == (n, 3) and np.allclose(got, models.reference(x), atol=1e-5)
            if not ok:
                failures.append((kind, resp.status, payload[:200]))
    finally:
        conn.close()


def test_concurrent_clients_each_get_their_own_rows_when_gathered(served):
    server, run_dir = served
    before = _host_stats(run_dir)
    failures: list = []
    counts: dict = {}
    threads = [
        threading.Thread(target=_client, args=(server.port, s, failures, counts)) for s in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert sum(counts.values()) == CLIENTS * REQUESTS
    after = _host_stats(run_dir)
    calls = after["requests"] - before["requests"]
    rows = after["rows"] - before["rows"]
    # gathering happened: the host received fewer calls than it ran rows of single requests
    assert calls < rows / 2, (calls, rows)


def test_clients_that_leave_mid_call_do_not_cost_the_others_their_answers(served):
    server, _ = served
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    head = (f"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\n"
            f"Accept: application/x-npy\r\nContent-Length: {len(_npy(x))}\r\n\r\n").encode()  # fmt: skip
    failures: list = []

    def stay(seed):
        _client(server.port, seed, failures, {})

    stayers = [threading.Thread(target=stay, args=(100 + s,)) for s in range(8)]
    for t in stayers:
        t.start()
    for _ in range(40):  # requests whose clients are gone before their answers
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(head + _npy(x))
        sock.close()
    for t in stayers:
        t.join(120)
    assert failures == []
    reply = server.request(
        "POST", "/invocations", _npy(x), {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    )
    assert reply.status == 200
    np.testing.assert_allclose(reply.npy(), models.reference(x), atol=1e-5)


def test_with_gathering_off_every_request_is_its_own_call(tmp_path):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    (model_dir / "onebox.toml").write_text("max_batch_size = 64\n")
    env = {"ONEBOX_FRONTEND_GATHER": "false", "ONEBOX_RUN_DIR": str(tmp_path / "run")}
    with Server(model_dir, workers=1, threads=4, env=env) as server:
        failures: list = []
        counts: dict = {}
        threads = [
            threading.Thread(target=_client, args=(server.port, s, failures, counts)) for s in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == []
        stats = _host_stats(tmp_path / "run")
        # one batcher request per HTTP request that passed the host's checks (1 ms deadlines may
        # have expired before they were queued)
        queued = sum(counts.values()) - counts.get("bad", 0)
        assert queued - counts.get("expire", 0) <= stats["requests"] <= queued
