"""``GET /metrics`` and CloudWatch EMF lines from a real ``onebox serve`` with 2 frontend workers."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from tests.support import models
from tests.support.emf import documents
from tests.support.server import Server

pytestmark = pytest.mark.slow

#: the toolkit script answers 200 for rows, 422 for application/x-fail, 500 when predict_fn raises
SENT = {"200": 9, "422": 4, "500": 3}


def _send(server: Server) -> None:
    def one(status: str):
        if status == "200":
            return server.post_json([[1.0, 2.0, 3.0, 4.0]])
        if status == "422":
            return server.request("POST", "/invocations", b"[[1]]", {"Content-Type": "application/x-fail"})
        return server.post_json([1.0, 2.0])  # one dimension: predict_fn raises -> 500

    wanted = [status for status, n in SENT.items() for _ in range(n)]
    with ThreadPoolExecutor(8) as pool:  # fresh connections, shared out between the two workers
        got = [str(reply.status) for reply in pool.map(one, wanted)]
    assert sorted(got) == sorted(wanted)


def _scrape(server: Server) -> dict[tuple, float]:
    reply = server.request("GET", "/metrics")
    assert reply.status == 200 and reply.content_type.startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def _requests(values: dict, model: str = "model") -> dict[str, float]:
    return {
        dict(labels)["status"]: v
        for (name, labels), v in values.items()
        if name == "onebox_requests_total" and dict(labels)["model"] == model
    }


def _scrape_until(server: Server, done, timeout: float = 30.0) -> dict:
    """Scrapes until ``done(values)``: each worker publishes what it counted once a second."""
    end = time.monotonic() + timeout
    while True:
        values = _scrape(server)
        if done(values) or time.monotonic() > end:
            return values
        time.sleep(0.2)


@pytest.fixture
def script_dir(tmp_path):
    return models.user_script_model(tmp_path / "script", models.TOOLKIT_SCRIPT)


def _workers_counted(metrics_dir: Path) -> int:
    """How many processes' files hold invocation counts (each frontend worker writes its own)."""
    counted = 0
    for path in metrics_dir.glob("counter_*.db"):
        try:
            merged = multiprocess.MultiProcessCollector.merge([str(path)], accumulate=True)
        except struct.error:  # a file its process is creating right now: nothing in it yet
            continue
        counted += any(m.name == "onebox_requests" and m.samples for m in merged)
    return counted


@pytest.mark.parametrize("worker_class", ["loop", "gthread", "gevent"])
def test_requests_are_counted_by_status_exactly_once_across_two_workers(script_dir, tmp_path, worker_class):
    env = {"ONEBOX_FRONTEND_WORKER_CLASS": worker_class, "ONEBOX_RUN_DIR": str(tmp_path / "run")}
    metrics_dir = tmp_path / "run" / "metrics"
    with Server(script_dir, workers=2, env=env) as server:
        assert _requests(_scrape(server)) == {}  # nothing counted before the first invocation
        # until both workers have answered some (the kernel shares connections out between them)
        rounds = 0
        while rounds < 10:
            _send(server)
            rounds += 1
            want = {status: float(n * rounds) for status, n in SENT.items()}
            values = _scrape_until(server, lambda v, want=want: _requests(v) == want)
            assert _requests(values) == want
            if _workers_counted(metrics_dir) == 2:
                break
        assert _workers_counted(metrics_dir) == 2, "one worker answered every request of 10 rounds"
        for status, n in SENT.items():
            labels = (("model", "model"), ("status", status))
            assert values[("onebox_request_duration_seconds_count", labels)] == n * rounds
            assert values[("onebox_request_duration_seconds_bucket", (("le", "+Inf"), *labels))] == n * rounds
        total = sum(SENT.values()) * rounds
        assert values[("onebox_request_model_seconds_count", (("model", "model"),))] == total
        assert values[("onebox_request_overhead_seconds_count", (("model", "model"),))] == total
        # the host's side: the single model loaded once, the processes
        assert values[("onebox_models_loaded", (("device", "cpu"),))] == 1
        load = ("onebox_model_load_seconds_count", (("device", "cpu"), ("model", "model"), ("status", "200")))
        assert values[load] == 1
        assert values[("onebox_process_cpu_seconds_total", (("device", "cpu"), ("role", "host")))] > 0
        assert ("onebox_process_resident_memory_bytes", (("device", ""), ("role", "frontend"))) in values
        assert not any(name.startswith("onebox_gpu_") for name, _ in values)  # no NVML here
        # a second look counts nothing twice (the scrapes themselves are not invocations)
        time.sleep(1.5)
        assert _requests(_scrape(server)) == want


def test_batches_queue_and_compute_are_reported_by_the_host(tmp_path):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    with Server(model_dir, workers=2) as server:
        for rows in (1, 2, 3):
            assert server.post_json([[1.0, 2.0, 3.0, 4.0]] * rows).status == 200
        assert server.request("POST", "/invocations", b"x", {"Content-Type": "text/plain"}).status == 415
        assert server.post_json({"nope": 1}).status == 400
        labels = (("device", "cpu"), ("model", "model"))
        values = _scrape_until(server, lambda v: _requests(v) == {"200": 3, "415": 1, "400": 1})
        assert _requests(values) == {"200": 3, "415": 1, "400": 1}
        # warm-up batches count too: what the device ran
        batches = values[("onebox_batch_size_count", labels)]
        assert batches >= 3
        assert values[("onebox_compute_seconds_count", labels)] == batches
        assert values[("onebox_queue_seconds_count", labels)] >= 3
        assert values[("onebox_batch_size_sum", labels)] >= 6
        # the 415 and the 400 never reached the host: model time only for the 3 that did
        assert values[("onebox_request_model_seconds_count", (("model", "model"),))] == 3
        assert values[("onebox_queue_depth", labels)] == 0


