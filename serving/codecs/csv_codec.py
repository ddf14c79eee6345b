"""``text/csv``: rows of numbers, no header, one array.

A request of N lines of M numbers is an ``(N, M)`` array: one row per record, which is what a
model with a ``[batch, features]`` input wants and what batch transform's MultiRecord sends.
The input's shape refines that: a rank-1 input gets a flat array from one column or one row, and a rank-3+ input
with known trailing dimensions gets each row reshaped to them (the inverse of how responses are
written). Blank lines are skipped, so a trailing newline is fine.

Responses: a 1-D output is one value per line, a 2-D output one row per line, higher ranks
flatten everything after the first dimension into the row. Lines end with ``\\n``. Floats are
written in their shortest round-tripping form (``0.1``, not ``0.10000000149011612``).
"""

from __future__ import annotations

import io
import math

import numpy as np

from serving.codecs.arrays import one_output, single_input
from serving.errors import BadRequest, NotAcceptable
from serving.types import Tensors, TensorSpec

MEDIA_TYPE = "text/csv"


def decode(body: bytes, inputs: tuple[TensorSpec, ...]) -> Tensors:
    """One array from CSV rows, shaped and typed by the model's single input when known."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("malformed CSV: the body is not UTF-8 text") from None
    if not text.strip():
        raise BadRequest("malformed CSV: no rows")
    spec = inputs[0] if len(inputs) == 1 else None
    array = _parse(text, spec)
    if spec is not None:
        array = _fit_rank(array, spec)
    return single_input(array, inputs)


def encode(outputs: Tensors) -> bytes:
    """The only output as CSV rows."""
    name, array = one_output(outputs, MEDIA_TYPE)
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise NotAcceptable(f"text/csv holds numbers only; output {name!r} has dtype {array.dtype}")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)  # 1/0, which every CSV reader parses as a number
    if array.ndim <= 1:
        rows = array.reshape(-1, 1)
    else:
        rows = array.reshape(array.shape[0], math.prod(array.shape[1:]))
    # astype(str) formats in C with the shortest repr that round-trips for the dtype.
    lines = [",".join(row) for row in rows.astype(str).tolist()]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _parse(text: str, spec: TensorSpec | None) -> np.ndarray:
    wanted = np.dtype(spec.dtype) if spec is not None else None
    # Parse straight into a numeric input's dtype so int64 values beyond 2**53 stay exact;
    # an integer input sent as "1.0" falls back to floats and the integrality check in cast().
    attempts = [wanted, np.dtype(np.float64)] if wanted is not None and wanted.kind in "iuf" else [np.float64]
    for dtype in attempts:
        try:
            return np.loadtxt(io.StringIO(text), delimiter=",", comments=None, dtype=dtype, ndmin=2)
        except ValueError as exc:
            error = exc
    raise BadRequest(f"malformed CSV: {str(error).split(';')[0]}") from None


def _fit_rank(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    rank = len(spec.shape)
    if rank == 1 and 1 in array.shape:
        return array.reshape(-1)
    trailing = spec.shape[1:]
    if rank > 2 and all(d > 0 for d in trailing) and math.prod(trailing) == array.shape[1]:
        return array.reshape(array.shape[0], *trailing)
    return array
