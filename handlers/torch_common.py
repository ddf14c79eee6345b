"""What the three torch handlers share: device placement, precision, staging, CUDA graphs, OOM.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial

import numpy as np

from handlers.cuda_driver import DRIVER, copy_on_device, host_copy, record_event
from handlers.cuda_graphs import capture_graph, copied_out, launch_handle
from handlers.cuda_inputs import Lane, device_inputs
from serving.errors import BadRequest, ConfigError, InsufficientMemory
from serving.types import Device, ModelConfig, Rows, Tensors

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


class TorchRunner:
    """Runs a torch callable on one device: numpy in, float32/native numpy out.

    On CUDA, inputs are copied to the device on a copy stream (handlers.cuda_inputs: straight from
    registered memory, else through pinned staging buffers), with one synchronisation per batch
    (see :meth:`_wait`); with ``config.cuda_graphs`` each batch size in ``graph_sizes`` is captured
    once and replayed. A CUDA out-of-memory error becomes ``InsufficientMemory``. On CUDA a batch
    may come as :class:`~serving.types.Rows` (``takes_rows``): its parts are copied one by one.

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
        # launch() returns before the GPU is done: the batcher answers a batch while the next runs
        self.pipelined = self.cuda and config.pipeline
        # the batcher may hand a batch over as Rows, its requests' rows not joined
        self.takes_rows = self.cuda
        lanes = [
            Lane(
                torch.cuda.Stream(self.device) if self.concurrency > 1 else None,
                torch.cuda.graph_pool_handle(),
                torch.cuda.Event(blocking=True),
            )
            for _ in range(self.concurrency if self.cuda else 0)
        ]
        # pipelined with one lane: two launches at once (the batcher builds and launches the
        # next batch while one runs). The twin has its own staging and event but the same
        # stream and graphs: stream order runs the two apart on the device (the second copy
        # into a graph's input waits for the first replay and its copy out), and the host never
        # writes staging that a queued copy has still to read.
        self.depth = 2 if self.pipelined and len(lanes) == 1 and config.pipeline_depth > 1 else 1
        if self.depth > 1:
            twin = Lane(None, lanes[0].pool, torch.cuda.Event(blocking=True), spun=torch.cuda.Event())
            twin.graphs = lanes[0].graphs
            lanes[0].spun = torch.cuda.Event()
            lanes.append(twin)
            for lane in lanes:  # each copies its next batch in while the other's runs
                lane.copy_stream, lane.copied = torch.cuda.Stream(self.device), torch.cuda.Event()
        self._lanes: queue.SimpleQueue[Lane] = queue.SimpleQueue()
        for lane in lanes:
            self._lanes.put(lane)
        self._all_lanes = lanes
        self._launches = 0  # with a twin, launch n takes lanes[n % 2] (collected in launch order)
        # the lane the next batch is built in, when launches keep one order: input_buffer hands
        # out its staging buffers
        self._lane = lanes[0] if len(lanes) == 1 else None
        self._captured: set[tuple] = set()  # shapes captured in every lane
        self._capture_lock = threading.Lock()

    def __call__(self, inputs: Tensors) -> Tensors:
        """Run one batch; outputs are named by :func:`output_names` unless the model returns a dict."""
        import torch

        arrays = self._arrays(inputs)
        if self.cuda:
            return self._launch_cuda(arrays)()
        with torch.inference_mode():
            out = self.fn(*[self._cast(torch.from_numpy(a)) for a in arrays])
            return self._to_numpy(flatten_outputs(out), _names_for(out))

    def launch(self, inputs: Tensors) -> Callable[[], Tensors]:
        """Start one batch on the GPU; the returned function waits for it and gives its outputs.

        The batch holds a lane (stream, staging, graphs) until its outputs are collected, so the
        caller must collect every launch, and launch no more than ``concurrency`` ahead of it.
        On the CPU the batch runs here and the function only hands its outputs over.
        """
        if self.cuda:
            return self._launch_cuda(self._arrays(inputs))
        outputs = self(inputs)
        return lambda: outputs

    def _arrays(self, inputs: Tensors) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BadRequest(f"missing input(s) {missing}; the model takes {self.input_names}")
        # Rows stay unjoined on CUDA (their parts are copied one by one); elsewhere they join here
        return [
            inputs[n] if self.cuda and isinstance(inputs[n], Rows) else np.ascontiguousarray(inputs[n])
            for n in self.input_names
        ]

    def _launch_cuda(self, arrays: list[np.ndarray]) -> Callable[[], Tensors]:
        """Copies in, the model (a graph replay or eager) and copies out, queued on a lane's stream."""
        import contextlib

        import torch

        key = tuple((a.shape, a.dtype.str) for a in arrays)
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        graphed = bool(arrays) and arrays[0].ndim > 0 and rows in self.graph_sizes
        with torch.inference_mode(), _out_of_memory(self.device):
            if graphed and key not in self._captured:
                if self.depth > 1 and self._lanes.qsize() < len(self._all_lanes):
                    # a capture waits for every lane, but the batch in flight is collected by
                    # this thread after this launch: run this one eagerly, capture when idle
                    graphed = False
                else:
                    self._capture_everywhere(key, arrays)
            lane = self._lanes.get()
            self._launches += 1
            try:
                with torch.cuda.stream(lane.stream) if lane.stream is not None else contextlib.nullcontext():
                    staging = partial(self._staging, lane)
                    stream = torch.cuda.current_stream(self.device)  # the lane's
                    if graphed:
                        static_in, outs, graph, names, graph_exec = lane.graphs[key]
                        if lane.copy_stream is None:  # straight into the graph's inputs
                            device_inputs(lane, arrays, self.device, staging, into=static_in)
                        else:  # a twin's own buffers, then into the graph's inputs on the device
                            inputs = device_inputs(lane, arrays, self.device, staging)
                            for target, source in zip(static_in, inputs, strict=True):
                                copy_on_device(target, source, stream)
                        if not (graph_exec and DRIVER.launch_graph(graph_exec, stream.cuda_stream)):
                            graph.replay()
                        host = copied_out(lane, key, outs, stream)
                    else:
                        out = self.fn(
                            *[self._cast(t) for t in device_inputs(lane, arrays, self.device, staging)]
                        )
                        outs, names = flatten_outputs(out), _names_for(out)
                        host = [t.to("cpu", non_blocking=True) for t in outs]
                    record_event(lane.done, stream)
                    if lane.spun is not None:
                        record_event(lane.spun, stream)
            except BaseException:
                self._lanes.put(lane)
                raise
        return partial(self._collect, lane, stream, host, names, rows)

    def _collect(self, lane: Lane, stream, host: list, names: list[str], rows: int) -> Tensors:
        """Wait for a launched batch, then its outputs as numpy; the lane is free again after."""
        import torch

        try:
            with torch.inference_mode(), _out_of_memory(self.device):
                self._wait(lane, stream, rows)
                return self._to_numpy(host, names)
        finally:
            self._lanes.put(lane)

    def _capture_everywhere(self, key: tuple, arrays: list[np.ndarray]) -> None:
        """Capture a graph for these shapes in every lane, while no lane runs a batch."""
        with self._capture_lock:
            if key in self._captured:
                return
            lanes = [self._lanes.get() for _ in self._all_lanes]  # waits for batches in flight
            try:
                for lane in lanes:
                    if key not in lane.graphs:
                        lane.graphs[key] = self._capture(
                            lane, [self._to_device(lane, np.asarray(a), i) for i, a in enumerate(arrays)]
                        )
                self._captured.add(key)
            finally:
                for lane in lanes:
                    self._lanes.put(lane)

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The pinned staging buffer of input ``name`` for a batch of this shape, to assemble it in.

        A batch built in it skips the copy into pinned memory (``_staged`` sees it is already
        there). Only with one lane (and its twin, see ``depth``), and only for a caller that
        collects batches in launch order and builds the next one when the lane's last batch is
        collected (the pipelined batcher); None otherwise.
        """
        lane = self._all_lanes[self._launches % 2] if self.depth > 1 else self._lane
        if lane is None or name not in self.input_names:
            return None
        slot = self.input_names.index(name)
        return self._staging(lane, slot, tuple(shape), np.dtype(dtype)).numpy()

    def _staging(self, lane: Lane, slot: int, shape: tuple[int, ...], dtype: np.dtype):
        """The lane's pinned host buffer for this input slot, shape and dtype (made once)."""
        import torch

        key = (slot, shape, dtype.str)
        buf = lane.staging.get(key)
        if buf is None:
            torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
            buf = lane.staging[key] = torch.empty(shape, dtype=torch_dtype, pin_memory=True)
        return buf

    def _staged(self, lane: Lane, array: np.ndarray, slot: int):
        """``array`` in the lane's pinned host buffer for this slot: copied there unless built there."""
        import torch

        buf = self._staging(lane, slot, array.shape, array.dtype)
        if buf.data_ptr() != array.ctypes.data:
            buf.copy_(torch.from_numpy(array))
        return buf

    def _to_device(self, lane: Lane, array: np.ndarray, slot: int):
        return self._cast(self._staged(lane, array, slot).to(self.device, non_blocking=True))

    def _cast(self, tensor):
        """Floating inputs in the model's precision (unless the handler casts them itself)."""
        if self.cast_inputs and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor

    def _to_numpy(self, tensors: list, names: list[str]) -> Tensors:
        """Host tensors as numpy, floating outputs as float32 (copied out of pinned memory on CUDA)."""
        import torch

        out = {}
        for name, t in zip(names, tensors, strict=True):
            if t.is_floating_point() and t.dtype != torch.float32:
                t = t.float()
            out[name] = host_copy(t.numpy()) if self.cuda else t.numpy()
        return out

    def _wait(self, lane: Lane, stream, rows: int) -> None:
        """Wait for the lane's batch: spinning on its stream, or sleeping on a blocking-sync event.

        CUDA's default wait spins a core for the whole batch (the driver spins while a process
        has fewer contexts than the machine has CPUs), and with several hosts those spinning
        waits took the cores the frontends needed (benchmarks/RESULTS.md). A blocking-sync
        event sleeps, at the price of a wake-up. ``auto`` spins for a batch of one row, where
        the wake-up would be added to every request of an idle server, and sleeps otherwise.
        """
        if self.sync == "spin" or (self.sync == "auto" and rows <= 1):
            if lane.spun is not None:  # the stream may hold the next batch (a twin's): not that one
                lane.spun.synchronize()
            else:
                stream.synchronize()
        else:
            lane.done.synchronize()

    def _capture(self, lane: Lane, static_in: list):
        """Warm up on a side stream, then capture one CUDA graph for these input shapes.

        With the driver path on, the graph also casts floating outputs to float32 (what
        ``_to_numpy`` would do on the host, after the batch, while the device waits for the next).
        """
        fn = partial(_float32_outputs, self.fn) if DRIVER.enabled else self.fn
        graph, out = capture_graph(fn, static_in, self.device, pool=lane.pool)
        log.info("captured a CUDA graph for input shapes %s", [tuple(t.shape) for t in static_in])
        return static_in, flatten_outputs(out), graph, _names_for(out), launch_handle(graph, self.device)


@contextmanager
def _out_of_memory(device):
    """A CUDA out-of-memory error as ``InsufficientMemory`` (507), the cache emptied for the next batch."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise InsufficientMemory(
            f"out of device memory running a batch on {device}: {str(exc).splitlines()[0]}"
        ) from None


def _float32_outputs(fn: Callable, *inputs):
    """``fn``'s outputs, floating ones as float32, named as ``fn``'s would be."""
    import torch

    def cast(t):
        return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

    out = fn(*inputs)
    if isinstance(out, dict):
        return {k: cast(v) for k, v in out.items()}
    return [cast(t) for t in flatten_outputs(out)]


def release_cuda_memory() -> None:
    """Return cached CUDA blocks to the driver after a model is dropped."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
