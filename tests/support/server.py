"""Start a real ``onebox serve`` subprocess on a free port and talk to it over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def npy(self) -> np.ndarray:
        import io

        return np.load(io.BytesIO(self.body), allow_pickle=False)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class Server:
    """A running ``onebox serve MODEL_DIR``; use as a context manager."""

    def __init__(self, model_dir: Path | None, env: dict[str, str] | None = None, workers: int = 2,
                 threads: int = 8, ready_timeout: float = 90.0, expect_ready: bool = True,
                 split_stdout: bool = False):  # fmt: skip
        """``split_stdout``: the server's stdout goes to its own file (:meth:`stdout`), apart
        from stderr (:meth:`log`)."""
        self.port = free_port()
        self.model_dir = model_dir
        self.log_path = Path(tempfile.mkstemp(prefix="onebox-test-", suffix=".log")[1])
        self.stdout_path = (
            Path(tempfile.mkstemp(prefix="onebox-test-", suffix=".stdout")[1]) if split_stdout else None
        )
        self.env = {
            **os.environ,
            "SAGEMAKER_BIND_TO_PORT": str(self.port),
            "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
            "ONEBOX_FRONTEND_THREADS": str(threads),
            "ONEBOX_BIND_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.ready_timeout = ready_timeout
        self.expect_ready = expect_ready
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "serving", "serve"]
        if self.model_dir is not None:
            cmd.append(str(self.model_dir))
        self._log = open(self.log_path, "wb")
        self._stdout = open(self.stdout_path, "wb") if self.stdout_path is not None else None
        stdout = self._stdout or self._log
        stderr = self._log if self._stdout is not None else subprocess.STDOUT
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=stdout, stderr=stderr, cwd=REPO)
        try:
            if self.expect_ready:
                self.wait_ready(self.ready_timeout)
            else:
                self.wait_listening(self.ready_timeout)
        except BaseException:  # never leave a server behind that nobody will stop
            self.stop()
            raise

    def wait_listening(self, timeout: float) -> None:
        """Wait until the port accepts connections (any /ping status)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            try:
                self.request("GET", "/ping", timeout=2)
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"server did not listen within {timeout}s\n{self.log()}")

    def wait_ready(self, timeout: float) -> None:
        """Wait until /ping answers 200; fail at once when it says the model failed to load."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            try:
                reply = self.request("GET", "/ping", timeout=2)
            except OSError:
                reply = None
            if reply is not None and reply.status == 200:
                return
            if reply is not None and b"failed to load" in reply.body:  # it will not get better
                raise RuntimeError(f"the model failed to load: {reply.body.decode()}\n{self.log()}")
            time.sleep(0.1)
        raise TimeoutError(f"server not ready within {timeout}s\n{self.log()}")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._stdout is not None:
            self._stdout.close()
        return self.proc.returncode

    def log(self) -> str:
        """Everything the server printed so far (its stderr only, with ``split_stdout``)."""
        return self.log_path.read_text(errors="replace")

    def stdout(self) -> str:
        """What the server wrote to its stdout (``split_stdout``)."""
        return self.stdout_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60.0, chunked: bool = False) -> Reply:  # fmt: skip
        """One HTTP request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if chunked:
                conn.putrequest(method, path)
                for key, value in (headers or {}).items():
                    conn.putheader(key, value)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                step = 1000
                for i in range(0, len(body or b""), step):
                    piece = body[i : i + step]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (e.g. 413) and closed before reading the whole body
        try:
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def post_json(self, payload, path: str = "/invocations", headers: dict | None = None, **kw) -> Reply:
        """POST a JSON body."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", path, json.dumps(payload).encode(), hdrs, **kw)
