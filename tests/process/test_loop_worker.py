"""The ``loop`` frontend worker over real sockets: what clients do to a connection, and what
goes to gunicorn's own parser.

The contract cases and the other process tests run on it too (it is the default worker); these
pin what only a raw socket shows: pipelining, bytes trickling in, clients leaving early, slow
readers of large answers, and one connection moving between the loop and the thread pool.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving.ipc.protocol import tune
from tests.support import models
from tests.support.server import Server, free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path_factory.mktemp("onnx"))
    env = {"ONEBOX_FRONTEND_WORKER_CLASS": "loop", "ONEBOX_MAX_QUEUE": "1000000"}
    with Server(model_dir, workers=1, threads=4, env=env) as srv:
        yield srv


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _invocation(x: np.ndarray, extra: str = "") -> bytes:
    body = _npy(x)
    head = (f"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\n"
            f"Accept: application/x-npy\r\nContent-Length: {len(body)}\r\n{extra}\r\n")  # fmt: skip
    return head.encode() + body


class _Answers:
    """Reads HTTP/1.1 answers framed by Content-Length off one socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def next(self) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        self.sock.settimeout(5)
        return self.sock.recv(1) == b""


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _rows(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


@pytest.mark.parametrize("described", [False, True])
def test_pipelined_requests_on_one_connection_get_their_own_answers_in_order(server, described):
    # not described: the first request waits for the model's description on the pool, and the
    # requests gunicorn's parser read behind it come back to the loop with the connection
    if not described:
        time.sleep(2.1)  # the worker's description of the model expires (routing.DESCRIBE_TTL_S)
    xs = [_rows(i, 1 + i) for i in range(5)]
    with _connect(server) as sock:
        sock.sendall(b"".join(_invocation(x) for x in xs))
        answers = _Answers(sock)
        servers = []
        for x in xs:
            status, headers, body = answers.next()
            assert status == 200, body
            np.testing.assert_allclose(np.load(io.BytesIO(body)), models.reference(x), rtol=1e-5, atol=1e-6)
            servers.append(headers["server"])
    assert servers[1:] == ["onebox"] * 4
    assert (servers[0] == "onebox") is described


def test_a_request_arriving_in_small_pieces_is_answered_whole(server):
    x = _rows(7, 2000)  # a 32 KB body
    raw = _invocation(x)
    with _connect(server) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, 301, 7):  # the head a few bytes at a time, then the body in 4 KB pieces
            sock.sendall(raw[i : i + 7])
            time.sleep(0.002)
        for i in range(301, len(raw), 4096):
            sock.sendall(raw[i : i + 4096])
            time.sleep(0.002)
        status, _, body = _Answers(sock).next()
    assert status == 200
    np.testing.assert_allclose(np.load(io.BytesIO(body)), models.reference(x), rtol=1e-5, atol=1e-6)


