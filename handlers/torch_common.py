"""What the three torch handlers share: device placement, precision, staging, CUDA graphs, OOM.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

import numpy as np

from serving.errors import BadRequest, ConfigError, InsufficientMemory
from serving.types import Device, ModelConfig, Tensors

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# torch.export serialises ScalarType as integers (torch/_export/serde/schema.py).
EXPORT_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}


def torch_device(device: Device):
    """The torch.device for a host device (``cpu`` or ``cuda:i``); refuses anything else."""
    import torch

    if device.kind == "cpu":
        return torch.device("cpu")
    if device.kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device.name} requested but this torch build sees no CUDA device")
        return torch.device("cuda", device.index or 0)
    raise ConfigError(f"torch handlers run on cpu or cuda, not {device.name}")


def compute_dtype(config: ModelConfig):
    """The torch dtype floating inputs (and the model) are cast to, from ``config.precision``."""
    import torch

    name = PRECISIONS.get(config.precision or "fp32")
    if name is None:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, not {config.precision!r}")
    return getattr(torch, name)


def output_names(count: int) -> list[str]:
    """Names given to unnamed outputs: ``output`` for one, ``output_0..n`` for several."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def flatten_outputs(out) -> list:
    """A model's result as a flat list of tensors (tensor, tuple/list, or dict values in order)."""
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, list | tuple):
        return [t for item in out for t in flatten_outputs(item)]
    return [out]


def _names_for(out) -> list[str]:
    if isinstance(out, dict):
        return [str(k) for k in out]
    return output_names(len(flatten_outputs(out)))


class _Lane:
    """What one batch in flight owns on a GPU: a stream, pinned staging buffers, captured graphs.

    A lane is used by one batch at a time, so its pinned buffers are never overwritten while a
    non-blocking copy still reads them, and its graphs' static buffers never hold two batches.
    """

    __slots__ = ("stream", "staging", "graphs", "pool", "done")

    def __init__(self, stream, pool, done):
        self.stream = stream  # None: the device's current stream (one lane, the old behaviour)
        self.staging: dict[tuple, object] = {}
        self.graphs: dict[tuple, tuple] = {}
        self.pool = pool  # the memory pool this lane's graphs share (they never replay at once)
        self.done = done  # a blocking-sync CUDA event: waiting on it sleeps instead of spinning


