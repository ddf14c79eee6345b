"""The host's single I/O thread: frames assembled from any split, blocking calls kept off it."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from serving.errors import BadRequest
from serving.ipc.client import HostClient
from serving.ipc.protocol import decode_tensors, encode_tensors, recv_message
from serving.ipc.server import IPCServer, Pending


def _reply(outputs):
    specs, out = encode_tensors(outputs)
    return {"outputs": specs}, out


class Recorder:
    """nowait answers ``infer`` at once (a done Pending) and refuses ``bad``; others block."""

    def __init__(self):
        self.release = threading.Event()
        self.blocking_threads: list[str] = []
        self.reader_threads: list[str] = []

    def nowait(self, header, buffers):
        self.reader_threads.append(threading.current_thread().name)
        if header["op"] == "bad":
            raise BadRequest("no such thing")
        if header["op"] != "infer":
            return None
        future = Future()
        future.set_result({"y": decode_tensors(header["inputs"], buffers)["x"] * 2})
        return Pending(future, _reply)

    def dispatch(self, header, buffers):
        self.blocking_threads.append(threading.current_thread().name)
        if header["op"] == "slow":
            assert self.release.wait(30)
        return {"op": header["op"]}, []


@pytest.fixture
def served(tmp_path):
    recorder = Recorder()
    path = str(tmp_path / "host.sock")
    server = IPCServer(path, recorder.dispatch, recorder.nowait)
    reader = threading.Thread(target=server.serve_forever, name="reader", daemon=True)
    reader.start()
    yield path, recorder
    recorder.release.set()
    server.close()
    reader.join(5)
    assert not reader.is_alive()


def _frame(header: dict, payload: bytes) -> bytes:
    head = json.dumps({**header, "buffers": [len(payload)]}).encode()
    return struct.pack("!I", len(head)) + head + payload


def test_a_message_arriving_in_small_pieces_is_assembled_whole(served):
    path, _ = served
    x = np.arange(50_000, dtype=np.float32)  # 200 KB: larger than the first read buffer
    specs, _ = encode_tensors({"x": x})
    frame = _frame({"op": "infer", "model": "m", "inputs": specs}, x.tobytes())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        for start in range(0, len(frame), 7_001):  # splits inside the length, header and data
            sock.sendall(frame[start : start + 7_001])
            time.sleep(0.001)
        sock.settimeout(10)
        header, buffers = recv_message(sock)
    assert header["ok"]
    np.testing.assert_array_equal(decode_tensors(header["outputs"], buffers)["y"], x * 2)


def test_a_blocking_call_does_not_hold_up_other_connections(served):
    path, recorder = served
    slow = HostClient(path)
    slow_answer: list[dict] = []
    caller = threading.Thread(
        target=lambda: slow_answer.append(slow.call({"op": "slow"}, [], time.time() + 30)[0])
    )
    caller.start()
    while not recorder.blocking_threads:  # the slow call is now parked on a worker thread
        time.sleep(0.01)
    fast = HostClient(path)
    out = fast.infer("m", {"x": np.ones(3, np.int64)}, time.time() + 30)  # answered meanwhile
    np.testing.assert_array_equal(out["y"], [2, 2, 2])
    assert not slow_answer  # still waiting: the answer above did not wait for it
    recorder.release.set()
    caller.join(10)
    assert slow_answer and slow_answer[0]["op"] == "slow"
    assert set(recorder.reader_threads) == {"reader"}
    assert "reader" not in recorder.blocking_threads


def test_a_refused_call_is_answered_and_the_connection_keeps_serving(served):
    path, _ = served
    client = HostClient(path)
    with pytest.raises(BadRequest, match="no such thing"):
        client.call({"op": "bad"}, [], time.time() + 10)
    out = client.infer("m", {"x": np.array([4])}, time.time() + 10)
    np.testing.assert_array_equal(out["y"], [8])


def test_a_peer_that_hangs_up_mid_message_costs_only_its_connection(served):
    path, _ = served
    x = np.zeros(1000, np.uint8)
    specs, _ = encode_tensors({"x": x})
    frame = _frame({"op": "infer", "model": "m", "inputs": specs}, x.tobytes())
    for cut in (2, 20, len(frame) - 10):  # inside the length, the header, the data
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(frame[:cut])
    out = HostClient(path).infer("m", {"x": np.array([1.5])}, time.time() + 10)
    np.testing.assert_array_equal(out["y"], [3.0])


def test_a_peer_gone_before_its_blocking_reply_does_not_break_the_server(served):
    path, recorder = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(_frame({"op": "slow"}, b""))
        while not recorder.blocking_threads:
            time.sleep(0.01)
    recorder.release.set()  # the reply now goes to a closed connection
    out = HostClient(path).infer("m", {"x": np.array([2])}, time.time() + 10)
    np.testing.assert_array_equal(out["y"], [4])


def test_many_connections_each_get_their_own_answer(served):
    path, _ = served
    client = HostClient(path)
    errors: list[str] = []

    def caller(i: int):
        for j in range(20):
            x = np.full(100, i * 1000 + j, np.int64)
            y = client.infer("m", {"x": x}, time.time() + 30)["y"]
            if not np.array_equal(y, x * 2):
                errors.append(f"caller {i} call {j} got {y[:3]}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors


@pytest.mark.parametrize(
    "raw",
    [
        b"[1, 2]",  # not an object
        b'{"op": "infer", "buffers": [-5]}',  # a negative size
        b'{"op": "infer", "buffers": "12"}',  # sizes not a list
        b"\xff\xfe not json",
        b"[" * 100_000 + b"]" * 100_000,  # json's RecursionError, not a ValueError
        b'{"op": "infer", "buffers": [4611686018427387904]}',  # 2**62 bytes: no memory holds it
        b'{"op": "infer", "buffers": [1180591620717411303424]}',  # 2**70: past any index
    ],
    ids=[
        "array",
        "negative size",
        "sizes not a list",
        "not json",
        "nested too deep",
        "huge",
        "past an index",
    ],
)
def test_a_malformed_header_drops_only_its_connection(served, raw):
    path, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(struct.pack("!I", len(raw)) + raw)
        sock.settimeout(10)
        assert sock.recv(1) == b""  # the host closed it without answering
    out = HostClient(path).infer("m", {"x": np.array([5])}, time.time() + 10)
    np.testing.assert_array_equal(out["y"], [10])