def test_one_connection_moves_between_gunicorn_and_the_fast_path(server):
    x = _rows(3)
    body = json.dumps(x.tolist()).encode()
    chunked = (b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")  # fmt: skip
    with _connect(server) as sock:
        answers = _Answers(sock)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = answers.next()
        assert status == 200 and headers["server"] != "onebox"  # gunicorn + Flask on the pool
        for _ in range(2):
            sock.sendall(chunked)
            status, headers, reply = answers.next()
            assert status == 200 and headers["server"] != "onebox"
            np.testing.assert_allclose(json.loads(reply), models.reference(x), rtol=1e-5, atol=1e-6)
            sock.sendall(_invocation(x))
            status, headers, reply = answers.next()
            assert status == 200 and headers["server"] == "onebox"  # back in the loop
            np.testing.assert_allclose(np.load(io.BytesIO(reply)), models.reference(x), rtol=1e-5, atol=1e-6)
        sock.sendall(b"GET /execution-parameters HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, reply = answers.next()
        assert status == 200 and "MaxPayloadInMB" in json.loads(reply)


@pytest.mark.parametrize(("request_line", "extra"), [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")])
def test_an_answer_that_ends_the_connection_says_so_and_closes_it(server, request_line, extra):
    x = _rows(4)
    raw = _invocation(x, extra).replace(b"HTTP/1.1\r\n", f"{request_line}\r\n".encode(), 1)
    with _connect(server) as sock:
        sock.sendall(raw)
        answers = _Answers(sock)
        status, headers, _ = answers.next()
        assert status == 200 and headers["connection"] == "close"
        assert answers.closed()


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(server):
    x = _rows(11)
    with _connect(server) as sock:
        sock.sendall(_invocation(x))
        sock.shutdown(socket.SHUT_WR)  # "nothing more from me" (e.g. nc -N)
        answers = _Answers(sock)
        status, headers, body = answers.next()
        assert status == 200 and headers["connection"] == "close"
        assert answers.closed()
    np.testing.assert_allclose(np.load(io.BytesIO(body)), models.reference(x), rtol=1e-5, atol=1e-6)


def test_clients_that_leave_before_their_answer_disturb_nobody(server):
    for i in range(20):
        with _connect(server) as sock:
            sock.sendall(_invocation(_rows(i, 500))[: 2000 if i % 2 else None])  # some leave mid-body
    x = _rows(99)
    with _connect(server) as sock:
        sock.sendall(_invocation(x))
        status, _, body = _Answers(sock).next()
    assert status == 200
    np.testing.assert_allclose(np.load(io.BytesIO(body)), models.reference(x), rtol=1e-5, atol=1e-6)


BIG_ANSWERS = """
import json

def model_fn(model_dir):
    return bytes(range(256))

def transform_fn(model, data, content_type, accept):
    return model * (json.loads(data)["size"] // 256), "application/octet-stream"
"""


def test_a_slow_reader_of_a_large_answer_gets_it_whole_and_holds_up_no_one(tmp_path):
    # a user script (the raw path) answering 16 MB: more than the kernel takes in one send, so
    # the loop writes it as the reader makes room, serving others meanwhile
    model_dir = models.user_script_model(tmp_path / "big", BIG_ANSWERS)
    with Server(model_dir, workers=1, threads=2, env={"ONEBOX_FRONTEND_WORKER_CLASS": "loop"}) as srv:
        srv.post_json({"size": 256})  # the worker learns the model's description
        size = 16 << 20
        body = json.dumps({"size": size}).encode()
        raw = (b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        with _connect(srv) as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            slow.sendall(raw)
            time.sleep(0.5)  # the answer is stuck in the worker's send queue now
            for i in range(3):  # the one worker still answers others meanwhile
                reply = srv.post_json({"size": 256 * (i + 1)})
                assert reply.status == 200 and reply.body == bytes(range(256)) * (i + 1)
            status, headers, answer = _Answers(slow).next()
    assert status == 200 and headers["server"] == "onebox"
    assert answer == bytes(range(256)) * (size // 256)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /invocations HTTP/1.1\r\nHost: t\r\nBad Header: x\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_malformed_heads_get_gunicorns_400_and_the_worker_keeps_serving(server, raw):
    with _connect(server) as sock:
        sock.sendall(raw)
        status, _, _ = _Answers(sock).next()
    assert status == 400
    x = _rows(8)
    with _connect(server) as sock:
        sock.sendall(_invocation(x))
        assert _Answers(sock).next()[0] == 200


def test_without_shared_memory_a_request_larger_than_the_socket_buffer_reaches_the_host_whole(tmp_path):
    # ONEBOX_IPC_SHM_MIN_BYTES=0: a request 1.5x the links' socket buffer crosses the link's
    # non-blocking socket in pieces, the loop waiting for room between them
    pytest.importorskip("onnxruntime")
    with tune(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as probe:
        large = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) * 3 // 2 // 16  # rows of 16 bytes
    model_dir = models.onnx_model(tmp_path / "onnx")
    env = {
        "ONEBOX_FRONTEND_WORKER_CLASS": "loop",
        "ONEBOX_MAX_QUEUE": "1000000",
        "ONEBOX_IPC_SHM_MIN_BYTES": "0",
    }
    with Server(model_dir, workers=1, threads=2, env=env) as srv:
        servers = []
        for rows in (3, large):  # the first teaches the worker the model's description
            x = _rows(rows, rows)
            with _connect(srv) as sock:
                sock.sendall(_invocation(x))
                status, headers, body = _Answers(sock).next()
            assert status == 200, body
            np.testing.assert_allclose(np.load(io.BytesIO(body)), models.reference(x), rtol=1e-5, atol=1e-6)
            servers.append(headers["server"])
    assert servers[1] == "onebox"


def test_any_other_wsgi_app_is_served_through_the_pool(tmp_path):
    # the echo baseline of benchmarks/overhead.py: a bare Flask app under onebox's gunicorn
    port = free_port()
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "ONEBOX_FRONTEND_WORKER_CLASS": "loop",
           "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "echo_app.py")], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                time.sleep(0.05)
        with sock:
            body = b'{"a": 1}'
            for _ in range(2):
                sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 8\r\n\r\n" + body)  # fmt: skip
                status, headers, reply = _Answers(sock).next()
                assert (status, reply) == (200, body) and headers["server"] != "onebox"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
