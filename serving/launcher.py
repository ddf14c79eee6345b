"""``onebox serve``: start the model hosts and the frontends, stop them cleanly on SIGTERM.

Process tree::

    launcher (PID 1 in the container)
      model host per device     python -m serving host ...     (owns models, batchers)
      frontend master           python -m serving frontend ... (gunicorn; forks W workers)

SIGTERM: the frontends stop accepting and finish in-flight requests (graceful timeout), then the
hosts drain and exit, then the launcher exits 0.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from handlers.base import DetectionError
from handlers.registry import detect
from serving.errors import ConfigError
from serving.host.devices import nvidia_gpus
from serving.host.model_config import load_model_config
from serving.host.supervisor import HostSpec, Supervisor
from serving.ipc.directory import write_hosts_file
from serving.metrics.exposition import prepare_directory
from serving.settings import Settings, environment_with
from serving.types import Artifact

log = logging.getLogger("onebox")

DEFAULT_MODEL = "model"


def plan_hosts(settings: Settings, model_dir: Path | None, run_dir: Path) -> list[HostSpec]:
    """One host per usable GPU when the model can run on CUDA, else one CPU host.

    ``ONEBOX_HOSTS_PER_DEVICE`` > 1 starts that many hosts per device, each with its own copy of
    the model and its own batcher: one host process's Python caps how many requests it can take
    in per second (benchmarks/RESULTS.md), and several can keep one GPU fed.
    """
    artifact = _probe(settings, model_dir)
    wants_cpu = settings.device == "cpu"
    if model_dir is not None and (model_dir / "onebox.toml").is_file():
        wants_cpu = wants_cpu or load_model_config(model_dir, settings.model_defaults).device == "cpu"
    gpus = [] if wants_cpu else nvidia_gpus(settings.cuda_visible_devices)
    if settings.device == "cuda" and not gpus:
        raise ConfigError("ONEBOX_DEVICE=cuda, but no NVIDIA GPU is visible (NVML found none)")
    if gpus and (artifact is None or "cuda" in artifact.devices):
        devices = [(f"cuda{gpu}", "cuda:0", {"CUDA_VISIBLE_DEVICES": str(gpu)}) for gpu in gpus]
    else:
        devices = [("cpu", "cpu", {"CUDA_VISIBLE_DEVICES": ""} if gpus else {})]
    count = settings.hosts_per_device
    return [
        HostSpec(name, device, str(run_dir / f"host-{name}.sock"), env, label=base)
        for base, device, env in devices
        for name in ([base] if count == 1 else [f"{base}-{i}" for i in range(count)])
    ]


def _probe(settings: Settings, model_dir: Path | None) -> Artifact | None:
    if model_dir is None or not model_dir.is_dir():
        return None
    try:
        return detect(model_dir, program=settings.program, model_file=settings.model_file)
    except DetectionError:
        return None  # the host reports the problem in its log and /ping stays 503


def _serving(settings: Settings, model_dir: Path | None) -> str:
    if settings.multi_model:
        return f"multi-model endpoint, models under {settings.models_dir} (POST /models)"
    return f"model: {model_dir or '(none)'}"


def serve(settings: Settings, model_dir: Path | None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code."""
    run_dir = settings.run_dir or Path(tempfile.mkdtemp(prefix="onebox-"))
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    specs = plan_hosts(settings, model_dir, run_dir)
    models = [] if model_dir is None else [(DEFAULT_MODEL, str(model_dir))]
    write_hosts_file(run_dir, [{"name": s.name, "device": s.device, "socket": s.socket} for s in specs])
    # every process writes its Prometheus metrics there (serving.metrics); what an earlier run
    # left would be added to this one's
    metrics_dir = settings.metrics_dir or run_dir / "metrics"
    prepare_directory(metrics_dir)
    metrics_env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    for spec in specs:
        spec.env = {**spec.env, **metrics_env}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    supervisor = Supervisor(specs, models, metrics_dir=metrics_dir)
    supervisor.start()
    frontend = subprocess.Popen(
        [sys.executable, "-m", "serving", "frontend", "--run-dir", str(run_dir)],
        env=environment_with(metrics_env),
    )
    each = (
        f"x {settings.threads} threads"
        if settings.worker_class == "gthread"
        else f"({settings.worker_class})"
    )
    print(
        f"onebox: listening on http://{settings.bind_host}:{settings.port} with {settings.workers} frontends "
        f"{each}; model hosts: {', '.join(s.name for s in specs)}; {_serving(settings, model_dir)}",
        flush=True,
    )
    while not stop.wait(0.2):
        if frontend.poll() is not None:
            log.error("the frontend exited with %s; stopping", frontend.returncode)
            supervisor.stop()
            return 1
    # graceful stop: frontends first, so in-flight requests still reach their host
    frontend.send_signal(signal.SIGTERM)
    try:
        frontend.wait(settings.graceful_timeout_s + 2)
    except subprocess.TimeoutExpired:
        frontend.kill()
        frontend.wait()
    supervisor.stop(timeout=3.0)
    return 0
