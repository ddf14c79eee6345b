"""Wire format between frontends and model hosts.

A message is one frame::

    !I header_len | header (JSON, UTF-8) | buffer 0 | buffer 1 | ...

The header is a small JSON object; its ``"buffers"`` member lists the byte length of each raw
buffer that follows. Tensors travel as raw buffers described by ``{name, dtype, shape}`` specs,
so request data is never pickled and is sent with one scatter-gather ``sendmsg`` call and read
with ``recv_into`` straight into the arrays' memory.
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np

from serving.errors import BadRequest
from serving.types import Tensors

_LEN = struct.Struct("!I")
MAX_HEADER = 1 << 20
#: dtypes allowed on the wire: plain numeric/bool arrays only (no object arrays, no pickles)
_WIRE_KINDS = set("biuf")


class ConnectionClosed(ConnectionError):
    """The peer closed the connection between messages."""


def send_message(sock: socket.socket, header: dict, buffers: list = ()) -> None:
    """Send one frame; ``buffers`` are bytes-like objects (numpy arrays, memoryviews, bytes)."""
    views = [memoryview(b).cast("B") for b in buffers]
    header = {**header, "buffers": [v.nbytes for v in views]}
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [_LEN.pack(len(head)) + head, *[v for v in views if v.nbytes]]
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:  # partial scatter-gather send: finish the rest in order
        _send_rest(sock, parts, sent)


def _send_rest(sock: socket.socket, parts: list, sent: int) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        sock.sendall(view[sent:])
        sent = 0


def recv_message(sock: socket.socket) -> tuple[dict, list[bytearray]]:
    """Read one frame; raises ``ConnectionClosed`` if the peer closed before a new frame.

    The first ``recv`` reads into this thread's scratch buffer, which grows to the largest
    message seen (up to 1 MiB), so an image-sized message costs one system call — and one
    release and re-acquisition of the GIL — instead of several. This relies on the protocol's
    rule that a peer sends its next message only after the answer to the previous one, so
    nothing beyond this frame can be in the socket yet.
    """
    scratch = _scratch()
    got = sock.recv_into(scratch)
    if got == 0:
        raise ConnectionClosed("peer closed the connection")
    got = _fill(sock, scratch, got, _LEN.size)
    head_len = _LEN.unpack_from(scratch)[0]
    if head_len > MAX_HEADER:
        raise ConnectionError(f"IPC header of {head_len} bytes exceeds the limit")
    end = _LEN.size + head_len
    if end > len(scratch):
        scratch = bytearray(scratch[:got]) + bytearray(end - got)
    got = _fill(sock, scratch, got, end)
    view = memoryview(scratch)
    header = json.loads(bytes(view[_LEN.size : end]))
    sizes = header.pop("buffers", [])
    _grow_scratch(end + sum(sizes))
    buffers, pos = [], end
    for size in sizes:
        take = min(size, got - pos)
        if take == size:
            buf = bytearray(view[pos : pos + size])  # one copy out of the reused scratch
        else:
            buf = bytearray(size)
            buf[:take] = view[pos : pos + take]
            _recv_into(sock, memoryview(buf)[take:])
        pos += take
        buffers.append(buf)
    if pos != got:
        raise ConnectionError("bytes beyond the end of an IPC message")
    return header, buffers


_LOCAL = threading.local()
_SCRATCH = 64 * 1024
_SCRATCH_MAX = 1 << 20
#: socket buffer sizes asked for (the kernel caps them at net.core.{w,r}mem_max): an image-sized
#: message then leaves in one ``sendmsg`` instead of trickling through the default buffer
SOCKET_BUFFER = 1 << 20


def tune(sock: socket.socket) -> socket.socket:
    """Ask for large socket buffers on an IPC connection."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
    return sock


def _scratch() -> bytearray:
    """This thread's receive buffer (its contents are copied out before it is reused)."""
    buf = getattr(_LOCAL, "scratch", None)
    if buf is None:
        buf = _LOCAL.scratch = bytearray(_SCRATCH)
    return buf


def _grow_scratch(size: int) -> None:
    """Let the next message of ``size`` bytes arrive in one ``recv`` (up to 1 MiB)."""
    if len(_LOCAL.scratch) < size <= _SCRATCH_MAX:
        _LOCAL.scratch = bytearray(size + 4096)


def _fill(sock: socket.socket, buf: bytearray, got: int, need: int) -> int:
    """Read into ``buf`` until it holds at least ``need`` bytes; returns how many it holds."""
    view = memoryview(buf)
    while got < need:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("connection closed in the middle of a message")
        got += n
    return got


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("connection closed in the middle of a message")
        got += n


def encode_tensors(tensors: Tensors) -> tuple[list[dict], list[np.ndarray]]:
    """Specs and contiguous buffers for named arrays."""
    specs, buffers = [], []
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype.kind not in _WIRE_KINDS:
            raise BadRequest(f"tensor {name!r} has dtype {array.dtype}, which cannot be sent")
        array = np.ascontiguousarray(array)
        specs.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(array)
    return specs, buffers


def decode_tensors(specs: list[dict], buffers: list[bytearray]) -> Tensors:
    """Named arrays viewing the received buffers (no copy)."""
    if len(specs) != len(buffers):
        raise ConnectionError("tensor specs and buffers do not match")
    tensors: Tensors = {}
    for spec, buf in zip(specs, buffers, strict=True):
        dtype = np.dtype(spec["dtype"])
        if dtype.kind not in _WIRE_KINDS:
            raise ConnectionError(f"dtype {dtype} is not allowed on the wire")
        tensors[spec["name"]] = np.frombuffer(buf, dtype=dtype).reshape(spec["shape"])
    return tensors
