"""Start-up, readiness, ports, signals and host restarts of a real `onebox serve` (contract cases 1–9)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from serving.errors import ServingError
from serving.ipc.client import HostClient
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow

SLOW_SCRIPT = """
import time, json
import numpy as np

def model_fn(model_dir):
    time.sleep(float(open(model_dir + "/load_seconds").read()))
    return "m"

def input_fn(data, content_type):
    return json.loads(data)

def predict_fn(data, model):
    time.sleep(data.get("sleep", 0))
    return data

def output_fn(prediction, accept):
    return json.dumps(prediction)
"""


@pytest.fixture
def onnx_dir(tmp_path):
    pytest.importorskip("onnxruntime")
    return models.onnx_model(tmp_path / "onnx")


def _listening_ports(pid: int) -> set[int]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    ports = set()
    for proc in procs:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                ports.add(conn.laddr.port)
    return ports


def test_serves_on_the_bind_to_port_and_opens_no_other_tcp_port(onnx_dir):
    # cases 2 and 3: SAGEMAKER_BIND_TO_PORT is honoured; frontends reach hosts over Unix
    # sockets, so no extra TCP port exists that could fall outside SAGEMAKER_SAFE_PORT_RANGE
    with Server(onnx_dir, env={"SAGEMAKER_SAFE_PORT_RANGE": "20000-20010"}) as server:
        assert server.request("GET", "/ping").status == 200
        assert _listening_ports(server.proc.pid) == {server.port}


def test_ping_is_503_while_the_model_loads_then_200(tmp_path):
    # case 4
    model_dir = models.user_script_model(tmp_path / "slow", SLOW_SCRIPT)
    (model_dir / "load_seconds").write_text("4")
    with Server(model_dir, expect_ready=False) as server:
        first = server.request("GET", "/ping")
        assert first.status == 503
        assert json.loads(first.body)["error"]["type"] == "NotReady"
        server.wait_ready(60)
        assert server.post_json({"sleep": 0}).json() == {"sleep": 0}


def test_a_corrupt_artifact_never_becomes_ready_but_the_server_stays_up(tmp_path):
    # case 5
    model_dir = tmp_path / "corrupt"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"\x08\x0a\x12\x04junk" + os.urandom(64))
    with Server(model_dir, expect_ready=False) as server:
        for _ in range(10):
            reply = server.request("GET", "/ping")
            assert reply.status == 503
            time.sleep(0.3)
        assert server.proc.poll() is None
        assert "failed to load" in server.log()
        assert "failed to load" in json.loads(reply.body)["error"]["message"]


def test_ping_answers_while_every_model_call_is_busy(tmp_path):
    # cases 6 and 7: slow invocations occupy the host; /ping and new connections still answer
    model_dir = models.user_script_model(tmp_path / "busy", SLOW_SCRIPT)
    (model_dir / "load_seconds").write_text("0")
    with Server(model_dir, threads=32) as server:
        threads = [threading.Thread(target=server.post_json, args=({"sleep": 1},)) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert server.request("GET", "/ping", timeout=2).status == 200  # SageMaker's ping timeout
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.25):
            pass
        for t in threads:
            t.join()


def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(tmp_path):
    # case 9
    model_dir = models.user_script_model(tmp_path / "term", SLOW_SCRIPT)
    (model_dir / "load_seconds").write_text("0")
    server = Server(model_dir)
    server.start()
    results = []
    worker = threading.Thread(target=lambda: results.append(server.post_json({"sleep": 2})))
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    worker.join()
    code = server.proc.wait(30)
    server.stop()
    assert results and results[0].status == 200 and results[0].json() == {"sleep": 2}
    assert code == 0
    assert time.monotonic() - started < 30


def test_a_dead_host_turns_ping_503_and_is_restarted(onnx_dir):
    with Server(onnx_dir) as server:
        host = next(p for p in psutil.Process(server.proc.pid).children() if "host" in p.cmdline())
        host.kill()
        saw_503 = False
        for _ in range(100):
            if server.request("GET", "/ping").status == 503:
                saw_503 = True
                break
            time.sleep(0.02)
        assert saw_503
        server.wait_ready(60)
        assert server.post_json([[1, 2, 3, 4]]).status == 200
        assert "restart" in server.log()


def test_after_a_host_restart_no_request_fails_on_a_connection_to_the_dead_host(onnx_dir, tmp_path):
    run = tmp_path / "run"
    with Server(onnx_dir, env={"ONEBOX_RUN_DIR": str(run)}, workers=1) as server:

        def burst() -> list[int]:
            """Invocations (the loop's own links) and pings (the pool threads' links), at once."""
            replies: list[int] = []
            calls = [lambda: server.post_json([[1, 2, 3, 4]]), lambda: server.request("GET", "/ping")]
            threads = [
                threading.Thread(target=lambda call=call: replies.extend(call().status for _ in range(5)))
                for call in calls * 4
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return replies

        assert burst() == [200] * 40  # the worker now holds idle connections to the host
        host = next(p for p in psutil.Process(server.proc.pid).children() if "host" in p.cmdline())
        host.kill()
        host.wait(10)
        client = HostClient(str(run / "host-cpu.sock"))  # asks the host itself, not through the frontend
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if client.health(time.time() + 2)["ready"]:
                    break
            except ServingError:
                client.close()
            time.sleep(0.1)
        # each request finds a connection to the host that died, and goes again on a new one
        assert burst() == [200] * 40


def test_bad_configuration_exits_2_with_one_line(onnx_dir):
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": "eighty"}
    cmd = [sys.executable, "-m", "serving", "serve", str(onnx_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "SAGEMAKER_BIND_TO_PORT" in proc.stderr and "eighty" in proc.stderr


def test_a_missing_model_directory_exits_2_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "serving", "serve", str(tmp_path / "nothing-here")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "nothing-here" in proc.stderr and proc.stderr.strip().count("\n") == 0
