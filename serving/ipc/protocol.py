"""Wire format between frontends and model hosts.

A message is one frame::

    !I header_len | header (JSON, UTF-8) | buffer 0 | buffer 1 | ...

The header is a small JSON object; its ``"buffers"`` member lists the byte length of each raw
buffer that follows. Tensors travel as raw buffers described by ``{name, dtype, shape}`` specs,
so request data is never pickled and is sent with one scatter-gather ``sendmsg`` call and read
with ``recv_into`` straight into the arrays' memory.

Large buffers (a frontend's request tensors from ``SHM_MIN_BYTES`` up) can travel in shared
memory instead: each connection has a :class:`SharedRegion` (a memfd) that the client writes and
the host maps, passed once over the socket as a file descriptor (``SCM_RIGHTS``). The header
then says ``"shm": [sizes]`` and no bytes follow it; the buffers lie at 64-byte aligned offsets
from the region's start. Neither side copies them through the kernel, and the host's reader
thread receives a few hundred bytes per request instead of the whole image.
"""

from __future__ import annotations

import array as arrays
import json
import mmap
import os
import select
import socket
import struct

import numpy as np

from serving.errors import BadRequest
from serving.types import Tensors

_LEN = struct.Struct("!I")
MAX_HEADER = 1 << 20
#: dtypes allowed on the wire: plain numeric/bool arrays only (no object arrays, no pickles)
_WIRE_KINDS = set("biuf")


class ConnectionClosed(ConnectionError):
    """The peer closed the connection between messages."""


