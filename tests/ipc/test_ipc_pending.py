"""Replies sent by the thread that finishes the work (``Pending``), over a real Unix socket."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from serving.errors import DeadlineExceeded, QueueFull
from serving.ipc.client import HostClient
from serving.ipc.protocol import decode_tensors, encode_tensors
from serving.ipc.server import IPCServer, Pending


def _tensors_reply(outputs):
    specs, out = encode_tensors(outputs)
    return {"outputs": specs}, out


@pytest.fixture
def worker_host(tmp_path):
    """A host whose infer calls are finished by one separate worker thread after ``delay`` seconds."""
    jobs: list[tuple[float, Future, dict]] = []
    wake = threading.Condition()

    def work():
        while True:
            with wake:
                while not jobs:
                    wake.wait()
                delay, future, tensors = jobs.pop(0)
            time.sleep(delay)
            if "fail" in tensors:
                future.set_exception(QueueFull("no room", retry_after=2))
            elif "crash" in tensors:
                future.set_exception(RuntimeError("secret detail"))
            else:
                future.set_result({"y": tensors["x"] + 1})

    def dispatch(header, buffers):
        tensors = decode_tensors(header["inputs"], buffers)
        future = Future()
        with wake:
            jobs.append((header.get("delay", 0.0), future, tensors))
            wake.notify()
        return Pending(future, _tensors_reply)

    threading.Thread(target=work, daemon=True).start()
    path = str(tmp_path / "host.sock")
    server = IPCServer(path, dispatch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path
    server.close()


def test_pending_reply_reaches_the_caller_with_its_rows(worker_host):
    client = HostClient(worker_host)
    for i in range(3):  # the same connection keeps working after deferred replies
        x = np.full((2, 2), i, dtype=np.float32)
        np.testing.assert_array_equal(client.infer("m", {"x": x}, time.time() + 5)["y"], x + 1)


def test_pending_failure_keeps_its_status_and_headers(worker_host):
    client = HostClient(worker_host)
    with pytest.raises(QueueFull) as err:
        client.infer("m", {"x": np.ones(1, dtype=np.float32), "fail": np.ones(1)}, time.time() + 5)
    assert err.value.headers["Retry-After"] == "2"


def test_pending_crash_is_reported_without_its_details(worker_host):
    client = HostClient(worker_host)
    with pytest.raises(Exception) as err:
        client.infer("m", {"x": np.ones(1, dtype=np.float32), "crash": np.ones(1)}, time.time() + 5)
    assert int(err.value.status) == 500
    assert "secret" not in err.value.message


def test_caller_that_gave_up_does_not_get_the_late_reply_on_its_next_call(worker_host):
    client = HostClient(worker_host)
    slow = {"x": np.zeros(1, dtype=np.float32)}
    with pytest.raises(DeadlineExceeded):
        client.call({"op": "infer", "delay": 0.5, "inputs": encode_tensors(slow)[0]},
                    encode_tensors(slow)[1], time.time() + 0.1)  # fmt: skip
    x = np.full(1, 5, dtype=np.float32)
    np.testing.assert_array_equal(client.infer("m", {"x": x}, time.time() + 5)["y"], x + 1)
    time.sleep(0.6)  # the abandoned reply is finished and dropped with its closed connection
    np.testing.assert_array_equal(client.infer("m", {"x": x}, time.time() + 5)["y"], x + 1)
