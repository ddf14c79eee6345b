"""Dynamic batching through a real `onebox serve`: queue limits, deadlines, padding, failing
batches, combining concurrent requests and start-up validation of the batching knobs (DESIGN §5).

Most tests use a user script that opted in to batching (``batch = true``) and appends the first
column of every batch it is given to ``batches.jsonl`` in its model directory, so a test can see
exactly which rows reached the model and how they were grouped.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.http.app import TIMEOUT_HEADER
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow

POISON = -999.0

RECORDING_SCRIPT = """
import json, os, time
import numpy as np

W = np.array(__W__, dtype=np.float32)
B = np.array(__B__, dtype=np.float32)

def model_fn(model_dir):
    return model_dir

def input_fn(data, content_type):
    return np.asarray(json.loads(data), dtype=np.float32)

def predict_fn(data, model_dir):
    with open(os.path.join(model_dir, "batches.jsonl"), "a") as log:
        log.write(json.dumps(data[:, 0].tolist()) + "\\n")
    if (data == __POISON__).any():
        raise ValueError("a poisoned row")
    sleep = os.path.join(model_dir, "sleep")
    if os.path.exists(sleep):
        time.sleep(float(open(sleep).read()))
    return data @ W + B

def output_fn(prediction, accept):
    return json.dumps(prediction.tolist())
"""
RECORDING_SCRIPT = (
    RECORDING_SCRIPT.replace("__W__", str(models.W.tolist()))
    .replace("__B__", str(models.B.tolist()))
    .replace("__POISON__", repr(POISON))
)


def _script_model(tmp_path: Path, toml: str, sleep: float = 0.0) -> Path:
    model_dir = models.user_script_model(tmp_path / "script", RECORDING_SCRIPT)
    (model_dir / "onebox.toml").write_text(toml)
    _set_sleep(model_dir, sleep)
    return model_dir


def _set_sleep(model_dir: Path, seconds: float) -> None:
    """How long each later batch sleeps in predict_fn (read by the script on every call)."""
    (model_dir / "sleep").write_text(str(seconds))


def _batches(model_dir: Path) -> list[list[float]]:
    """The first column of every batch predict_fn received, in order."""
    path = model_dir / "batches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_batches(model_dir: Path, count: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while len(_batches(model_dir)) < count:
        assert time.monotonic() < end, f"the model saw {_batches(model_dir)}, expected {count} batches"
        time.sleep(0.02)


def _rows(marker: float, n: int) -> np.ndarray:
    """``n`` distinct rows whose first column is ``marker`` (exact in float32)."""
    rows = np.empty((n, 4), dtype=np.float32)
    rows[:, 0] = marker
    rows[:, 1] = np.arange(n)
    rows[:, 2] = -0.5 * np.arange(n)
    rows[:, 3] = marker / 4
    return rows


def _post_all(server, payloads: list[np.ndarray], threads: int) -> list:
    """Each payload posted as JSON from ``threads`` concurrent clients; the replies in order."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda x: server.post_json(x.tolist()), payloads))


def _assert_answer(reply, x: np.ndarray) -> None:
    assert reply.status == 200, reply.body
    got = np.asarray(reply.json(), dtype=np.float32)
    assert got.shape == (len(x), 3)
    np.testing.assert_allclose(got, models.reference(x), rtol=1e-6, atol=1e-6)


def _assert_error(reply, status: int, kind: str) -> dict:
    assert reply.status == status, reply.body
    assert reply.content_type.startswith("application/json")
    error = reply.json()["error"]
    assert error["type"] == kind
    assert "Traceback" not in reply.body.decode()
    return error


def _assert_start_fails(model_dir: Path, message: str) -> None:
    """The server runs but never becomes ready, and both the log and /ping name the problem."""
    with Server(model_dir, expect_ready=False) as server:
        end = time.monotonic() + 60
        while "failed to load" not in server.log():
            assert time.monotonic() < end, server.log()
            assert server.request("GET", "/ping").status == 503
            time.sleep(0.2)
        reply = server.request("GET", "/ping")
        assert reply.status == 503
        assert message in reply.json()["error"]["message"]
        assert message in server.log()
        assert server.proc.poll() is None