class Joined:
    """One buffer made of several byte views end to end (the rows of a gathered call, one view
    per request): sent, or placed in a shared region, part after part, never joined in memory."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: list):
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(p.nbytes for p in self.parts)


def byte_views(buffers: list) -> list:
    """Each buffer as a flat byte view (a :class:`Joined` stays as it is)."""
    return [b if isinstance(b, Joined) else memoryview(b).cast("B") for b in buffers]


def send_message(sock: socket.socket, header: dict, buffers: list = (), fds: list[int] = ()) -> None:
    """Send one frame; ``buffers`` are bytes-like objects (numpy arrays, memoryviews, bytes) or
    :class:`Joined` parts of one buffer.

    ``fds``: file descriptors passed along with the frame's first bytes (``SCM_RIGHTS``).
    """
    views = byte_views(buffers)
    header = {**header, "buffers": [v.nbytes for v in views]}
    head = dump_header(header)
    parts = [_LEN.pack(len(head)) + head]
    for view in views:
        if isinstance(view, Joined):
            parts.extend(p for p in view.parts if p.nbytes)
        elif view.nbytes:
            parts.append(view)
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, arrays.array("i", fds))] if fds else []
    try:
        sent = sock.sendmsg(parts, ancillary)
    except BlockingIOError:  # a non-blocking socket with a full buffer
        if ancillary:
            raise
        sent = 0
    if sent < total:  # partial scatter-gather send: finish the rest in order
        _send_rest(sock, parts, sent)


def _send_rest(sock: socket.socket, parts: list, sent: int) -> None:
    """The rest of a message; on a non-blocking socket, waiting for room up to ``SEND_WAIT_S``."""
    for part in parts:
        view = memoryview(part).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        view = view[sent:]
        sent = 0
        while view.nbytes:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                if not select.select([], [sock], [], SEND_WAIT_S)[1]:
                    raise TimeoutError("the peer takes no more of an IPC message") from None


#: how long a non-blocking sender waits for room in the socket (the event-loop frontend's links,
#: for a message larger than the socket's buffer: shared memory turned off)
SEND_WAIT_S = 5.0


def recv_message(sock: socket.socket, reader: FrameReader | None = None) -> tuple[dict, list]:
    """Read one frame; raises ``ConnectionClosed`` if the peer closed before a new frame.

    Reads through ``reader``, the connection's :class:`FrameReader`, whose buffer grows to the
    messages seen (up to 1 MiB), so an image-sized message costs one system call — and one
    release and re-acquisition of the GIL — instead of several. Without one, a reader is made for
    this call. A reader belongs to one connection: greenlets share a thread, so a per-thread
    reader would mix their frames.
    """
    if reader is None:
        reader = FrameReader()
    try:
        while (message := reader.receive(sock)) is None:
            pass
        return message
    except BaseException:
        reader.reset()  # a timed-out or broken read must not leave half a frame behind
        raise


_FIRST_READ = 64 * 1024
_KEEP_MAX = 1 << 20  # a reader keeps a buffer up to this size between messages
#: socket buffer sizes asked for (the kernel caps them at net.core.{w,r}mem_max): an image-sized
#: message then leaves in one ``sendmsg`` instead of trickling through the default buffer
SOCKET_BUFFER = 1 << 20


class FrameReader:
    """Assembles frames from whatever each ``recv`` returns, for blocking and epoll readers.

    Receive into :meth:`space`, then pass the byte count to :meth:`advance`, which returns
    ``(header, buffers)`` once the frame is whole. This relies on the protocol's rule that a
    peer sends its next message only after the answer to the previous one: bytes beyond the
    frame are an error. The buffer is reused, so a message's buffers are copied out of it (one
    copy) — unless it had to grow past 1 MiB, in which case they are views of it and the reader
    starts afresh.
    """

    __slots__ = ("_buf", "_got", "_header", "_sizes", "_end", "_total", "fds")

    def __init__(self):
        self._buf = bytearray(_FIRST_READ)
        self.fds: list[int] = []  # descriptors received with the frame (see receive_with_fds)
        self.reset()

    def reset(self) -> None:
        """Forget a partly read frame."""
        self._got = 0
        self._header: dict | None = None
        self._sizes: list[int] = []
        self._end = self._total = 0

    @property
    def idle(self) -> bool:
        """Nothing of a frame has arrived yet."""
        return self._got == 0

    def space(self) -> memoryview:
        """Where the next ``recv_into`` writes."""
        return memoryview(self._buf)[self._got :]

    def receive(self, sock: socket.socket) -> tuple[dict, list] | None:
        """One ``recv`` from ``sock``; the message once it is complete.

        Raises ``ConnectionClosed`` when the peer closed between frames, ``ConnectionError``
        when it closed inside one or broke the framing.
        """
        return self._received(sock.recv_into(self.space()))

    def receive_with_fds(self, sock: socket.socket) -> tuple[dict, list] | None:
        """As :meth:`receive`, also collecting file descriptors sent along into :attr:`fds`.

        The caller owns the descriptors: it takes them from ``fds`` and closes them.
        """
        n, ancillary, flags, _ = sock.recvmsg_into([self.space()], _FD_SPACE)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = arrays.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if flags & _MSG_CTRUNC:
            raise ConnectionError("more file descriptors than one region's sent with an IPC message")
        return self._received(n)

    def _received(self, n: int) -> tuple[dict, list] | None:
        if n == 0:
            if self.idle:
                raise ConnectionClosed("peer closed the connection")
            raise ConnectionError("connection closed in the middle of a message")
        return self.advance(n)

    def advance(self, n: int) -> tuple[dict, list] | None:
        """Account for ``n`` received bytes; the message once it is complete."""
        self._got += n
        if self._header is None:
            if self._got < _LEN.size:
                return None
            head_len = _LEN.unpack_from(self._buf)[0]
            if head_len > MAX_HEADER:
                raise ConnectionError(f"IPC header of {head_len} bytes exceeds the limit")
            self._end = _LEN.size + head_len
            if self._got < self._end:
                self._room(self._end)
                return None
            self._header, self._sizes = _parse_header(memoryview(self._buf)[_LEN.size : self._end])
            self._total = self._end + sum(self._sizes)
            self._room(self._total)
        if self._got < self._total:
            return None
        if self._got > self._total:
            raise ConnectionError("bytes beyond the end of an IPC message")
        view, pos = memoryview(self._buf), self._end
        keep = len(self._buf) <= _KEEP_MAX
        buffers = []
        for size in self._sizes:
            part = view[pos : pos + size]
            buffers.append(bytearray(part) if keep else part)
            pos += size
        header = self._header
        self.reset()
        if not keep:
            self._buf = bytearray(_FIRST_READ)
        return header, buffers

    def _room(self, size: int) -> None:
        if len(self._buf) < size:
            try:
                grown = bytearray(size)
            except (MemoryError, OverflowError):  # a size no memory holds: only this connection fails
                raise ConnectionError(f"an IPC message of {size} bytes cannot be held") from None
            grown[: self._got] = memoryview(self._buf)[: self._got]
            self._buf = grown


_FD_SPACE = socket.CMSG_SPACE(arrays.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: an IntFlag's ``&`` runs enum code per call
SHM_ALIGN = 64
#: the smallest message (sum of its buffers) a client sends through its shared region; smaller
#: ones cost less through the socket than the bookkeeping would (Settings.ipc_shm_min_bytes)
SHM_MIN_BYTES = 64 * 1024
_SHM_FIRST = 1 << 20


def shm_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Where buffers of these sizes lie in a region (64-byte aligned), and the bytes they span."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // SHM_ALIGN) * SHM_ALIGN
    return offsets, end


def shm_supported() -> bool:
    """Whether this platform can share a region between processes (Linux memfd)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "SCM_RIGHTS")


