"""Start one model host process per device and restart any that dies.

Each host is ``python -m serving host`` with its device fixed in its environment before any
framework is imported (``CUDA_VISIBLE_DEVICES`` for a GPU), listening on a Unix socket in the
private run directory.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.metrics.exposition import mark_dead
from serving.settings import environment_with

log = logging.getLogger("onebox.supervisor")

#: next to a host's socket: the models it was told to load (a multi-model endpoint's), which it
#: loads again when it is restarted after a crash (serving.host.process)
MODELS_SUFFIX = ".models.json"


@dataclass
class HostSpec:
    """One host process: its name, the device it sees, its socket, extra environment."""

    name: str
    device: str  # as the host sees it: "cpu" or "cuda:0"
    socket: str
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""  # its device in the metrics (cuda0, cpu); several hosts of one device share it
    process: subprocess.Popen | None = None
    restarts: int = 0


class Supervisor:
    """Keeps the host processes running."""

    def __init__(self, specs: list[HostSpec], models: list[tuple[str, str]], poll_s: float = 0.2,
                 metrics_dir: Path | None = None):  # fmt: skip
        """``metrics_dir``: the hosts' Prometheus multiprocess directory, where a host that died is
        marked dead (serving.metrics.exposition)."""
        self.specs = specs
        self.metrics_dir = metrics_dir
        self.models = models
        self.poll_s = poll_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="host-supervisor", daemon=True)

    def start(self) -> None:
        """Spawn every host and start watching them; what hosts of an earlier start held is
        forgotten (a run directory may outlive its server)."""
        for spec in self.specs:
            Path(spec.socket + MODELS_SUFFIX).unlink(missing_ok=True)
            self._spawn(spec)
        self._thread.start()

    def _spawn(self, spec: HostSpec) -> None:
        cmd = [sys.executable, "-m", "serving", "host", "--socket", spec.socket, "--device", spec.device]
        for name, path in self.models:
            cmd += ["--model", f"{name}={path}"]
        if spec.label:
            cmd += ["--label", spec.label]
        if spec.restarts:
            cmd.append("--restarted")
        spec.process = subprocess.Popen(cmd, env=environment_with(spec.env))
        log.info("started model host %s (pid %d) on %s", spec.name, spec.process.pid, spec.device)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            for spec in self.specs:
                if spec.process is None or spec.process.poll() is None or self._stopping.is_set():
                    continue
                code = spec.process.returncode
                mark_dead(spec.process.pid, self.metrics_dir)
                spec.restarts += 1
                delay = min(0.5 * 2 ** min(spec.restarts - 1, 5), 10.0)
                log.error(
                    "model host %s exited with %s; restart %d in %.1fs", spec.name, code, spec.restarts, delay
                )
                if self._stopping.wait(delay):
                    return
                self._spawn(spec)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every host, wait up to ``timeout``, then SIGKILL what is left."""
        self._stopping.set()
        procs = [s.process for s in self.specs if s.process and s.process.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
