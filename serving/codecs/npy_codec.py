"""``application/x-npy`` (one array) and ``application/x-npz`` (named arrays), never pickles.

An ``.npy`` body is read in place: the header is parsed and the array is a read-only view of
the request bytes, so a large image costs no copy here (the IPC layer sends it from that view).
"""

from __future__ import annotations

import io
import math
import re
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

from serving.codecs.arrays import named_inputs, one_output, single_input
from serving.errors import BadRequest, NotAcceptable
from serving.types import Tensors, TensorSpec

NPY = "application/x-npy"
NPZ = "application/x-npz"
#: the most an .npz request may expand to, so a small compressed body cannot exhaust memory
MAX_NPZ_BYTES = 1 << 30
_PICKLE_REFUSED = "pickled arrays are not accepted; send plain numeric arrays"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
#: the header ``np.save`` writes for a plain array (version 1.0), read without ``ast``; any other
#: header goes through numpy's own parser
_FAST_HEADER = re.compile(
    rb"\x93NUMPY\x01\x00(..)\{'descr': '([<>|=][a-z]\d{1,2})', 'fortran_order': (False|True), "
    rb"'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n",
    re.DOTALL,
)
_HEADERS: dict[tuple, bytes] = {}  # encoded .npy headers by (dtype, shape); bounded below


def decode_npy(body: bytes, inputs: tuple[TensorSpec, ...]) -> Tensors:
    """The single input from an ``.npy`` body, viewing the body's bytes."""
    return single_input(_read_npy(body), inputs)


def decode_npz(body: bytes, inputs: tuple[TensorSpec, ...]) -> Tensors:
    """Named inputs from an ``.npz`` archive (``np.savez``); member names are input names."""
    if not body.startswith(b"PK"):
        raise BadRequest("malformed npz: the body is not a zip archive (np.savez output)")
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
            if sum(m.file_size for m in members) > MAX_NPZ_BYTES:
                raise BadRequest(f"the npz archive expands beyond {MAX_NPZ_BYTES} bytes")
            arrays = {_member_name(m.filename): _read_member(archive, m) for m in members}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise BadRequest(f"malformed npz: {exc}") from None
    return named_inputs(arrays, inputs)


def encode_npy(outputs: Tensors) -> bytes:
    """The only output as ``.npy`` bytes."""
    name, array = one_output(outputs, NPY)
    array = np.asanyarray(array)
    if array.dtype.kind in "biuf" and array.flags.c_contiguous:
        return _header(array) + array.tobytes()
    buffer = io.BytesIO()
    _write(buffer, name, array)
    return buffer.getvalue()


def encode_npz(outputs: Tensors) -> bytes:
    """Every output as a member of an uncompressed ``.npz`` archive, readable with ``np.load``."""
    buffer = io.BytesIO()
    # Written like np.savez, but without its keyword arguments (an output named "file" works).
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in outputs.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                _write(member, name, array)
    return buffer.getvalue()


def _header(array: np.ndarray) -> bytes:
    """The .npy header numpy writes for a C-ordered ``array`` (cached: outputs repeat shapes)."""
    key = (array.dtype.str, array.shape)
    head = _HEADERS.get(key)
    if head is None:
        buffer = io.BytesIO()
        npy_format.write_array_header_1_0(buffer, npy_format.header_data_from_array_1_0(array))
        head = buffer.getvalue()
        if len(_HEADERS) > 256:
            _HEADERS.clear()
        _HEADERS[key] = head
    return head


def _read_npy(body: bytes) -> np.ndarray:
    if body.startswith(_PICKLE_PROTOCOL_2_PLUS):
        raise BadRequest(_PICKLE_REFUSED)
    fast = _FAST_HEADER.match(body)
    if fast and int.from_bytes(fast.group(1), "little") + 10 == fast.end():
        dtype = np.dtype(fast.group(2).decode())
        shape = tuple(int(d) for d in fast.group(4).rstrip(b",").split(b", ") if d)
        return _view(body, dtype, shape, fast.group(3) == b"True", fast.end())
    stream = io.BytesIO(body)  # shares the bytes object's buffer; no copy
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise BadRequest(f"malformed npy: {_first_sentence(exc)}") from None
    if dtype.hasobject:
        raise BadRequest(_PICKLE_REFUSED)
    return _view(body, dtype, shape, fortran_order, stream.tell())


def _view(body: bytes, dtype: np.dtype, shape: tuple, fortran_order: bool, offset: int) -> np.ndarray:
    count = math.prod(shape)
    if len(body) - offset < count * dtype.itemsize:
        raise BadRequest(
            f"malformed npy: truncated ({len(body) - offset} data bytes for shape {shape} {dtype})"
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(member) as stream:
        try:
            return npy_format.read_array(stream, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise BadRequest(_PICKLE_REFUSED) from None
            raise BadRequest(f"malformed npz member {member.filename!r}: {_first_sentence(exc)}") from None


def _member_name(filename: str) -> str:
    return filename.removesuffix(".npy")


def _write(stream, name: str, array: np.ndarray) -> None:
    try:
        npy_format.write_array(stream, np.asanyarray(array), allow_pickle=False)
    except ValueError:
        raise NotAcceptable(
            f"output {name!r} holds Python objects, which npy/npz cannot carry without pickling"
        ) from None


def _first_sentence(exc: Exception) -> str:
    return str(exc).split("\n")[0][:200]
