"""The frontend side of the IPC: typed calls to a model host, each with a deadline.

Each thread (each greenlet, under the gevent worker) keeps its own connection to each host, so a
call never waits for another's answer and answers can never be mixed up. A call that times out
or breaks closes its connection: a late answer is dropped with the socket instead of reaching
the next call.
Large request buffers go through the connection's shared region (protocol.SharedRegion), which
is dropped with the connection too.
"""

from __future__ import annotations

import socket
import threading
import time

from serving.errors import DeadlineExceeded, NotReady, from_status
from serving.ipc.protocol import (
    SHM_MIN_BYTES,
    ConnectionClosed,
    FrameReader,
    SharedRegion,
    decode_tensors,
    encode_tensors,
    recv_message,
    send_message,
    shm_layout,
    shm_supported,
    tune,
)
from serving.types import RawRequest, RawResponse, Tensors


class HostClient:
    """Calls one model host over its Unix socket."""

    def __init__(self, socket_path: str, name: str = "host", shm_min_bytes: int | None = SHM_MIN_BYTES):
        """``shm_min_bytes``: buffers of a message from this many bytes on go through shared
        memory (None or 0: always through the socket)."""
        self.socket_path = socket_path
        self.name = name
        self.shm_min_bytes = shm_min_bytes if shm_min_bytes and shm_supported() else None
        self._local = threading.local()
        self._outstanding = 0  # calls in flight from this process, for least-loaded routing
        self._lock = threading.Lock()

    @property
    def outstanding(self) -> int:
        """Calls this process has in flight to the host."""
        return self._outstanding

    # -- typed calls ---------------------------------------------------------------------
    def infer(self, model: str, inputs: Tensors, deadline: float) -> Tensors:
        """Run decoded tensors through ``model``; returns its named outputs."""
        specs, buffers = encode_tensors(inputs)
        header, out = self.call({"op": "infer", "model": model, "inputs": specs}, buffers, deadline)
        return decode_tensors(header["outputs"], out)

    def invoke(self, model: str, request: RawRequest, deadline: float) -> RawResponse:
        """Pass an undecoded request to a user-script model."""
        header = {
            "op": "invoke",
            "model": model,
            "content_type": request.content_type,
            "accept": request.accept,
            "custom_attributes": request.custom_attributes,
        }
        reply, out = self.call(header, [request.body], deadline)
        return RawResponse(bytes(out[0]), reply["content_type"], reply.get("custom_attributes"))

    def describe(self, model: str, deadline: float) -> dict:
        """How ``model`` wants to be called: ``{"raw": bool, "signature": {...}, ...}``."""
        return self.call({"op": "describe", "model": model}, [], deadline)[0]

    def health(self, deadline: float) -> dict:
        """``{"ready": bool, "models": [...]}`` from the host."""
        return self.call({"op": "health"}, [], deadline)[0]

    def stats(self, deadline: float) -> dict:
        """``{"models": {name: {"batches", "rows", "padding", "requests", "sizes"}}}``: what each
        model ran (``sizes``: batches run at each padded size)."""
        return self.call({"op": "stats"}, [], deadline)[0]

    def load(self, model: str, path: str, deadline: float) -> dict:
        """Load the model directory ``path`` under the name ``model``."""
        return self.call({"op": "load", "model": model, "path": path}, [], deadline)[0]

    def unload(self, model: str, deadline: float) -> dict:
        """Unload ``model`` once its in-flight requests are done."""
        return self.call({"op": "unload", "model": model}, [], deadline)[0]

    # -- transport -----------------------------------------------------------------------
    def call(self, header: dict, buffers: list, deadline: float) -> tuple[dict, list]:
        """Send one message and wait for its answer until ``deadline`` (``time.time()`` seconds)."""
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the model")
        with self._lock:
            self._outstanding += 1
        try:
            return self._call(header, buffers, deadline, remaining)
        finally:
            with self._lock:
                self._outstanding -= 1

    def _call(self, header: dict, buffers: list, deadline: float, remaining: float):
        sock = self._connection()
        try:
            sock.settimeout(remaining)
            self._send(sock, {**header, "deadline": deadline}, buffers)
            reply, out = recv_message(sock, self._local.reader)
        except TimeoutError:
            self._drop()
            raise DeadlineExceeded(
                f"no answer from the model within the deadline ({remaining:.1f}s)"
            ) from None
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            self._drop()
            raise NotReady(f"the model host is not reachable ({exc.__class__.__name__})") from None
        if not reply.get("ok"):
            raise from_status(reply.get("status", 500), reply.get("message", "error"), reply.get("headers"))
        return reply, out

    def _send(self, sock: socket.socket, header: dict, buffers: list) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        sizes = [v.nbytes for v in views]
        if self.shm_min_bytes is None or sum(sizes) < self.shm_min_bytes:
            send_message(sock, header, views)
            return
        offsets, end = shm_layout(sizes)
        region = self._region(end)
        region.place(views, offsets)
        send_message(sock, {**header, "shm": sizes}, fds=() if region.attached else [region.fd])
        region.attached = True

    def _region(self, size: int) -> SharedRegion:
        """This thread's region for its connection, grown (replaced) when too small."""
        region = getattr(self._local, "region", None)
        if region is None or region.size < size:
            if region is not None:
                region.close()  # the host keeps its own mapping for as long as it needs it
            region = self._local.region = SharedRegion(size)
        return region

    def _connection(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = tune(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise NotReady(f"the model host is not reachable ({exc.strerror or exc})") from None
            self._local.sock = sock
            self._local.reader = FrameReader()  # per connection: greenlets may share a thread
        return sock

    def _drop(self) -> None:
        sock = getattr(self._local, "sock", None)
        self._local.sock = None
        if sock is not None:
            sock.close()
        region = getattr(self._local, "region", None)
        self._local.region = None  # a late reader of the old region must not see new requests
        if region is not None:
            region.close()

    def close(self) -> None:
        """Close this thread's connection."""
        self._drop()
