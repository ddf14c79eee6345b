"""Check decoded inputs against a model's signature before they are queued.

Wrong names, shapes or dtypes are the client's mistake (400) and must never reach a batch
where they would fail every other request in it.
"""

from __future__ import annotations

import numpy as np

from serving.errors import BadRequest
from serving.types import BatchMode, Signature, Tensors


def conform_inputs(inputs: Tensors, signature: Signature) -> Tensors:
    """Rename a lone input, cast dtypes that convert safely, and check every known dimension."""
    entry = _PLANS.get(id(signature))
    if entry is None or entry[0] is not signature:
        if len(_PLANS) >= 64:  # models loaded and unloaded many times: forget the old ones
            _PLANS.clear()
        entry = _PLANS[id(signature)] = (signature, _single_input(signature))
    plan = entry[1]
    if plan is not None and len(inputs) == 1:
        (array,) = inputs.values()
        name, dtype, ndim, tail = plan
        if array.dtype == dtype and array.ndim == ndim and array.shape[1:] == tail and array.shape[0]:
            return {name: array}  # what the full check below would return for it
    return _conform(inputs, signature)


#: per signature (by id, the signature kept to tell a reused id): its _single_input plan
_PLANS: dict[int, tuple[Signature, tuple | None]] = {}


def _single_input(signature: Signature) -> tuple | None:
    """For a model of one batched input whose dimensions after the batch are all known: its
    name, dtype, number of dimensions and those dimensions. An array of that dtype and shape,
    with at least one row, passes :func:`_conform` unchanged (renamed when it came under another
    name), so it can skip the full check. None for any other model.
    """
    if len(signature.inputs) != 1 or signature.batch is BatchMode.NONE:
        return None
    (spec,) = signature.inputs
    shape = tuple(spec.shape)
    if not shape or shape == (-1,) or any(d < 0 for d in shape[1:]):
        return None
    return spec.name, np.dtype(spec.dtype), len(shape), shape[1:]


def _conform(inputs: Tensors, signature: Signature) -> Tensors:
    specs = signature.inputs
    if not specs:
        return inputs
    if len(specs) == 1 and len(inputs) == 1:
        inputs = {specs[0].name: next(iter(inputs.values()))}
    missing = [s.name for s in specs if s.name not in inputs]
    unknown = sorted(set(inputs) - {s.name for s in specs})
    if missing or unknown:
        expected = ", ".join(s.name for s in specs)
        raise BadRequest(f"inputs do not match the model: expected {expected}; got {', '.join(inputs)}")
    out: Tensors = {}
    for spec in specs:
        array = inputs[spec.name]
        out[spec.name] = _cast(array, spec.name, np.dtype(spec.dtype))
        _check_shape(out[spec.name].shape, spec.shape, spec.name, signature.batch)
    return out


def _cast(array: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray:
    if array.dtype == dtype:
        return array
    # JSON and CSV give int64/float64; any numeric value may become the model's numeric dtype,
    # but not e.g. floats into an integer input
    if dtype.kind in "iub" and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise BadRequest(f"input {name!r} must be {dtype.name}, got non-integer values")
    if array.dtype.kind not in "biuf":
        raise BadRequest(f"input {name!r} must be {dtype.name}, got {array.dtype}")
    return array.astype(dtype, copy=False)


def _check_shape(shape: tuple, expected: tuple, name: str, batch: BatchMode) -> None:
    if not expected or expected == (-1,):
        return
    if len(shape) != len(expected):
        raise BadRequest(
            f"input {name!r} must have {len(expected)} dimensions {_fmt(expected)}, got {_fmt(shape)}"
        )
    start = 0 if batch is BatchMode.NONE else 1
    for got, want in zip(shape[start:], expected[start:], strict=True):
        if want >= 0 and got != want:
            raise BadRequest(f"input {name!r} must have shape {_fmt(expected)}, got {_fmt(shape)}")
    if batch is not BatchMode.NONE and shape[0] == 0:
        raise BadRequest(f"input {name!r} has no rows")


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"
