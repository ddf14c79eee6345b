"""The loop worker's time sums (serving.http.timings) through a real `onebox serve`: written once a
second where ONEBOX_FRONTEND_TIMINGS points, counting every answered request and every kept-alive turn."""

from __future__ import annotations

import http.client
import io
import time

import numpy as np
import pytest

from serving.http.routing import DESCRIBE_TTL_S
from serving.http.timings import read_all
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow

REQUESTS = 20


def _served(tmp_path):
    """A server of the onnx model whose loop worker writes its sums to ``tmp_path/timings``."""
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    timings = tmp_path / "timings"
    timings.mkdir()
    return Server(model_dir, workers=1, threads=2, env={"ONEBOX_FRONTEND_TIMINGS": str(timings)}), timings


def _invoke(conn: http.client.HTTPConnection) -> None:
    """One npy request on a kept-alive connection, answered 200."""
    buf = io.BytesIO()
    np.save(buf, np.arange(4, dtype=np.float32).reshape(1, 4))
    conn.request("POST", "/invocations", buf.getvalue(), {"Content-Type": "application/x-npy"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()


def test_the_loop_worker_writes_where_its_requests_spent_their_time(tmp_path):
    server, timings = _served(tmp_path)
    with server as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        for _ in range(REQUESTS + 1):  # the first goes by the pool, which fetches the description
            _invoke(conn)
            time.sleep(0.01)  # the client's own time between requests
        conn.close()
        deadline = time.monotonic() + 10
        while (sums := read_all(timings))["requests"] < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.2)
    assert len(list(timings.glob("frontend-*.json"))) == 1
    # fast-path requests only: every one after the first (which fetched the description)
    assert sums["requests"] == REQUESTS
    # each one that followed a fast-path answer on its connection is a turn
    assert sums["requests"] - 2 <= sums["turns"] <= sums["requests"] - 1
    assert sums["host_s"] > 0 and sums["wait_s"] >= 0 and sums["answer_s"] >= 0
    # the host stamps its replies: the way back is part of the time at the host
    assert 0 < sums["back_s"] < sums["host_s"]
    # the client slept 10 ms between requests: that is its time, not the server's
    assert sums["turnaround_s"] >= sums["turns"] * 0.01


def test_without_a_directory_nothing_is_written(tmp_path):
    from serving.http.timings import Timings

    timings = Timings(None)
    timings.answered(1.0, 1.5, 3.0, 3.25)
    timings.dump()
    assert timings.as_dict() == {
        "requests": 1, "wait_s": 0.5, "host_s": 1.5, "back_s": 0.0, "answer_s": 0.25, "turns": 0, "turnaround_s": 0.0,
    }  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_an_expired_description_is_fetched_again_while_requests_stay_on_the_fast_path(tmp_path):
    """Requests over three description lifetimes: after the first (which fetches the
    description through the pool), every one is answered by the loop, none by the pool."""
    server, timings = _served(tmp_path)
    with server as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        sent, until = 0, time.monotonic() + 3 * DESCRIBE_TTL_S
        while time.monotonic() < until:
            _invoke(conn)
            sent += 1
            time.sleep(0.02)
        conn.close()
        deadline = time.monotonic() + 10
        while (sums := read_all(timings))["requests"] < sent - 1 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sums["requests"] == sent - 1, (sums["requests"], sent)
