"""What the torch handlers know of a model's inputs besides the artifact: onebox.toml's
declarations, outputs found by running a sample, and the batch check a compiled model needs.

torch is not imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from serving.errors import BadRequest, ConfigError
from serving.types import ModelConfig, Tensors

if TYPE_CHECKING:
    from handlers.torch_common import TorchRunner


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
