"""Plain data types shared by the frontends, the IPC layer, the hosts and the handlers.

Only the standard library and numpy: these cross every process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

Tensors = dict[str, np.ndarray]


class Rows:
    """One batch input not yet joined: the rows of ``parts`` end to end, padded to ``size`` rows
    by repeating the last row (as ``serving.batching.shaping.concatenate`` would join them).

    A batcher hands these to a handler that takes them (``Handler.takes_rows``): a CUDA runner
    then copies each request's rows to the device from where they arrived (a frontend's shared
    region, registered with CUDA: handlers.host_memory) instead of joining them on the host
    first. ``np.asarray(rows)`` joins them, so code that wants an array gets one.
    """

    __slots__ = ("parts", "rows", "shape", "dtype")

    def __init__(self, parts: list[np.ndarray], size: int | None = None):
        if not parts:
            raise ValueError("Rows needs at least one part")
        self.parts = parts
        self.rows = sum(len(p) for p in parts)
        size = self.rows if size is None else size
        if size < self.rows:
            raise ValueError(f"cannot pad {self.rows} rows down to {size}")
        self.shape = (size, *parts[-1].shape[1:])
        self.dtype = np.result_type(*parts)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def join(self, out: np.ndarray | None = None) -> np.ndarray:
        """The joined, padded array: written into ``out`` (C-contiguous, this shape) when given."""
        if out is None:
            out = np.empty(self.shape, self.dtype)
        np.concatenate(self.parts, out=out[: self.rows])
        if self.rows < len(out):
            out[self.rows :] = self.parts[-1][-1:]
        return out

    def astype(self, dtype, copy: bool = True) -> Rows | np.ndarray:
        """Itself when no conversion (or copy) is asked for; else the joined array, converted."""
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self.join().astype(dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        joined = self.join()
        return joined if dtype is None else joined.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"Rows({len(self.parts)} parts, {self.rows} rows, shape={self.shape}, dtype={self.dtype})"


class BatchMode(StrEnum):
    """How an artifact accepts a batch dimension."""

    DYNAMIC = "dynamic"  # any leading size up to max_batch
    FIXED = "fixed"  # only the sizes in Signature.batch_sizes (pad up to one)
    NONE = "none"  # no batch dimension: one request at a time


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype string, shape with -1 for a free dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """What a loaded model accepts and returns, and how it batches."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    batch: BatchMode = BatchMode.DYNAMIC
    batch_sizes: tuple[int, ...] = ()  # the accepted sizes when batch is FIXED
    max_batch: int | None = None  # the largest batch the artifact accepts, if bounded

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "batch": self.batch.value,
            "batch_sizes": list(self.batch_sizes),
            "max_batch": self.max_batch,
        }


@dataclass(frozen=True)
class Artifact:
    """What detection found in a model directory, before anything is loaded."""

    kind: str  # e.g. "torchscript", "torch_export", "onnx", "user_script"
    handler: str  # handler name in handlers.registry
    path: Path  # the artifact file or directory
    model_dir: Path
    packages: tuple[str, ...] = ()  # importable modules needed to load it
    devices: tuple[str, ...] = ("cpu",)  # device types it can run on: cpu, cuda, neuron
    reason: str = ""  # why this kind was chosen, for `onebox detect`
    files: tuple[str, ...] = ()  # the files considered, relative to model_dir
    details: dict = field(default_factory=dict)  # kind-specific facts (opset, device key, ...)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "handler": self.handler,
            "path": str(self.path),
            "model_dir": str(self.model_dir),
            "packages": list(self.packages),
            "devices": list(self.devices),
            "reason": self.reason,
            "files": list(self.files),
            "details": self.details,
        }


@dataclass(frozen=True)
class Device:
    """A device a model host owns: ``cpu``, ``cuda:0``, ``neuron:0-1``."""

    kind: str  # cpu | cuda | neuron
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> Device:
        kind, _, index = text.partition(":")
        return cls(kind, int(index) if index else None)


@dataclass
class RawRequest:
    """A request passed through undecoded to a user script (``inference.py``)."""

    body: bytes
    content_type: str
    accept: str
    custom_attributes: str | None = None


@dataclass
class RawResponse:
    """What a user script answered: bytes, their media type, optional custom attributes."""

    body: bytes
    content_type: str
    custom_attributes: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Per-model settings: ``onebox.toml`` over the server-wide ``ONEBOX_*`` defaults.

    Validated against the handler's signature by the host once the model is loaded.
    """

    max_batch_size: int = 1  # rows per batch; 1 turns batching off
    max_delay_ms: float = 0.0  # 0: dispatch whatever is queued when the device is free
    batch_sizes: tuple[int, ...] = ()  # static sizes to pad up to (empty: from the signature)
    max_queue: int = 1024  # queued rows before 429
    timeout_s: float = 60.0  # default per-request deadline
    batch: bool | None = None  # user scripts: opt in to batching (None: handler default)
    precision: str | None = None  # fp32 | fp16 | bf16 (torch handlers)
    device: str | None = None  # force "cpu" on an accelerated host
    warmup: bool = True  # run every batch size once before ready
    cuda_graphs: bool = False  # capture CUDA graphs for fixed batch sizes
    threads: int | None = None  # intra-op threads for CPU runtimes
    concurrent_batches: int | None = None  # batches in flight at once (None: what the handler suggests)
    cuda_sync: str = "auto"  # how a host thread waits for a CUDA batch: spin | block | auto
    pipeline: bool = True  # answer a batch while the next one runs on the device (CUDA torch handlers)
    pipeline_depth: int = 1  # pipelined: batches launched at once (2: the next waits on the device)
    copy_threads: int | None = None  # threads assembling a batch's rows (None: 1; serving.batching.copying)
    extra: dict = field(default_factory=dict)  # handler-specific keys from onebox.toml
    explicit: frozenset[str] = frozenset()  # keys onebox.toml set (the rest are server-wide defaults)
