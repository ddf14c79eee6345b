"""The handler interface every runtime implements (DESIGN §4).

A handler module imports its framework only inside its methods, never at module level, so
that probing and detection run on a host that lacks the framework.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np

from serving.errors import ServingError
from serving.types import (
    Artifact,
    BatchMode,
    Device,
    ModelConfig,
    RawRequest,
    RawResponse,
    Signature,
    Tensors,
    TensorSpec,
)


class Handler(abc.ABC):
    """One loaded model on one device."""

    #: name used by the registry and shown by ``onebox detect``
    name: ClassVar[str] = ""
    #: True for handlers that take the raw body (user scripts) instead of decoded tensors
    raw: ClassVar[bool] = False

    signature: Signature = Signature()
    #: batches the loaded model can run at once: the batcher's default ``concurrent_batches``
    concurrent_batches: int = 1
    #: True when :meth:`launch` returns while the device still computes: the batcher then
    #: answers one batch while the next one runs (``pipeline`` in onebox.toml)
    pipelined: bool = False
    #: batches a pipelined handler may have launched at once (the batcher launches the next one
    #: while one runs when this is 2)
    launch_depth: int = 1
    #: True when :meth:`launch` and :meth:`predict` take :class:`~serving.types.Rows` (a batch's
    #: requests not joined): the batcher then leaves the joining, or copying, to the handler
    takes_rows: bool = False

    @classmethod
    def probe(cls, model_dir: Path) -> Artifact | None:
        """This handler's artifact in ``model_dir``, recognised by bytes or zip members only; None if absent.

        The rules live in ``handlers.probes`` (one place, in the order of spec/artifacts.md §11);
        a handler overrides this only when its artifact is found another way (user scripts).
        """
        from handlers.registry import probe_for  # the registry imports handler modules lazily

        return probe_for(model_dir, cls.name)

    @abc.abstractmethod
    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Load the artifact onto ``device`` and set ``self.signature``."""

    def predict(self, inputs: Tensors) -> Tensors:
        """Run one batch: named arrays in, named arrays out, same leading size."""
        raise NotImplementedError(f"{self.name} takes raw requests, not tensors")

    def launch(self, inputs: Tensors) -> Callable[[], Tensors]:
        """Start one batch; the returned function waits for it and gives its outputs.

        By default the batch runs here (``predict``) and the function only hands its outputs over.
        """
        outputs = self.predict(inputs)
        return lambda: outputs

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """An array to assemble the next batch's input ``name`` in (pinned memory, say), or None.

        Asked for by a pipelined batcher only, when no batch of this model is being launched.
        """
        return None

    def invoke_raw(self, request: RawRequest) -> RawResponse:
        """Handle one undecoded request (user scripts only)."""
        raise NotImplementedError(f"{self.name} takes tensors, not raw requests")

    def unload(self) -> None:  # noqa: B027 - optional hook: most runtimes free memory on garbage collection
        """Release the model and its device memory."""

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run each batch size once with random inputs built from the signature."""
        rng = np.random.default_rng(0)
        for size in batch_sizes:
            inputs = sample_inputs(self.signature, size, rng)
            if inputs is None:
                return
            self.predict(inputs)


def batch_signature(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...] = ()) -> Signature:
    """The batch mode the inputs' leading dimensions imply.

    All inputs sharing one literal leading size: the artifact takes exactly that batch (FIXED);
    no input with a dimension: no batch dimension (NONE); otherwise any leading size (DYNAMIC).
    """
    leading = {spec.shape[0] for spec in inputs if spec.shape}
    if not leading:
        return Signature(inputs, outputs, BatchMode.NONE)
    if len(leading) == 1 and (size := next(iter(leading))) > 0:
        return Signature(inputs, outputs, BatchMode.FIXED, batch_sizes=(size,), max_batch=size)
    return Signature(inputs, outputs, BatchMode.DYNAMIC)


def sample_inputs(signature: Signature, batch: int, rng: np.random.Generator) -> Tensors | None:
    """Random inputs matching ``signature`` with leading size ``batch``; None if a shape is unknown."""
    inputs: Tensors = {}
    for spec in signature.inputs:
        dims = list(spec.shape)
        if signature.batch is not BatchMode.NONE and dims:
            dims[0] = batch
        if any(d < 0 for d in dims):
            return None
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            inputs[spec.name] = rng.integers(0, 2, size=dims).astype(dtype)
        elif dtype.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, size=dims).astype(bool)
        else:
            return None
    return inputs if inputs else None


class DetectionError(ServingError):
    """The model directory holds nothing servable, or several candidates and no override."""
