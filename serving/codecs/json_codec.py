"""``application/json``: nested lists in, nested lists out.

Accepted request shapes:

- a bare nested list (or number): the model's single input;
- ``{"instances": [...]}``: rows of the single input (the TF Serving / SageMaker row format);
- ``{"inputs": [...]}``: the single input; ``{"inputs": {"name": [...], ...}}``: named inputs;
- ``{"name": [...], ...}``: named inputs, every key an input name when the model's are known.

Responses: one output is its bare nested list, several are ``{"name": list, ...}``. Non-finite
floats are written as the tokens ``NaN``, ``Infinity`` and ``-Infinity`` (Python's ``json``
default), which Python, numpy and pandas read back; turning them into ``null`` would lose which
one it was, and refusing the response would hide a model's answer behind an error.
"""

from __future__ import annotations

import json

import numpy as np

from serving.codecs.arrays import named_inputs, single_input
from serving.errors import BadRequest, NotAcceptable
from serving.types import Tensors, TensorSpec

MEDIA_TYPE = "application/json"


def decode(body: bytes, inputs: tuple[TensorSpec, ...]) -> Tensors:
    """Named arrays from a JSON body in any of the accepted shapes."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"malformed JSON: {_reason(exc)}") from None
    if not isinstance(document, dict):
        return single_input(_array(document, "the body"), inputs)
    if document.keys() == {"instances"}:
        return single_input(_array(document["instances"], "instances"), inputs)
    if document.keys() == {"inputs"}:
        value = document["inputs"]
        if isinstance(value, dict):
            return named_inputs({name: _array(v, name) for name, v in value.items()}, inputs)
        return single_input(_array(value, "inputs"), inputs)
    return named_inputs({name: _array(v, name) for name, v in document.items()}, inputs)


def encode(outputs: Tensors) -> bytes:
    """One output as its bare nested list; several as an object keyed by output name."""
    try:
        if len(outputs) == 1:
            return _text(next(iter(outputs.values()))).encode()
        members = ",".join(f"{json.dumps(name)}:{_text(array)}" for name, array in outputs.items())
        return f"{{{members}}}".encode()
    except (TypeError, ValueError) as exc:  # bytes or object outputs that JSON cannot hold
        raise NotAcceptable(
            f"the model's outputs cannot be written as JSON ({exc}); accept application/x-npz"
        ) from None


def _text(array: np.ndarray) -> str:
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        return _narrow_float_text(array)
    return json.dumps(array.tolist(), separators=(",", ":"))


def _narrow_float_text(array: np.ndarray) -> str:
    # tolist() widens float32 to float64, whose repr shows 0.1 as 0.10000000149011612; numpy's
    # str() gives the shortest digits that round-trip in the narrow type, at about the same speed.
    words = array.astype(str)
    if not np.isfinite(array).all():
        words[np.isnan(array)] = "NaN"
        words[np.isposinf(array)] = "Infinity"
        words[np.isneginf(array)] = "-Infinity"
    return _nest(words.tolist())


def _nest(words: list | str) -> str:
    if isinstance(words, str):
        return words
    if words and isinstance(words[0], str):
        return f"[{','.join(words)}]"
    return f"[{','.join(_nest(item) for item in words)}]"


def _array(value: object, where: str) -> np.ndarray:
    if isinstance(value, dict):
        raise BadRequest(f"{where} must be a number or a nested list of numbers, not an object")
    try:
        return np.asarray(value)
    except ValueError:
        raise BadRequest(f"{where} is ragged: nested lists must be rectangular") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "the body is not UTF-8 text"
    return str(exc)