class TorchRunner:
    """Runs a torch callable on one device: numpy in, float32/native numpy out.

    On CUDA, inputs go through pinned staging buffers with non-blocking copies and one
    synchronisation per batch (see :meth:`_wait`); with ``config.cuda_graphs`` each batch size in ``graph_sizes``
    is captured once and replayed. A CUDA out-of-memory error becomes ``InsufficientMemory``.

    ``config.concurrent_batches`` batches may run at once (the batcher's worker threads): on
    CUDA each takes a lane of its own (stream, staging, graphs), so one batch's host-side work
    (copies in, answers out) overlaps another's device compute in the same process.
    """

    def __init__(
        self,
        fn: Callable,
        device: Device,
        config: ModelConfig,
        input_names: Sequence[str],
        graph_sizes: Sequence[int] = (),
        cast_inputs: bool = True,
    ):
        import torch

        self.fn = fn
        self.device = torch_device(device)
        self.dtype = compute_dtype(config)
        self.cast_inputs = cast_inputs
        self.input_names = list(input_names)
        self.cuda = self.device.type == "cuda"
        # intra-op threads: what onebox.toml asks for; on a GPU host one, because the host's
        # torch work there is copies and an idle OpenMP worker spins: with 2 threads the H100
        # host burned 1.8 cores at concurrency 1, with 1 thread 0.8, at the same img/s
        # (benchmarks/RESULTS.md)
        threads = config.threads or (1 if self.cuda else None)
        if threads:
            torch.set_num_threads(threads)
        self.graph_sizes = set(graph_sizes) if (config.cuda_graphs and self.cuda) else set()
        # batches this runner takes at once; the batcher runs as many worker threads
        self.concurrency = config.concurrent_batches or 1
        self.sync = config.cuda_sync
        self._lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for _ in range(self.concurrency if self.cuda else 0):
            stream = torch.cuda.Stream(self.device) if self.concurrency > 1 else None
            done = torch.cuda.Event(blocking=True)
            self._lanes.put(_Lane(stream, torch.cuda.graph_pool_handle(), done))
        self._captured: set[tuple] = set()  # shapes captured in every lane
        self._capture_lock = threading.Lock()

    def __call__(self, inputs: Tensors) -> Tensors:
        """Run one batch; outputs are named by :func:`output_names` unless the model returns a dict."""
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BadRequest(f"missing input(s) {missing}; the model takes {self.input_names}")
        arrays = [np.ascontiguousarray(inputs[n]) for n in self.input_names]
        with torch.inference_mode():
            try:
                if not self.cuda:
                    out = self.fn(*[self._cast(torch.from_numpy(a)) for a in arrays])
                    return self._to_host(flatten_outputs(out), _names_for(out))
                return self._run_cuda(arrays)
            except torch.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                raise InsufficientMemory(
                    f"out of device memory running a batch on {self.device}: {str(exc).splitlines()[0]}"
                ) from None

    def _run_cuda(self, arrays: list[np.ndarray]) -> Tensors:
        import contextlib

        import torch

        key = tuple((a.shape, a.dtype.str) for a in arrays)
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        graphed = bool(arrays) and arrays[0].ndim > 0 and rows in self.graph_sizes
        if graphed and key not in self._captured:
            self._capture_everywhere(key, arrays)
        lane = self._lanes.get()
        try:
            with torch.cuda.stream(lane.stream) if lane.stream is not None else contextlib.nullcontext():
                if graphed:
                    static_in, static_out, graph, names = lane.graphs[key]
                    for i, a in enumerate(arrays):  # pinned staging straight into the captured input
                        static_in[i].copy_(self._staged(lane, a, i), non_blocking=True)
                    graph.replay()
                    return self._to_host(static_out, names, lane, rows)
                out = self.fn(*[self._to_device(lane, a, i) for i, a in enumerate(arrays)])
                return self._to_host(flatten_outputs(out), _names_for(out), lane, rows)
        finally:
            self._lanes.put(lane)

    def _capture_everywhere(self, key: tuple, arrays: list[np.ndarray]) -> None:
        """Capture a graph for these shapes in every lane, while no lane runs a batch."""
        with self._capture_lock:
            if key in self._captured:
                return
            lanes = [self._lanes.get() for _ in range(self.concurrency)]  # waits for batches in flight
            try:
                for lane in lanes:
                    if key not in lane.graphs:
                        lane.graphs[key] = self._capture(
                            lane, [self._to_device(lane, a, i) for i, a in enumerate(arrays)]
                        )
                self._captured.add(key)
            finally:
                for lane in lanes:
                    self._lanes.put(lane)

    def _staged(self, lane: _Lane, array: np.ndarray, slot: int):
        """``array`` copied into the lane's pinned host buffer for this slot, shape and dtype."""
        import torch

        tensor = torch.from_numpy(array)
        key = (slot, array.shape, array.dtype.str)
        buf = lane.staging.get(key)
        if buf is None:
            buf = lane.staging[key] = torch.empty(array.shape, dtype=tensor.dtype, pin_memory=True)
        buf.copy_(tensor)
        return buf

    def _to_device(self, lane: _Lane, array: np.ndarray, slot: int):
        return self._cast(self._staged(lane, array, slot).to(self.device, non_blocking=True))

    def _cast(self, tensor):
        """Floating inputs in the model's precision (unless the handler casts them itself)."""
        if self.cast_inputs and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor

    def _to_host(self, tensors: list, names: list[str], lane: _Lane | None = None, rows: int = 1) -> Tensors:
        """Outputs copied to numpy; on CUDA (``lane`` given) after waiting for the batch of ``rows``."""
        import torch

        host = [t.to("cpu", non_blocking=self.cuda) for t in tensors]
        if lane is not None:
            self._wait(lane, rows)
        out = {}
        for name, t in zip(names, host, strict=True):
            if t.is_floating_point() and t.dtype != torch.float32:
                t = t.float()
            out[name] = t.numpy().copy() if self.cuda else t.numpy()
        return out

    def _wait(self, lane: _Lane, rows: int) -> None:
        """Wait for the lane's stream: spinning on it, or sleeping on a blocking-sync event.

        CUDA's default wait spins a core for the whole batch (the driver spins while a process
        has fewer contexts than the machine has CPUs), and with several hosts those spinning
        waits took the cores the frontends needed (benchmarks/RESULTS.md). A blocking-sync
        event sleeps, at the price of a wake-up. ``auto`` spins for a batch of one row, where
        the wake-up would be added to every request of an idle server, and sleeps otherwise.
        """
        import torch

        stream = torch.cuda.current_stream(self.device)  # the lane's stream
        if self.sync == "spin" or (self.sync == "auto" and rows <= 1):
            stream.synchronize()
            return
        lane.done.record(stream)
        lane.done.synchronize()

    def _capture(self, lane: _Lane, static_in: list):
        """Warm up on a side stream, then capture one CUDA graph for these input shapes."""
        graph, out = capture_graph(self.fn, static_in, self.device, pool=lane.pool)
        log.info("captured a CUDA graph for input shapes %s", [tuple(t.shape) for t in static_in])
        return static_in, flatten_outputs(out), graph, _names_for(out)


