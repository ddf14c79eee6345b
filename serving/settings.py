"""Every knob of the server, read once from the environment and validated.

``SAGEMAKER_*`` variables mean what SageMaker and its inference toolkit define; ``ONEBOX_*`` are
ours. A bad value raises ``ConfigError`` naming the variable, the value and what is allowed; the
launcher turns that into one line on stderr and exit code 2. This is the only module that reads
``os.environ``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from serving.errors import ConfigError
from serving.types import ModelConfig

T = TypeVar("T")
MB = 1024 * 1024
_LOG_LEVELS = {"CRITICAL": 50, "ERROR": 40, "WARNING": 30, "WARN": 30, "INFO": 20, "DEBUG": 10, "NOTSET": 0}
_STRATEGIES = {"SINGLE_RECORD": "SINGLE_RECORD", "SINGLERECORD": "SINGLE_RECORD",
               "MULTI_RECORD": "MULTI_RECORD", "MULTIRECORD": "MULTI_RECORD"}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """The validated server configuration; build it with :meth:`from_env`."""

    port: int = 8080
    bind_host: str = "0.0.0.0"
    safe_port_range: tuple[int, int] | None = None
    workers: int = 2  # gunicorn frontend processes
    threads: int = 32  # threads per frontend; high so /ping never queues behind inference
    # gunicorn worker of the frontends: loop (serving.http.loop), gthread, or gevent (one thread)
    worker_class: str = "loop"
    # loop worker: requests ready together go to a host as one call (serving.http.gather), and
    # past this many of a worker's calls in flight at every host new ones wait to go together
    frontend_gather: bool = True
    frontend_max_calls: int = 0  # 0: no limit (what is ready in one turn of the loop goes together)
    frontend_timings: Path | None = None  # loop workers write their time sums here (serving.http.timings)
    timeout_s: float = 60.0  # default per-request deadline
    graceful_timeout_s: float = 25.0  # SIGTERM -> in-flight requests get this long to finish
    max_payload_bytes: int | None = 6 * MB  # None: no limit (batch transform MaxPayloadInMB=0)
    default_accept: str = "application/json"
    program: str = "inference.py"
    base_dir: Path = Path("/opt/ml")
    log_level: int = 20
    multi_model: bool = False
    # multi-model endpoints: the files of the models one host holds may add up to this (None:
    # no cap); a load past it answers 507, and SageMaker unloads a model to make room
    model_memory_bytes: int | None = None
    model_load_timeout_s: float = 350.0  # SageMaker waits 360 s for a load or an unload
    batch_transform: bool = False
    batch_strategy: str = "MULTI_RECORD"
    max_concurrent_transforms: int = 1
    run_dir: Path | None = None  # private directory for the IPC sockets (default: a fresh temp dir)
    model_file: str | None = None  # choose one artifact when a model directory holds several
    device: str = "auto"  # auto | cpu | cuda
    hosts_per_device: int = 1  # model host processes per device, each with its own copy and batcher
    cuda_visible_devices: str | None = None
    install_requirements: bool = True
    ipc_shm_min_bytes: int = 64 * 1024  # request tensors from this size go by shared memory (0: never)
    # a CUDA host registers the frontends' shared regions, and copies requests from them to the
    # device (handlers.host_memory)
    ipc_pin: bool = True
    # how a CUDA host queues a batch's copies, graph launch and events: "driver" (through the
    # CUDA driver, the GIL kept) or "torch" (which hands the GIL over per call) (handlers.cuda_driver)
    cuda_copy: str = "driver"
    # frontends and hosts freeze what they hold once set up, so the collector stops scanning it
    # (serving.heap)
    gc_freeze: bool = True
    # Prometheus multiprocess directory every process writes its metrics into (serving.metrics);
    # None: the launcher uses <run_dir>/metrics. Wiped (its *.db files) at every start.
    metrics_dir: Path | None = None
    # CloudWatch Embedded Metric Format lines on stdout (serving.metrics.emf): per frontend worker
    # and model, one line per interval; interval 0 = one line per invocation (contract case 61)
    cloudwatch_emf: bool = False
    cloudwatch_emf_interval_s: float = 60.0
    cloudwatch_emf_namespace: str = "onebox"
    model_defaults: ModelConfig = field(default_factory=ModelConfig)

    @property
    def model_dir(self) -> Path:
        """Where SageMaker extracts the single model (``$SAGEMAKER_BASE_DIR/model``)."""
        return self.base_dir / "model"

    @property
    def models_dir(self) -> Path:
        """Where SageMaker extracts a multi-model endpoint's models (``$SAGEMAKER_BASE_DIR/models``)."""
        return self.base_dir / "models"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raises ConfigError on the first bad one."""
        env = _Env(os.environ if environ is None else environ)
        timeout = env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", _positive_float, None)
        if timeout is None:  # the older variable; the toolkit documents it as seconds
            timeout = env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT", _positive_float, 60.0)
        batch = env.get("SAGEMAKER_BATCH", _bool, False)
        defaults = ModelConfig(
            max_batch_size=env.get("ONEBOX_MAX_BATCH_SIZE", _positive_int, 1),
            max_delay_ms=env.get("ONEBOX_MAX_DELAY_MS", _non_negative_float, 0.0),
            batch_sizes=env.get("ONEBOX_BATCH_SIZES", _int_list, ()),
            max_queue=env.get("ONEBOX_MAX_QUEUE", _positive_int, 1024),
            timeout_s=timeout,
            precision=env.get("ONEBOX_PRECISION", _choice("fp32", "fp16", "bf16"), None),
            warmup=env.get("ONEBOX_WARMUP", _bool, True),
            cuda_graphs=env.get("ONEBOX_CUDA_GRAPHS", _bool, False),
            threads=env.get("ONEBOX_INTRA_OP_THREADS", _positive_int, None),
            concurrent_batches=env.get("ONEBOX_CONCURRENT_BATCHES", _positive_int, None),
        )
        settings = cls(
            port=env.get("SAGEMAKER_BIND_TO_PORT", _port, 8080),
            bind_host=env.get("ONEBOX_BIND_HOST", str, "0.0.0.0"),
            safe_port_range=env.get("SAGEMAKER_SAFE_PORT_RANGE", _port_range, None),
            workers=env.get("SAGEMAKER_MODEL_SERVER_WORKERS", _positive_int, min(os.cpu_count() or 1, 4)),
            threads=env.get("ONEBOX_FRONTEND_THREADS", _positive_int, 32),
            worker_class=env.get(
                "ONEBOX_FRONTEND_WORKER_CLASS", _choice("loop", "gthread", "gevent"), "loop"
            ),
            timeout_s=timeout,
            graceful_timeout_s=env.get("ONEBOX_GRACEFUL_TIMEOUT", _positive_float, 25.0),
            max_payload_bytes=env.get("SAGEMAKER_MAX_PAYLOAD_IN_MB", _payload_mb, 6 * MB),
            default_accept=env.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", _media_type, "application/json"),
            program=env.get("SAGEMAKER_PROGRAM", _program, "inference.py"),
            base_dir=env.get("SAGEMAKER_BASE_DIR", Path, Path("/opt/ml")),
            log_level=env.get("SAGEMAKER_CONTAINER_LOG_LEVEL", _log_level, 20),
            multi_model=env.get("SAGEMAKER_MULTI_MODEL", _bool, False),
            model_memory_bytes=env.get("ONEBOX_MODEL_MEMORY_MB", _payload_mb, None),
            model_load_timeout_s=env.get("ONEBOX_MODEL_LOAD_TIMEOUT", _positive_float, 350.0),
            batch_transform=batch,
            batch_strategy=env.get("SAGEMAKER_BATCH_STRATEGY", _strategy, "MULTI_RECORD"),
            max_concurrent_transforms=env.get("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", _positive_int, 1),
            run_dir=env.get("ONEBOX_RUN_DIR", Path, None),
            model_file=env.get("ONEBOX_MODEL_FILE", str, None),
            device=env.get("ONEBOX_DEVICE", _choice("auto", "cpu", "cuda"), "auto"),
            hosts_per_device=env.get("ONEBOX_HOSTS_PER_DEVICE", _positive_int, 1),
            cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES", str, None),
            install_requirements=env.get("ONEBOX_INSTALL_REQUIREMENTS", _bool, True),
            ipc_shm_min_bytes=env.get("ONEBOX_IPC_SHM_MIN_BYTES", _non_negative_int, 64 * 1024),
            ipc_pin=env.get("ONEBOX_IPC_PIN", _bool, True),
            cuda_copy=env.get("ONEBOX_CUDA_COPY", _choice("driver", "torch"), "driver"),
            gc_freeze=env.get("ONEBOX_GC_FREEZE", _bool, True),
            frontend_gather=env.get("ONEBOX_FRONTEND_GATHER", _bool, True),
            frontend_max_calls=env.get("ONEBOX_FRONTEND_MAX_CALLS", _non_negative_int, 0),
            frontend_timings=env.get("ONEBOX_FRONTEND_TIMINGS", Path, None),
            metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR", Path, None),
            cloudwatch_emf=env.get("ONEBOX_CLOUDWATCH_EMF", _bool, False),
            cloudwatch_emf_interval_s=env.get("ONEBOX_CLOUDWATCH_EMF_INTERVAL", _non_negative_float, 60.0),
            cloudwatch_emf_namespace=env.get("ONEBOX_CLOUDWATCH_NAMESPACE", _namespace, "onebox"),
            model_defaults=defaults,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check settings against each other."""
        if self.safe_port_range:
            low, high = self.safe_port_range
            if low > high:
                raise ConfigError(
                    f"SAGEMAKER_SAFE_PORT_RANGE='{low}-{high}': the low port is above the high one"
                )
        if self.worker_class == "gevent" and importlib.util.find_spec("gevent") is None:
            raise ConfigError(
                "ONEBOX_FRONTEND_WORKER_CLASS=gevent needs the gevent package: pip install 'onebox[gevent]'"
            )
        if self.batch_transform and self.max_payload_bytes and self.max_payload_bytes > 100 * MB:
            raise ConfigError("SAGEMAKER_MAX_PAYLOAD_IN_MB: batch transform allows at most 100")