# -- 429 -------------------------------------------------------------------------------------


def test_a_flood_beyond_max_queue_gets_429_with_retry_after_and_the_rest_correct_answers(tmp_path):
    model_dir = _script_model(tmp_path, "batch = true\nmax_batch_size = 2\nmax_queue = 2\n", sleep=0.3)
    with Server(model_dir, workers=2, threads=8) as server:
        payloads = [_rows(i, 1) for i in range(16)]
        replies = _post_all(server, payloads, 16)
        full = [r for r in replies if r.status == 429]
        assert full, "no request was refused although 16 arrived for a queue of 2"
        for reply in full:
            assert int(reply.headers["retry-after"]) >= 1
            assert "queue" in _assert_error(reply, 429, "QueueFull")["message"]
        answered = [(x, r) for x, r in zip(payloads, replies, strict=True) if r.status != 429]
        assert answered, "every request was refused"
        for x, reply in answered:
            _assert_answer(reply, x)
        # only the answered requests reached the model
        seen = sorted(v for batch in _batches(model_dir) for v in batch)
        assert seen == sorted(float(x[0, 0]) for x, _ in answered)

        _set_sleep(model_dir, 0)
        after = _rows(100, 2)
        _assert_answer(server.post_json(after.tolist()), after)


# -- 504 -------------------------------------------------------------------------------------

