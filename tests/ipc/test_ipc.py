import socket
import threading
import time

import numpy as np
import pytest

from serving.errors import BadRequest, DeadlineExceeded, NotReady, QueueFull
from serving.ipc.client import HostClient
from serving.ipc.protocol import decode_tensors, encode_tensors, recv_message, send_message
from serving.ipc.server import IPCServer


def test_tensors_round_trip_through_a_socket_without_pickling():
    left, right = socket.socketpair()
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([[1, 2]], dtype=np.int64)}
    specs, buffers = encode_tensors(arrays)
    send_message(left, {"op": "infer", "inputs": specs}, buffers)
    header, received = recv_message(right)
    out = decode_tensors(header["inputs"], received)
    assert header["op"] == "infer"
    for name, array in arrays.items():
        np.testing.assert_array_equal(out[name], array)
        assert out[name].dtype == array.dtype


def test_large_tensor_survives_partial_sends():
    left, right = socket.socketpair()
    big = np.random.default_rng(0).integers(0, 255, size=(4, 3, 224, 224), dtype=np.uint8)
    specs, buffers = encode_tensors({"x": big})
    sender = threading.Thread(target=send_message, args=(left, {"inputs": specs}, buffers))
    sender.start()
    header, received = recv_message(right)
    sender.join()
    np.testing.assert_array_equal(decode_tensors(header["inputs"], received)["x"], big)


def test_object_arrays_cannot_be_sent():
    with pytest.raises(BadRequest):
        encode_tensors({"x": np.array([{"a": 1}], dtype=object)})


@pytest.fixture
def host(tmp_path):
    def dispatch(header, buffers):
        op = header["op"]
        if op == "infer":
            tensors = decode_tensors(header["inputs"], buffers)
            specs, out = encode_tensors({"y": tensors["x"] * 2})
            return {"outputs": specs}, out
        if op == "sleep":
            time.sleep(header["seconds"])
            return {}, []
        if op == "full":
            raise QueueFull("queue is full", retry_after=3)
        raise RuntimeError("boom: secret internal detail")

    path = str(tmp_path / "host.sock")
    server = IPCServer(path, dispatch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path
    server.close()


def test_client_gets_its_answer(host):
    client = HostClient(host)
    out = client.infer("m", {"x": np.ones((2, 3), dtype=np.float32)}, time.time() + 5)
    np.testing.assert_array_equal(out["y"], np.full((2, 3), 2, dtype=np.float32))


def test_errors_keep_status_and_headers_but_not_internals(host):
    client = HostClient(host)
    with pytest.raises(QueueFull) as info:
        client.call({"op": "full"}, [], time.time() + 5)
    assert info.value.headers["Retry-After"] == "3"
    with pytest.raises(Exception) as info:
        client.call({"op": "crash"}, [], time.time() + 5)
    assert int(info.value.status) == 500
    assert "secret" not in info.value.message


def test_deadline_expires_and_the_connection_is_not_reused_for_a_late_answer(host):
    client = HostClient(host)
    with pytest.raises(DeadlineExceeded):
        client.call({"op": "sleep", "seconds": 0.5}, [], time.time() + 0.1)
    # the late answer to the sleep must not be read as the answer to this call
    out = client.infer("m", {"x": np.full((1, 1), 7, dtype=np.float32)}, time.time() + 5)
    assert out["y"][0, 0] == 14


def test_a_passed_deadline_never_leaves_the_frontend(host):
    with pytest.raises(DeadlineExceeded):
        HostClient(host).call({"op": "sleep", "seconds": 0}, [], time.time() - 1)


def test_concurrent_callers_each_get_their_own_answer(host):
    client = HostClient(host)
    results = {}

    def call(i):
        out = client.infer("m", {"x": np.full((i + 1, 2), i, dtype=np.float32)}, time.time() + 10)
        results[i] = out["y"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(32):
        np.testing.assert_array_equal(results[i], np.full((i + 1, 2), 2 * i, dtype=np.float32))


def test_unreachable_host_is_not_ready(tmp_path):
    with pytest.raises(NotReady):
        HostClient(str(tmp_path / "nothing.sock")).call({"op": "health"}, [], time.time() + 1)


def test_a_header_larger_than_the_first_read_is_received_whole():
    left, right = socket.socketpair()
    note = "x" * (200 * 1024)  # the first recv reads 64 KiB; the rest of the header follows
    specs, buffers = encode_tensors({"a": np.arange(5, dtype=np.int64)})
    sender = threading.Thread(target=send_message, args=(left, {"note": note, "inputs": specs}, buffers))
    sender.start()
    header, received = recv_message(right)
    sender.join()
    assert header["note"] == note
    np.testing.assert_array_equal(decode_tensors(header["inputs"], received)["a"], np.arange(5))


def test_back_to_back_messages_on_one_connection_stay_separate():
    left, right = socket.socketpair()
    for i in range(3):
        specs, buffers = encode_tensors({"x": np.full((2, 2), i, dtype=np.float32)})
        send_message(left, {"i": i, "inputs": specs}, buffers)
        header, received = recv_message(right)
        assert header["i"] == i
        assert decode_tensors(header["inputs"], received)["x"][0, 0] == i
