"""Naming and dtype casting shared by every decoder, and the one-array check shared by encoders.

A request body becomes named arrays here: a single-array format is named after the model's only
input, a named format is checked against the model's inputs, and each array is cast to the
input's dtype only when the cast cannot change a value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from serving.errors import BadRequest, ModelError, NotAcceptable
from serving.types import Tensors, TensorSpec

#: the name given to a single array when the model's inputs are unknown
DEFAULT_INPUT = "input"
#: what may cross the IPC wire: booleans and numbers (no strings, no objects)
_NUMERIC_KINDS = frozenset("biuf")


def single_input(array: np.ndarray, inputs: tuple[TensorSpec, ...]) -> Tensors:
    """Name (and cast) the one array a single-array body holds."""
    if len(inputs) > 1:
        names = ", ".join(spec.name for spec in inputs)
        raise BadRequest(
            f"the model takes {len(inputs)} inputs ({names}); send them by name, "
            'as JSON {"inputs": {"name": [...], ...}} or as application/x-npz'
        )
    if not inputs:
        return {DEFAULT_INPUT: check_numeric(array, DEFAULT_INPUT)}
    return {inputs[0].name: cast(array, inputs[0])}


def named_inputs(arrays: Mapping[str, np.ndarray], inputs: tuple[TensorSpec, ...]) -> Tensors:
    """Check named arrays against the model's inputs (any names when unknown) and cast each."""
    if not arrays:
        raise BadRequest("the request holds no inputs")
    if not inputs:
        return {name: check_numeric(array, name) for name, array in arrays.items()}
    specs = {spec.name: spec for spec in inputs}
    unknown = [name for name in arrays if name not in specs]
    if unknown:
        raise BadRequest(f"unknown input(s) {', '.join(unknown)}; the model takes {', '.join(specs)}")
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise BadRequest(f"missing input(s) {', '.join(missing)}; the model takes {', '.join(specs)}")
    return {name: cast(arrays[name], specs[name]) for name in specs}


def check_numeric(array: np.ndarray, name: str) -> np.ndarray:
    """Refuse strings, nulls and objects: only booleans and numbers reach a model."""
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise BadRequest(f"input {name!r} must hold numbers or booleans, not {_describe(array)}")
    return array


def cast(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """``array`` as ``spec.dtype``, or BadRequest when the cast would change or invent a value.

    Integers become floats (``[[1, 2]]`` for a float32 input is the common case); floats become
    integers only when every value is whole and in range; numbers become booleans only when every
    value is 0 or 1. Wider floats narrow (float64 -> float32) like any JSON client expects.
    """
    check_numeric(array, spec.name)
    target = np.dtype(spec.dtype)
    if array.dtype == target:
        return array
    if target.kind not in _NUMERIC_KINDS:
        raise BadRequest(f"input {spec.name!r} has dtype {target}, which this format cannot carry")
    if target.kind == "b":
        if not ((array == 0) | (array == 1)).all():
            raise BadRequest(f"input {spec.name!r} expects booleans; got values other than 0 and 1")
    elif target.kind in "iu" and array.dtype.kind != "b":
        _check_integers(array, spec.name, target)
    return array.astype(target, copy=False)


def _check_integers(array: np.ndarray, name: str, target: np.dtype) -> None:
    if array.size == 0:
        return
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (np.mod(array, 1) == 0).all()):
        raise BadRequest(f"input {name!r} expects {target} integers; got fractional or non-finite values")
    info = np.iinfo(target)
    low, high = array.min(), array.max()
    # Compare as Python numbers so uint64 against int64 bounds never wraps.
    if int(low) < info.min or int(high) > info.max:
        raise BadRequest(f"input {name!r} expects {target}; values {low}..{high} are out of range")


def _describe(array: np.ndarray) -> str:
    return "strings" if array.dtype.kind in "US" else f"values of dtype {array.dtype} (nulls or mixed types)"


def one_output(outputs: Tensors, media_type: str) -> tuple[str, np.ndarray]:
    """The only output, for formats that hold one array; NotAcceptable naming what works instead."""
    if len(outputs) == 1:
        return next(iter(outputs.items()))
    if not outputs:
        raise ModelError("the model returned no outputs")
    names = ", ".join(outputs)
    raise NotAcceptable(
        f"{media_type} holds one array but the model returned {len(outputs)} outputs ({names}); "
        "accept application/x-npz or application/json instead"
    )
