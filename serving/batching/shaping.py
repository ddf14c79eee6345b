"""Pure functions that turn requests into batches and batch outputs back into responses.

All of them work on ``Tensors`` (name -> array) whose first dimension is the batch dimension.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from serving.batching.copying import RowCopier
from serving.errors import BadRequest, ModelError
from serving.types import Rows, Tensors


def count_rows(inputs: Tensors) -> int:
    """The leading size every input shares; ``BadRequest`` when there is none."""
    if not inputs:
        raise BadRequest("the request has no inputs")
    sizes: dict[str, int] = {}
    for name, array in inputs.items():
        if not isinstance(array, np.ndarray):
            raise BadRequest(f"input {name!r} is not an array")
        if array.ndim == 0:
            raise BadRequest(f"input {name!r} is a scalar, but the model expects a leading batch dimension")
        sizes[name] = array.shape[0]
    rows = next(iter(sizes.values()))
    if any(size != rows for size in sizes.values()):
        listing = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise BadRequest(f"inputs have different leading (batch) sizes: {listing}")
    if rows == 0:
        raise BadRequest("the request has no rows (leading size 0)")
    return rows


def shape_key(inputs: Tensors) -> Hashable:
    """What must match for two requests to share a batch: names, dtypes and non-batch dimensions."""
    return tuple((name, inputs[name].dtype, inputs[name].shape[1:]) for name in sorted(inputs))


def padded_size(rows: int, sizes: Sequence[int]) -> int:
    """The smallest of the ascending ``sizes`` that holds ``rows``; ``rows`` itself when none given."""
    if not sizes:
        return rows
    index = bisect_left(sizes, rows)
    if index == len(sizes):
        raise ValueError(f"{rows} rows exceed the largest allowed batch size {sizes[-1]}")
    return sizes[index]


def take_rows(tensors: Tensors, start: int, stop: int, *, copy: bool = False) -> Tensors:
    """Rows ``start:stop`` of every array; views unless ``copy``, so callers choose when to pay."""
    if copy:
        return {name: array[start:stop].copy() for name, array in tensors.items()}
    return {name: array[start:stop] for name, array in tensors.items()}


#: ``allocate(name, shape, dtype)``: an array to assemble input ``name`` of a batch in, or None
Allocate = Callable[[str, tuple[int, ...], np.dtype], "np.ndarray | None"]


def concatenate(
    parts: Sequence[Tensors],
    size: int | None = None,
    allocate: Allocate | None = None,
    copier: RowCopier | None = None,
) -> Tensors:
    """Join ``parts`` row-wise in order and pad to ``size`` rows by repeating the last row.

    Repeating a real row (rather than zeros) keeps the padding a valid input for models that
    would choke on zeros (a division by a norm, an embedding index); it is sliced off anyway.
    One ``np.concatenate`` per input; a lone part with nothing to pad is returned as it is.
    ``allocate`` may supply the arrays to join into (a runner's pinned staging buffers);
    ``copier`` copies the rows with several threads.
    """
    rows = sum(_leading(part) for part in parts)
    pad = (rows if size is None else size) - rows
    if pad < 0:
        raise ValueError(f"cannot pad {rows} rows down to {size}")
    if len(parts) == 1 and pad == 0:
        return dict(parts[0])
    joined: Tensors = {}
    for name in parts[0]:
        arrays = [part[name] for part in parts]
        last = arrays[-1]
        # an explicit C-ordered output: np.concatenate with a broadcast padding part picks a
        # non-contiguous layout, which the runner then copies once more (9.6 MB per 64-image batch)
        shape, dtype = (rows + pad, *last.shape[1:]), np.result_type(*arrays)
        out = allocate(name, shape, dtype) if allocate is not None else None
        if out is None or out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
            out = np.empty(shape, dtype=dtype)
        if copier is not None:
            copier.join(arrays, out[:rows])
        else:
            np.concatenate(arrays, out=out[:rows])
        if pad:
            out[rows:] = last[-1:]
        joined[name] = out
    return joined


def gather(parts: Sequence[Tensors], size: int | None = None) -> Tensors:
    """``parts`` as :class:`Rows` per input, not joined: what :func:`concatenate` would build,
    left to a runner that copies each part to its device itself (see ``Handler.takes_rows``)."""
    rows = sum(_leading(part) for part in parts)
    return {name: Rows([part[name] for part in parts], rows if size is None else size) for name in parts[0]}


def check_outputs(outputs: object, rows: int) -> Tensors:
    """The runner's outputs if they are named arrays of ``rows`` rows; else ``ModelError``."""
    if not isinstance(outputs, Mapping):
        raise ModelError(f"model returned {type(outputs).__name__}, expected a dict of arrays")
    for name, array in outputs.items():
        if not isinstance(array, np.ndarray):
            raise ModelError(f"model returned {type(array).__name__} for output {name!r}, expected an array")
        if array.ndim == 0:
            raise ModelError(f"model returned a scalar for output {name!r}, expected {rows} rows")
        if array.shape[0] != rows:
            raise ModelError(f"model returned {array.shape[0]} rows for a batch of {rows}")
    return dict(outputs) if not isinstance(outputs, dict) else outputs


def _leading(tensors: Tensors) -> int:
    return next(iter(tensors.values())).shape[0]