class SharedRegion:
    """The client's side of one connection's shared memory: written before each large message.

    The client writes the region only while it has no message in flight on the connection
    (one at a time, answer before the next), so the host never reads a region being rewritten.
    A connection that is dropped drops its region with it: a host still reading the old one
    for an abandoned request keeps its own mapping, which nothing writes any more.
    """

    def __init__(self, size: int):
        self.size = max(_SHM_FIRST, 1 << (size - 1).bit_length())
        self.fd = os.memfd_create("onebox-ipc", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        except OSError:
            os.close(self.fd)
            raise
        self.attached = False  # the host has the descriptor

    def place(self, views: list, offsets: list[int]) -> None:
        """Copy byte views (or :class:`Joined` parts, end to end) into the region at the offsets
        :func:`shm_layout` gave for them."""
        for view, offset in zip(views, offsets, strict=True):
            for part in view.parts if isinstance(view, Joined) else (view,):
                self.map[offset : offset + part.nbytes] = part
                offset += part.nbytes

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def map_region(fd: int) -> mmap.mmap:
    """The host's mapping of a client's region (the descriptor is closed: the mapping stays)."""
    try:
        size = os.fstat(fd).st_size
        if size <= 0:
            raise ConnectionError("an empty shared region was sent")
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def region_buffers(region: mmap.mmap | None, sizes: object) -> list[memoryview]:
    """Views of the buffers a ``"shm": sizes`` header puts in ``region`` (checked, no copy)."""
    if region is None:
        raise ConnectionError("an IPC message refers to a shared region that was never sent")
    if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes):
        raise ConnectionError("malformed IPC header: shm must be a list of buffer sizes")
    offsets, end = shm_layout(sizes)
    if end > len(region):
        raise ConnectionError(f"IPC buffers of {end} bytes exceed the shared region ({len(region)} bytes)")
    view = memoryview(region)
    return [view[offset : offset + size] for offset, size in zip(offsets, sizes, strict=True)]


def _make_header_codec():
    """What encodes and decodes headers: ``json`` without its per-call set-up where it can.

    ``json.dumps`` with separators builds an encoder on every call, and ``json.loads`` detects
    the encoding and matches whitespace around the value; for a header of a few hundred bytes
    that is much of the time (5.7 against 3.2 µs to read a request's, 3.9 against 2.9 to write
    one on the 2-core VM), paid twice a call on each side. The C encoder and scanner are built
    once here, and checked to give what ``json`` gives; without them ``json`` is used.
    """
    from json.encoder import c_make_encoder, encode_basestring_ascii

    def slow_dump(header: dict) -> bytes:
        return json.dumps(header, separators=(",", ":")).encode()

    def slow_load(raw: memoryview) -> object:
        return json.loads(bytes(raw))

    def unencodable(value):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    scan = json.JSONDecoder().scan_once
    try:
        encode = c_make_encoder(
            None, unencodable, encode_basestring_ascii, None, ":", ",", False, False, True
        )
    except TypeError:  # no C encoder, or another signature
        return slow_dump, slow_load

    def dump(header: dict) -> bytes:
        return "".join(encode(header, 0)).encode()

    def load(raw: memoryview) -> object:
        text = str(raw, "utf-8")
        try:
            value, end = scan(text, 0)
            if end == len(text):
                return value
        except StopIteration:  # nothing that starts a value here: json says what is wrong
            pass
        return json.loads(text)  # whitespace around the value, extra data: as json reads it

    sample = {"op": "infer", "é": ["\n", 1.5, -2, None, True], "shape": [1, 3], "t": 1e300}
    if dump(sample) != slow_dump(sample) or load(memoryview(slow_dump(sample))) != sample:
        return slow_dump, slow_load
    return dump, load


#: ``dump_header(dict) -> bytes`` and ``load_header(bytes-like) -> object``: compact JSON
dump_header, load_header = _make_header_codec()


def _parse_header(raw: memoryview) -> tuple[dict, list[int]]:
    """The JSON header and its buffer sizes; a malformed one breaks only its connection."""
    try:
        header = load_header(raw)
    except (ValueError, RecursionError) as exc:
        raise ConnectionError(f"malformed IPC header: {exc}") from None
    sizes = header.pop("buffers", []) if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes):
        raise ConnectionError("malformed IPC header: not an object with a list of buffer sizes")
    return header, sizes


def tune(sock: socket.socket) -> socket.socket:
    """Ask for large socket buffers on an IPC connection."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
    return sock


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


def decode_tensors(specs: list[dict], buffers: list) -> Tensors:
    """Named arrays viewing the received buffers (no copy)."""
    if len(specs) != len(buffers):
        raise ConnectionError("tensor specs and buffers do not match")
    tensors: Tensors = {}
    for spec, buf in zip(specs, buffers, strict=True):
        tensors[spec["name"]] = np.frombuffer(buf, dtype=_wire_dtype(spec["dtype"])).reshape(spec["shape"])
    return tensors


_DTYPES: dict[str, np.dtype] = {}  # the wire dtypes seen, by their string


def _wire_dtype(name: object) -> np.dtype:
    """The dtype a spec names, once it is known to be allowed on the wire."""
    if not isinstance(name, str):
        raise ConnectionError(f"tensor spec with dtype {name!r}, not a dtype string")
    dtype = _DTYPES.get(name)
    if dtype is None:
        try:
            dtype = np.dtype(name)
        except TypeError as exc:
            raise ConnectionError(f"tensor spec with dtype {name!r}: {exc}") from None
        if dtype.kind not in _WIRE_KINDS:
            raise ConnectionError(f"dtype {dtype} is not allowed on the wire")
        if len(_DTYPES) < 256:
            _DTYPES[name] = dtype
    return dtype
