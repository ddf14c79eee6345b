"""Cheap byte-level readers used by the probes (artifacts.md §1).

Nothing here executes or imports a model framework: magic bytes, zip central directories,
pickle opcode walks and a protobuf wire-format walk that seeks over large fields.
"""

from __future__ import annotations

import io
import mmap
import pickletools
import zipfile
from pathlib import Path
from typing import BinaryIO

HEAD_BYTES = 4096
TORCH_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def head(path: Path, size: int = HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of a file (fewer if it is shorter)."""
    with open(path, "rb") as f:
        return f.read(size)


def zip_members(path: Path) -> list[str] | None:
    """Member names of a zip (central directory only), or None if it is not a readable zip."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def strip_root(names: list[str]) -> dict[str, str]:
    """Map member paths without their first folder (PyTorch archives' arbitrary root) to full names."""
    out = {}
    for name in names:
        _, sep, rest = name.partition("/")
        out[rest if sep else name] = name
    return out


def read_member(path: Path, name: str, limit: int = 8 << 20) -> bytes:
    """One zip member's bytes, at most ``limit`` (sub-typing reads small members only)."""
    with zipfile.ZipFile(path) as z, z.open(name) as f:
        return f.read(limit)


def pickle_globals(data: bytes) -> set[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in a pickle, without unpickling.

    Stops quietly at the first unreadable opcode: joblib interleaves raw array bytes.
    """
    found: set[str] = set()
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                found.add(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:  # a truncated or interleaved stream ends the walk
        pass
    return found


def file_contains(path: Path, needles: tuple[bytes, ...]) -> set[bytes]:
    """Which of ``needles`` occur in the file, by mmap (pages are read lazily)."""
    if path.stat().st_size == 0:
        return set()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return {n for n in needles if m.find(n) != -1}


# ---------------------------------------------------------------- protobuf (ONNX)


class WireError(ValueError):
    """The bytes are not the protobuf message we expected."""


def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise WireError("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _fields(f: BinaryIO, end: int):
    """Yield (field, wire_type, value) up to ``end``; LEN values are (offset, length), unread."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire == 0:
            yield field, wire, _varint(f)
        elif wire == 1:
            f.seek(8, io.SEEK_CUR)
            yield field, wire, None
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            if start + length > end:
                raise WireError("field runs past its message")
            yield field, wire, (start, length)
            f.seek(start + length)
        elif wire == 5:
            f.seek(4, io.SEEK_CUR)
            yield field, wire, None
        else:
            raise WireError(f"wire type {wire}")
    if f.tell() != end:
        raise WireError("message overran")


def _read(f: BinaryIO, span: tuple[int, int]) -> bytes:
    here = f.tell()
    f.seek(span[0])
    data = f.read(span[1])
    f.seek(here)
    return data


def _sub(f: BinaryIO, span: tuple[int, int]):
    here = f.tell()
    f.seek(span[0])
    yield from _fields(f, span[0] + span[1])
    f.seek(here)


def _value_info(f: BinaryIO, span) -> dict:
    info: dict = {"name": "", "elem_type": 0, "dims": None}
    for field, _, val in _sub(f, span):
        if field == 1:
            info["name"] = _read(f, val).decode("utf-8", "replace")
        elif field == 2:  # TypeProto
            for tf, _, tv in _sub(f, val):
                if tf != 1:  # tensor_type only
                    continue
                for ttf, _, ttv in _sub(f, tv):
                    if ttf == 1:
                        info["elem_type"] = ttv
                    elif ttf == 2:
                        info["dims"] = []
                        for _df, _, dv in _sub(f, ttv):
                            dim: int | str = -1
                            for kf, _, kv in _sub(f, dv):
                                dim = kv if kf == 1 else _read(f, kv).decode("utf-8", "replace")
                            info["dims"].append(dim)
    return info


def onnx_summary(path: Path) -> dict | None:
    """ir_version, producer, opsets, inputs/outputs and external-data flag of an ONNX file.

    Returns None unless the whole top-level message parses and holds an ir_version ≥ 3 and a graph.
    """
    try:
        with open(path, "rb") as f:
            end = f.seek(0, io.SEEK_END)
            f.seek(0)
            out: dict = {"ir_version": None, "producer": "", "opsets": {}, "inputs": [], "outputs": []}
            graph = None
            for field, wire, val in _fields(f, end):
                if field == 1 and wire == 0:
                    out["ir_version"] = val
                elif field == 2 and wire == 2:
                    out["producer"] = _read(f, val).decode("utf-8", "replace")
                elif field == 7 and wire == 2:
                    graph = val
                elif field == 8 and wire == 2:
                    domain, version = "", 0
                    for of, _, ov in _sub(f, val):
                        if of == 1:
                            domain = _read(f, ov).decode("utf-8", "replace")
                        elif of == 2:
                            version = ov
                    out["opsets"][domain] = version
            if not out["ir_version"] or out["ir_version"] < 3 or graph is None:
                return None
            initializers: set[str] = set()
            external = False
            inputs, outputs = [], []
            for field, wire, val in _sub(f, graph):
                if field == 5 and wire == 2:  # TensorProto initializer
                    for tf, _, tv in _sub(f, val):
                        if tf == 8:
                            initializers.add(_read(f, tv).decode("utf-8", "replace"))
                        elif tf == 14 and tv == 1:
                            external = True
                elif field == 11 and wire == 2:
                    inputs.append(_value_info(f, val))
                elif field == 12 and wire == 2:
                    outputs.append(_value_info(f, val))
            # Old exporters list initializers among the graph inputs.
            out["inputs"] = [i for i in inputs if i["name"] not in initializers]
            out["outputs"] = outputs
            out["external_data"] = external
            return out
    except (WireError, OSError, UnicodeError):
        return None
