"""The model host process: owns the models of one device and answers IPC calls for them.

Started by the launcher as ``python -m serving host --socket PATH --device cpu [--model NAME=DIR]``.
The IPC socket is served before the model loads, so health calls answer "loading" at once.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from serving import heap
from serving.batching import BatchStats
from serving.errors import BadRequest, ConfigError, ServingError
from serving.host.registry import ModelRegistry, State, wait_result
from serving.host.supervisor import MODELS_SUFFIX
from serving.ipc.protocol import decode_tensors, encode_tensors
from serving.ipc.server import IPCServer, Pending
from serving.metrics.hosts import HostMetrics
from serving.settings import Settings
from serving.types import Device, RawRequest, Tensors

log = logging.getLogger("onebox.host")


class Host:
    """Routes IPC messages to the registry."""

    def __init__(
        self, settings: Settings, device: Device, models_file: Path | None = None, label: str | None = None
    ):
        """``models_file``: where the models loaded through the ``load`` op are written down, so
        that this host, restarted after a crash, loads them again (multi-model endpoints);
        ``label``: its device in the metrics (``cuda0``; default the device's name)."""
        self.settings = settings
        self.device = device
        self.metrics = HostMetrics(label or device.name)
        self.models_file = models_file
        self._writing = threading.Lock()
        self.registry = ModelRegistry(settings, device, observe=self._count_batch)
        self.started = time.time()
        # per model: [batches, rows, padding rows, requests]; only the batcher threads write
        self._batch_totals: dict[str, list[int]] = {}
        # per model: batches run at each size, padding included
        self._batch_sizes: dict[str, Counter[int]] = {}
        # per model: seconds summed over batches (queue: over their requests' parts), see batch_stats
        self._batch_times: dict[str, list[float]] = {}
        # per model: calls that said when they were sent, and seconds summed from then to here
        self._arrivals: dict[str, list] = {}
        # the frontends' shared regions registered with CUDA (handlers.host_memory), on a GPU host
        self.pinned = None

    def _count_batch(self, model: str, stats: BatchStats) -> None:
        totals = self._batch_totals.setdefault(model, [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += stats.rows
        totals[2] += stats.padding
        totals[3] += stats.requests
        sizes = self._batch_sizes.get(model)
        if sizes is None:
            sizes = self._batch_sizes[model] = Counter()
        sizes[stats.rows + stats.padding] += 1
        times = self._batch_times.setdefault(model, [0.0, 0.0, 0.0, 0.0])
        times[0] += sum(stats.queue_times)
        times[1] += stats.build_time
        times[2] += stats.launch_time
        times[3] += stats.compute_time
        self.metrics.batch(model, stats.rows, stats.padding, stats.queue_times, stats.compute_time)

    def batch_stats(self) -> dict[str, dict]:
        """Batches, rows, padding rows and requests each model has run since the host started,
        ``sizes``: how many batches ran at each size (padding included; keys are strings), and
        where the time went, in seconds summed since the start: ``queue_s`` (requests' waits from
        arrival to their batch, summed over requests), ``build_s`` (assembling batches),
        ``launch_s`` (a pipelined runner's launches), ``compute_s`` (start in the runner to outputs
        back, launches included), the batcher's ``starved_s`` and ``answer_s``
        (:meth:`Batcher.timings`), and ``arrive_s`` over ``arrivals``: the calls that carried their
        send time (loop frontends), summed from it to their decoding here."""
        keys = ("batches", "rows", "padding", "requests")
        time_keys = ("queue_s", "build_s", "launch_s", "compute_s")
        stats: dict[str, dict] = {}
        # every loaded model, also one that has run nothing yet: its batcher's time counts from
        # its start, so a difference of two readings covers only the time between them
        models = {m.name: m for m in self.registry.models() if m.batcher}
        for name in dict.fromkeys([*self._batch_totals, *models]):
            totals = self._batch_totals.get(name, [0, 0, 0, 0])
            stats[name] = dict(zip(keys, totals, strict=True))
            stats[name].update(zip(time_keys, self._batch_times.get(name, [0.0] * 4), strict=True))
            sizes = self._batch_sizes.get(name, Counter()).copy()
            stats[name]["sizes"] = {str(size): count for size, count in sorted(sizes.items())}
            if name in models:  # not unloaded since
                stats[name].update(models[name].batcher.timings())
            arrivals, arrive_s = self._arrivals.get(name, (0, 0.0))
            stats[name].update(arrivals=arrivals, arrive_s=arrive_s)
        return stats

    def dispatch(self, header: dict, buffers: list) -> tuple[dict, list] | Pending:
        """Answer one IPC message (a model call is answered by the batcher thread, see Pending)."""
        op = header.get("op")
        deadline = self._deadline(header)
        if op == "infer":
            return self._infer(header, buffers, deadline, inline=True)
        if op == "invoke":
            request = RawRequest(
                bytes(buffers[0]) if buffers else b"",
                header.get("content_type") or "",
                header.get("accept") or "",
                header.get("custom_attributes"),
            )
            response = self.registry.invoke(header["model"], request, deadline)
            reply = {"content_type": response.content_type, "custom_attributes": response.custom_attributes}
            return reply, [response.body]
        if op == "describe":
            model = self.registry.get(header["model"])
            return model.describe(), []
        if op == "health":
            models = [m.describe() for m in self.registry.models()]
            ready = bool(models) and all(m["state"] == State.READY.value for m in models)
            return {"ready": ready, "device": self.device.name, "models": models}, []
        if op == "stats":
            reply: dict = {"models": self.batch_stats(), "gc": heap.census()}
            if self.pinned is not None:  # how many frontend regions the device copies from
                reply["pinned"] = {"regions": self.pinned.count, "failures": self.pinned.failures}
            return reply, []
        if op == "load":  # a multi-model endpoint's: a failed load leaves no entry
            model = self._load(header["model"], Path(header["path"]), keep_failure=False)
            self._write_models()
            self._resettle()
            return model.describe(), []
        if op == "unload":
            started = time.perf_counter()
            try:
                self.registry.unload(header["model"])
                self.metrics.unloaded(header["model"], time.perf_counter() - started)
            finally:
                self._write_models()
                self._count_models()
            self._resettle()
            return {}, []
        raise BadRequest(f"unknown IPC operation {op!r}")

    def dispatch_nowait(self, header: dict, buffers: list) -> Pending | None:
        """A model call queued without waiting (the I/O thread's path); None for anything else.

        Also None when the model's own ``timeout_s`` is shorter than the request's deadline:
        the host must answer 504 on time then, which takes a thread waiting on the result.
        """
        if header.get("op") != "infer":
            return None
        deadline = self._deadline(header)
        if self.registry.model_deadline(header["model"], deadline) < deadline:
            return None
        return self._infer(header, buffers, deadline, inline=False)

    def _infer(self, header: dict, buffers: list, deadline: float, inline: bool):
        inputs = decode_tensors(header["inputs"], buffers)
        sent = header.get("sent")
        if isinstance(sent, float):  # a loop frontend's send time: how long the call took to get here
            arrivals = self._arrivals.setdefault(header["model"], [0, 0.0])
            arrivals[0] += 1
            arrivals[1] += time.time() - sent
        future, capped = self.registry.submit(header["model"], inputs, deadline, inline=inline)
        if capped < deadline:  # the model's own timeout_s is shorter: the host must answer 504
            return _outputs_reply(wait_result(future, capped))
        # the frontend's socket timeout turns a late answer into 504 at the same deadline
        return Pending(future, _outputs_reply)

    def _load(self, name: str, path: Path, keep_failure: bool = True):
        """Load ``name`` from ``path`` in the registry, timed in the metrics whatever the outcome."""
        started = time.perf_counter()
        status = 500
        try:
            model = self.registry.load(name, path, keep_failure=keep_failure)
            status = 200
            return model
        except ServingError as exc:
            status = int(exc.status)
            raise
        finally:
            self.metrics.loaded(name, time.perf_counter() - started, status)
            self._count_models()

    def _count_models(self) -> None:
        self.metrics.holding(sum(m.state is State.READY for m in self.registry.models()))

    def sample_metrics(self) -> None:
        """Once a second (the host's sampling thread): CPU, memory, each model's queue depth."""
        self.metrics.sample((m.name, m.batcher.queue_depth()) for m in self.registry.models() if m.batcher)

    def _write_models(self) -> None:
        """Write down the models this host holds now (``models_file``), replacing the file whole."""
        if self.models_file is None:
            return
        with self._writing:
            held = [[m.name, str(m.path)] for m in self.registry.models() if m.state is State.READY]
            tmp = self.models_file.with_name(self.models_file.name + ".tmp")
            tmp.write_text(json.dumps(held))
            tmp.replace(self.models_file)

    def reload_written(self) -> None:
        """Load again what ``models_file`` says this host held before it was restarted."""
        if self.models_file is None or not self.models_file.is_file():
            return
        try:
            held = json.loads(self.models_file.read_text())
        except (OSError, ValueError) as exc:
            log.error("cannot read the models this host held (%s): %s", self.models_file, exc)
            return
        for name, path in held:
            try:
                self._load(name, Path(path), keep_failure=False)
                log.info("model %r loaded again from %s after a restart", name, path)
            except Exception as exc:
                log.error("model %r in %s did not load again after a restart: %s", name, path, exc)
        self._write_models()

    def _resettle(self) -> None:
        """After a model came or went: what it left is collected, what is alive frozen again."""
        if self.settings.gc_freeze:
            heap.resettle()

    def _deadline(self, header: dict) -> float:
        return float(header.get("deadline", time.time() + self.settings.timeout_s))

    def load_at_start(self, name: str, path: Path) -> None:
        """Load the single model; on failure log why and keep running (``/ping`` stays 503)."""
        try:
            model = self._load(name, path)
        except (ServingError, ConfigError) as exc:
            log.error("model %r in %s failed to load: %s", name, path, getattr(exc, "message", exc))
            return
        except Exception:
            log.exception("model %r in %s failed to load", name, path)
            return
        art = model.artifact
        print(
            f"onebox: model {name!r} ready on {self.device.name} in {model.load_seconds:.2f}s: "
            f"kind={art.kind} handler={art.handler} file={art.path.name} "
            f"(serving http://{self.settings.bind_host}:{self.settings.port})",
            flush=True,
        )


def _outputs_reply(outputs: Tensors) -> tuple[dict, list]:
    specs, out = encode_tensors(outputs)
    # "replied": the frontend counts the time the answer takes to reach it (serving.http.timings)
    return {"outputs": specs, "replied": time.time()}, out


def _cuda_copies(host: Host) -> None:
    """How a GPU host's CUDA runners queue a batch's work: through the driver or torch (Settings.cuda_copy)."""
    if host.device.kind == "cuda":
        from handlers.cuda_driver import DRIVER

        DRIVER.enabled = host.settings.cuda_copy == "driver"
        DRIVER.device_index = host.device.index or 0  # whose context a thread without one gets


def _pinning(host: Host):
    """What registers the frontends' shared regions with CUDA on a GPU host (None elsewhere)."""
    if host.device.kind != "cuda" or not host.settings.ipc_pin:
        return None
    from handlers.host_memory import REGIONS

    REGIONS.enable(host.device.index or 0)
    host.pinned = REGIONS
    return REGIONS.pin


def _sample_metrics(host: Host, stop: threading.Event) -> None:
    host._count_models()
    while True:
        try:
            host.sample_metrics()
        except Exception:  # a metric never stops a host
            log.debug("sampling the host's metrics failed", exc_info=True)
        if stop.wait(1.0):
            return


def run_host(
    socket_path: str,
    device: str,
    models: list[tuple[str, str]],
    label: str | None = None,
    restarted: bool = False,
) -> int:
    """Entry point of a host process; returns its exit code. ``label``: its device in the
    metrics; ``restarted``: the supervisor started it again after its predecessor died."""
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s [host] %(name)s: %(message)s"
    )
    # the I/O thread, batcher threads and workers share the GIL: hand it over sooner than the
    # default 5 ms so a woken thread does not queue behind a busy one (batch formation, copies)
    sys.setswitchinterval(0.0005)
    host = Host(settings, Device.parse(device), Path(socket_path + MODELS_SUFFIX), label)
    if restarted:
        host.metrics.restarted()
    _cuda_copies(host)
    server = IPCServer(socket_path, host.dispatch, host.dispatch_nowait, on_region=_pinning(host))
    stop = threading.Event()

    def on_term(signum, frame):  # the launcher stops hosts after the frontends have drained
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    threading.Thread(target=server.serve_forever, name="ipc-accept", daemon=True).start()
    threading.Thread(target=_sample_metrics, args=(host, stop), name="metrics", daemon=True).start()
    for name, path in models:
        host.load_at_start(name, Path(path))
    host.reload_written()
    if settings.gc_freeze:  # what the models brought stops being scanned (serving.heap)
        heap.settle()
    stop.wait()
    server.close()
    host.registry.close()
    return 0