def _host_pid(server: Server) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == server.proc.pid and b"host" in cmdline:
            return int(entry)
    raise AssertionError("no model host process found")


def test_a_restarted_host_is_counted(script_dir):
    with Server(script_dir, workers=1) as server:
        values = _scrape(server)
        assert ("onebox_host_restarts_total", (("device", "cpu"),)) not in values
        os.kill(_host_pid(server), signal.SIGKILL)
        time.sleep(0.5)
        server.wait_ready(60)
        values = _scrape_until(server, lambda v: ("onebox_host_restarts_total", (("device", "cpu"),)) in v)
        assert values[("onebox_host_restarts_total", (("device", "cpu"),))] == 1
        assert values[("onebox_models_loaded", (("device", "cpu"),))] == 1  # the dead host's gauge is gone
        assert server.post_json([[1.0, 2.0, 3.0, 4.0]]).status == 200


def test_emf_lines_per_interval_add_up_to_the_invocations(script_dir):
    env = {"ONEBOX_CLOUDWATCH_EMF": "true", "ONEBOX_CLOUDWATCH_NAMESPACE": "onebox-test"}
    # the default interval is 60 s: every worker wrote its lines when it stopped
    docs, stdout = _emf_run(script_dir, env)
    assert docs, stdout
    assert all(d["ModelName"] == "model" for d in docs)
    assert len(docs) <= 2  # one per worker that answered, not one per request
    _assert_counts(docs)
    directive = docs[0]["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "onebox-test" and directive["Dimensions"] == [["ModelName"]]
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]}["ModelLatency"] == "Microseconds"
    other = [line for line in stdout.splitlines() if not line.startswith("{")]
    assert all(line.startswith("onebox:") for line in other), other  # nothing else, nothing torn


def test_emf_interval_zero_writes_one_line_per_invocation(script_dir):
    # contract case 61
    env = {"ONEBOX_CLOUDWATCH_EMF": "true", "ONEBOX_CLOUDWATCH_EMF_INTERVAL": "0"}
    docs, _ = _emf_run(script_dir, env)
    assert len(docs) == sum(SENT.values())
    assert all(d["Invocations"] == 1 for d in docs)
    _assert_counts(docs)
    assert all(isinstance(d["ModelLatency"], int) for d in docs)
    assert json.dumps(docs)  # plain JSON throughout


def test_a_multi_model_endpoint_reports_each_model_and_its_loads(tmp_path):
    pytest.importorskip("onnxruntime")
    for name in ("m1", "m2"):
        models.onnx_model(tmp_path / "models" / name / "model")
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BASE_DIR": str(tmp_path)}
    with Server(None, workers=2, env=env) as server:
        for name in ("m1", "m2"):
            body = {"model_name": name, "url": str(tmp_path / "models" / name / "model")}
            assert server.post_json(body, path="/models").status == 200
        assert server.post_json({"model_name": "m1", "url": body["url"]}, path="/models").status == 409
        for _ in range(3):
            assert server.post_json([[1.0, 2.0, 3.0, 4.0]], path="/models/m1/invoke").status == 200
        assert server.post_json([[1.0, 2.0, 3.0, 4.0]], path="/models/m2/invoke").status == 200
        for made_up in ("nope", "n%C3%B6pe", "x1"):  # not counted under each made-up name
            assert server.post_json([[1.0]], path=f"/models/{made_up}/invoke").status == 404
        assert server.request("DELETE", "/models/m2").status == 200
        # each worker publishes on its own second: wait for every count, not just the last sent
        expected = {"m1": {"200": 3}, "m2": {"200": 1}, "-": {"404": 3}}
        values = _scrape_until(server, lambda v: all(_requests(v, m) == c for m, c in expected.items()))
        assert _requests(values, "m1") == {"200": 3}
        assert _requests(values, "m2") == {"200": 1}
        assert _requests(values, "-") == {"404": 3}
        assert not any(dict(labels).get("model") in ("nope", "x1") for _, labels in values)
        assert values[("onebox_models_loaded", (("device", "cpu"),))] == 1
        load = "onebox_model_load_seconds_count"
        assert values[(load, (("device", "cpu"), ("model", "m1"), ("status", "200")))] == 1
        assert values[(load, (("device", "cpu"), ("model", "m1"), ("status", "409")))] == 1
        assert values[("onebox_model_unload_seconds_count", (("device", "cpu"), ("model", "m2")))] == 1


def _emf_run(script_dir, env: dict) -> tuple[list[dict], str]:
    """_send's invocations to a 2-worker server with ``env``: its EMF documents and its stdout."""
    server = Server(script_dir, workers=2, env=env, split_stdout=True)
    with server:
        _send(server)
    return documents(server.stdout()), server.stdout()


def _assert_counts(docs: list[dict]) -> None:
    """The EMF documents count every invocation _send made, and its 4XX and 5XX, once."""
    assert sum(d["Invocations"] for d in docs) == sum(SENT.values())
    assert sum(d["Invocation4XXErrors"] for d in docs) == SENT["422"]
    assert sum(d["Invocation5XXErrors"] for d in docs) == SENT["500"]