DEADLINES = {
    # how a short deadline is set -> (server env, onebox.toml line, request headers, first sleep)
    "header": ({}, "", {TIMEOUT_HEADER: "200"}, 1.0),
    "model timeout_s": ({}, "timeout_s = 0.5\n", {}, 1.5),
    "server timeout": ({"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "0.5"}, "", {}, 1.5),
}


@pytest.mark.parametrize("how", DEADLINES)
def test_a_request_whose_deadline_passes_in_the_queue_gets_504_and_never_reaches_the_model(tmp_path, how):
    env, line, headers, first_sleep = DEADLINES[how]
    model_dir = _script_model(tmp_path, "batch = true\nmax_batch_size = 4\n" + line, sleep=first_sleep)
    with Server(model_dir, env=env) as server:
        first, late, after = _rows(1, 1), _rows(777, 1), _rows(3, 1)
        replies = {}
        busy = threading.Thread(target=lambda: replies.update(first=server.post_json(first.tolist())))
        busy.start()
        _wait_for_batches(model_dir, 1)  # the first request now occupies the model
        started = time.monotonic()
        _set_sleep(model_dir, 0)
        reply = server.post_json(late.tolist(), headers=headers)
        assert time.monotonic() - started < first_sleep - 0.2, "the 504 waited for the busy model"
        assert "deadline" in _assert_error(reply, 504, "DeadlineExceeded")["message"]
        busy.join()
        if headers:
            _assert_answer(replies["first"], first)
        else:  # the short deadline applies to the first request too: it ran, but too long
            _assert_error(replies["first"], 504, "DeadlineExceeded")
            time.sleep(max(0.0, started + first_sleep + 0.1 - time.monotonic()))  # the model is free
        _assert_answer(server.post_json(after.tolist(), headers=headers), after)
        assert _batches(model_dir) == [[1.0], [3.0]]


# -- padding to fixed sizes ------------------------------------------------------------------


@pytest.fixture
def static_program(tmp_path) -> Path:
    pytest.importorskip("torch")
    return models.exported_program_model(tmp_path / "static4", static_batch=4)


def test_a_static_batch_artifact_gets_padded_and_split_requests_and_answers_only_real_rows(static_program):
    (static_program / "onebox.toml").write_text("max_queue = 64\n")
    with Server(static_program, threads=16) as server:
        for n in (1, 2, 3, 4, 5, 6, 9):
            x = _rows(n, n)
            _assert_answer(server.post_json(x.tolist()), x)
        # concurrent small requests share padded batches of 4 and still get their own rows
        payloads = [_rows(10 + i, 1 + i % 3) for i in range(24)]
        for x, reply in zip(payloads, _post_all(server, payloads, 24), strict=True):
            _assert_answer(reply, x)


def test_max_batch_size_beyond_a_static_batch_artifact_fails_start_up(static_program):
    (static_program / "onebox.toml").write_text("max_batch_size = 8\n")
    _assert_start_fails(static_program, "max_batch_size = 8 is larger than the artifact accepts (4)")


def test_batch_sizes_on_a_dynamic_program_pad_requests_and_answer_only_their_rows(tmp_path):
    pytest.importorskip("torch")
    model_dir = models.exported_program_model(tmp_path / "dynamic")
    (model_dir / "onebox.toml").write_text("batch_sizes = [2, 4]\n")
    with Server(model_dir) as server:
        for n in (1, 3, 4, 5, 7):
            x = _rows(n, n)
            _assert_answer(server.post_json(x.tolist()), x)


def test_batch_sizes_pad_each_batch_up_to_the_next_size_the_model_sees(tmp_path):
    model_dir = _script_model(tmp_path, "batch = true\nmax_batch_size = 4\nbatch_sizes = [2, 4]\n")
    with Server(model_dir) as server:
        for n in (1, 3, 5):
            x = _rows(n, n)
            _assert_answer(server.post_json(x.tolist()), x)
    # 1 -> 2, 3 -> 4, 5 -> 4 + (1 -> 2); the padding repeats the request's last row
    assert _batches(model_dir) == [[1.0] * 2, [3.0] * 4, [5.0] * 4, [5.0] * 2]


# -- a failing batch -------------------------------------------------------------------------


def test_a_failing_batch_fails_each_of_its_requests_with_the_same_error_and_nothing_else(tmp_path):
    model_dir = _script_model(tmp_path, "batch = true\nmax_batch_size = 16\n", sleep=1.0)
    with Server(model_dir) as server:
        blocker = _rows(1, 1)
        queued = [_rows(10, 2), _rows(POISON, 1), _rows(11, 1)]
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(server.post_json, blocker.tolist())
            _wait_for_batches(model_dir, 1)  # the blocker runs; the next three queue behind it
            _set_sleep(model_dir, 0)
            replies = list(pool.map(lambda x: server.post_json(x.tolist()), queued))
            _assert_answer(first.result(), blocker)
        assert sorted(_batches(model_dir)[1]) == [POISON, 10.0, 10.0, 11.0], "not one batch"
        bodies = {reply.body for reply in replies}
        assert len(bodies) == 1, bodies
        error = _assert_error(replies[0], 500, "ModelError")
        assert "poisoned row" in error["message"]
        after = _rows(20, 3)
        _assert_answer(server.post_json(after.tolist()), after)


# -- combining concurrent requests -----------------------------------------------------------


def test_64_concurrent_requests_to_a_batched_model_each_get_their_own_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    (model_dir / "onebox.toml").write_text("max_batch_size = 16\n")
    with Server(model_dir, workers=2, threads=16) as server:
        payloads = [_rows(i, 1 + i % 5) for i in range(64)]
        for x, reply in zip(payloads, _post_all(server, payloads, 64), strict=True):
            _assert_answer(reply, x)


def test_a_batching_user_script_sees_concurrent_requests_combined_into_one_batch(tmp_path):
    model_dir = _script_model(tmp_path, "batch = true\nmax_batch_size = 16\n", sleep=0.05)
    with Server(model_dir, workers=2, threads=16) as server:
        payloads = [_rows(i, 1 + i % 3) for i in range(48)]
        for x, reply in zip(payloads, _post_all(server, payloads, 32), strict=True):
            _assert_answer(reply, x)
    batches = _batches(model_dir)
    assert max(len(b) for b in batches) > 1, f"no two requests ever shared a batch: {batches}"
    assert max(len(b) for b in batches) <= 16
    # every row ran exactly once
    assert sorted(v for b in batches for v in b) == sorted(v for x in payloads for v in x[:, 0].tolist())


# -- validation at start ---------------------------------------------------------------------


def test_max_batch_size_above_the_programs_dynamic_range_fails_start_up(tmp_path):
    pytest.importorskip("torch")
    model_dir = models.exported_program_model(tmp_path / "dynamic64")
    (model_dir / "onebox.toml").write_text("max_batch_size = 128\n")
    _assert_start_fails(model_dir, "max_batch_size = 128 is larger than the artifact accepts (64)")