def capture_graph(fn: Callable, static_in: list, device, pool=None) -> tuple:
    """``(graph, outputs)``: ``fn(*static_in)`` warmed up on a side stream, then captured once.

    Replaying the graph reruns ``fn`` on whatever ``static_in`` then holds, into ``outputs``.
    ``pool``: share another graph's memory pool (safe for graphs never replayed at once whose
    outputs are read before the next replay: a later replay may overwrite an earlier one's).
    """
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*static_in)
    return graph, out


def declared_specs(config: ModelConfig, key: str = "inputs"):
    """TensorSpecs declared in onebox.toml (``[extra] inputs = [{name, dtype, shape}]``), or None."""
    from serving.types import TensorSpec

    items = config.extra.get(key)
    if not items:
        return None
    try:
        return tuple(
            TensorSpec(
                str(i["name"]),
                np.dtype(i.get("dtype", "float32")).name,
                tuple(int(d) for d in i.get("shape", (-1,))),
            )
            for i in items
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"extra.{key} must be a list of {{name, dtype, shape}} tables: {exc}") from None


def outputs_from_sample(runner: TorchRunner, signature) -> tuple:
    """Output specs found by running one sample batch (only when every input shape is known)."""
    from handlers.base import sample_inputs
    from serving.types import TensorSpec

    size = signature.batch_sizes[0] if signature.batch_sizes else 1
    sample = sample_inputs(signature, size, np.random.default_rng(0))
    if sample is None:
        return ()
    out = runner(sample)
    return tuple(
        TensorSpec(name, a.dtype.name, (-1, *a.shape[1:]) if a.ndim else ()) for name, a in out.items()
    )


def release_cuda_memory() -> None:
    """Return cached CUDA blocks to the driver after a model is dropped."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_batch(signature, inputs: Tensors) -> None:
    """Refuse a batch the artifact was not compiled for (AOTI would run it silently, wrongly)."""
    from serving.types import BatchMode

    sizes = {a.shape[0] for a in inputs.values() if a.ndim}
    if signature.batch is BatchMode.FIXED and not sizes <= set(signature.batch_sizes):
        raise BadRequest(
            f"batch size {sorted(sizes)} not accepted: this model was compiled for batch sizes "
            f"{list(signature.batch_sizes)}"
        )
    if signature.max_batch is not None and any(s > signature.max_batch for s in sizes):
        raise BadRequest(f"batch size {max(sizes)} exceeds this model's maximum {signature.max_batch}")
    for spec in signature.inputs:
        array = inputs.get(spec.name)
        if array is None or len(spec.shape) < 2:
            continue
        if array.ndim != len(spec.shape) or any(
            d not in (-1, a) for d, a in zip(spec.shape[1:], array.shape[1:], strict=True)
        ):
            raise BadRequest(
                f"input {spec.name!r} has shape {list(array.shape)}, expected {list(spec.shape)}"
            )