class _Env:
    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be zero or positive")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep:
        raise ValueError("must be 'LOW-HIGH', e.g. '8081-9000'")
    return _port(low), _port(high)


def _payload_mb(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 (no limit) or a positive number of megabytes")
    return None if value == 0 else value * MB


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _media_type(text: str) -> str:
    media = text.split(";")[0].strip().lower()
    if "/" not in media:
        raise ValueError("must be a media type such as application/json")
    return media


def _program(text: str) -> str:
    if "/" in text or not text:
        raise ValueError("must be a module file name inside code/, e.g. inference.py")
    return text if text.endswith(".py") else f"{text}.py"


def _log_level(text: str) -> int:
    if text.upper() in _LOG_LEVELS:
        return _LOG_LEVELS[text.upper()]
    return int(text)


def _strategy(text: str) -> str:
    key = text.upper()
    if key not in _STRATEGIES:
        raise ValueError("must be SINGLE_RECORD, MULTI_RECORD, SingleRecord or MultiRecord")
    return _STRATEGIES[key]


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def _namespace(text: str) -> str:
    # CloudWatch: 1-255 characters, no ':' as the first one; ASCII without control characters
    if not 1 <= len(text) <= 255 or text.startswith(":") or not text.isascii() or not text.isprintable():
        raise ValueError("must be 1-255 printable ASCII characters, not starting with ':'")
    return text


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text.lower()

    return parse


def environment_with(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus ``extra``, for a child process (a model host)."""
    return {**os.environ, **extra}
