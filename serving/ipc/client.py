"""The frontend side of the IPC: typed calls to a model host, each with a deadline.

A :class:`Link` is one connection to a host with one message in flight at a time. Blocking
callers (``HostClient.call``) keep one link per thread (per greenlet under gevent), so a call
never waits for another's answer and answers can never be mixed up; the event-loop worker
(serving.http.loop) borrows idle links from :meth:`HostClient.acquire` and reads their answers
when its epoll says so. A call that times out or breaks closes its link: a late answer is
dropped with the socket instead of reaching the next call.
Large request buffers go through the link's shared region (protocol.SharedRegion), which is
dropped with the link too. A link's region is made as large as the largest message any link of
its :class:`HostClient` has sent so far: a CUDA host registers each region it is sent (pins it,
and unregisters the one it replaces, waiting for the device), so links whose calls vary in size
would otherwise keep replacing their regions, one power of two at a time, long into serving.
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
    byte_views,
    decode_tensors,
    encode_tensors,
    recv_message,
    send_message,
    shm_layout,
    shm_supported,
    tune,
)
from serving.types import RawRequest, RawResponse, Tensors


# -- messages: what a call sends and how its answer reads --------------------------------------
def infer_message(model: str, inputs: Tensors) -> tuple[dict, list]:
    """Header and buffers of an ``infer`` call with decoded tensors."""
    specs, buffers = encode_tensors(inputs)
    return {"op": "infer", "model": model, "inputs": specs}, buffers


def infer_result(reply: dict, buffers: list) -> Tensors:
    """The named outputs of an ``infer`` answer."""
    return decode_tensors(reply["outputs"], buffers)


def invoke_message(model: str, request: RawRequest) -> tuple[dict, list]:
    """Header and buffers of an ``invoke`` call (an undecoded request for a user script)."""
    header = {
        "op": "invoke",
        "model": model,
        "content_type": request.content_type,
        "accept": request.accept,
        "custom_attributes": request.custom_attributes,
    }
    return header, [request.body]


def invoke_result(reply: dict, buffers: list) -> RawResponse:
    """The user script's answer."""
    return RawResponse(bytes(buffers[0]), reply["content_type"], reply.get("custom_attributes"))


def check_reply(reply: dict) -> dict:
    """The reply, or the error it carries raised as a :class:`ServingError`."""
    if not reply.get("ok"):
        raise from_status(reply.get("status", 500), reply.get("message", "error"), reply.get("headers"))
    return reply


class Link:
    """One connection to a host: send a message, then receive its answer, one at a time."""

    __slots__ = ("sock", "reader", "region", "shm_min_bytes", "largest", "used")

    def __init__(self, socket_path: str, shm_min_bytes: int | None, largest: list[int] | None = None):
        """``largest``: a one-item list shared by a client's links, the bytes of the largest
        message any of them placed in a region (a new region is made at least that large)."""
        sock = tune(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise NotReady(f"the model host is not reachable ({exc.strerror or exc})") from None
        self.sock = sock
        self.reader = FrameReader()  # per connection: greenlets may share a thread
        self.region: SharedRegion | None = None
        self.shm_min_bytes = shm_min_bytes
        self.largest = largest if largest is not None else [0]
        self.used = False  # a message went out on it: a send that fails now means the host went away

    def send(self, header: dict, buffers: list) -> None:
        """Send one message; buffers from ``shm_min_bytes`` in total go through the region."""
        views = byte_views(buffers)
        sizes = [v.nbytes for v in views]
        if self.shm_min_bytes is None or sum(sizes) < self.shm_min_bytes:
            send_message(self.sock, header, views)
            self.used = True
            return
        offsets, end = shm_layout(sizes)
        largest = self.largest
        largest[0] = max(largest[0], end)
        region = self.region
        if region is None or region.size < end:
            if region is not None:
                region.close()  # the host keeps its own mapping for as long as it needs it
            region = self.region = SharedRegion(largest[0])
        region.place(views, offsets)
        send_message(self.sock, {**header, "shm": sizes}, fds=() if region.attached else [region.fd])
        region.attached = True
        self.used = True

    def receive(self) -> tuple[dict, list] | None:
        """One ``recv``; the answer once it is whole (for callers told the socket is readable)."""
        return self.reader.receive(self.sock)

    def close(self) -> None:
        """Drop the connection and its region (a late reader of the region sees nothing new)."""
        self.sock.close()
        if self.region is not None:
            self.region.close()
            self.region = None


class HostClient:
    """Calls one model host over its Unix socket."""

    def __init__(self, socket_path: str, name: str = "host", shm_min_bytes: int | None = SHM_MIN_BYTES):
        """``shm_min_bytes``: buffers of a message from this many bytes on go through shared
        memory (None or 0: always through the socket)."""
        self.socket_path = socket_path
        self.name = name
        self.shm_min_bytes = shm_min_bytes if shm_min_bytes and shm_supported() else None
        self._local = threading.local()
        self._idle: list[Link] = []  # links of the event loop that have no call in flight
        self._outstanding = 0  # calls in flight from this process, for least-loaded routing
        self._lock = threading.Lock()
        self._largest = [0]  # bytes of the largest message a link placed in its region (Link)

    @property
    def outstanding(self) -> int:
        """Calls this process has in flight to the host."""
        return self._outstanding

    # -- typed calls ---------------------------------------------------------------------
    def infer(self, model: str, inputs: Tensors, deadline: float) -> Tensors:
        """Run decoded tensors through ``model``; returns its named outputs."""
        return infer_result(*self.call(*infer_message(model, inputs), deadline))

    def invoke(self, model: str, request: RawRequest, deadline: float) -> RawResponse:
        """Pass an undecoded request to a user-script model."""
        return invoke_result(*self.call(*invoke_message(model, request), deadline))

    def describe(self, model: str, deadline: float) -> dict:
        """How ``model`` wants to be called: ``{"raw": bool, "signature": {...}, ...}``."""
        return self.call({"op": "describe", "model": model}, [], deadline)[0]

    def health(self, deadline: float) -> dict:
        """``{"ready": bool, "models": [...]}`` from the host."""
        return self.call({"op": "health"}, [], deadline)[0]

    def stats(self, deadline: float) -> dict:
        """``{"models": {name: {"batches", "rows", "padding", "requests", "sizes", ...}}}``: what
        each model ran (``sizes``: batches run at each padded size) and where the host's time
        went (``queue_s``, ``build_s``, ``launch_s``, ``compute_s``, ``starved_s``, ``answer_s``)."""
        return self.call({"op": "stats"}, [], deadline)[0]

    def load(self, model: str, path: str, deadline: float) -> dict:
        """Load the model directory ``path`` under the name ``model``."""
        return self.call({"op": "load", "model": model, "path": path}, [], deadline)[0]

    def unload(self, model: str, deadline: float) -> dict:
        """Unload ``model`` once its in-flight requests are done."""
        return self.call({"op": "unload", "model": model}, [], deadline)[0]

    # -- blocking transport --------------------------------------------------------------
    def call(self, header: dict, buffers: list, deadline: float) -> tuple[dict, list]:
        """Send one message and wait for its answer until ``deadline`` (``time.time()`` seconds)."""
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the model")
        self.started()
        try:
            return self._call(header, buffers, deadline, remaining)
        finally:
            self.finished()

    def _call(self, header: dict, buffers: list, deadline: float, remaining: float):
        link = getattr(self._local, "link", None)
        if link is None:
            link = self._local.link = Link(self.socket_path, self.shm_min_bytes, self._largest)
        try:
            link.sock.settimeout(remaining)
            try:
                link.send({**header, "deadline": deadline}, buffers)
            except (ConnectionError, OSError) as exc:
                if isinstance(exc, TimeoutError) or not link.used:
                    raise
                # the host went away since this link's last call (it was restarted): nothing
                # of this message reached a host, so it goes once more on a new connection
                self._drop()
                link = self._local.link = Link(self.socket_path, self.shm_min_bytes, self._largest)
                link.sock.settimeout(remaining)
                link.send({**header, "deadline": deadline}, buffers)
            reply, out = recv_message(link.sock, link.reader)
        except TimeoutError:
            self._drop()
            raise DeadlineExceeded(
                f"no answer from the model within the deadline ({remaining:.1f}s)"
            ) from None
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            self._drop()
            raise NotReady(f"the model host is not reachable ({exc.__class__.__name__})") from None
        return check_reply(reply), out

    def _drop(self) -> None:
        link = getattr(self._local, "link", None)
        self._local.link = None
        if link is not None:
            link.close()

    def close(self) -> None:
        """Close this thread's connection."""
        self._drop()

    # -- for an event loop ---------------------------------------------------------------
    def started(self) -> None:
        """Count a call in flight (routing sends the next call to the least busy host)."""
        with self._lock:
            self._outstanding += 1

    def finished(self) -> None:
        """A call counted by :meth:`started` is over."""
        with self._lock:
            self._outstanding -= 1

    def acquire(self) -> Link:
        """An idle link for one call (a new one when all are busy); for one event-loop thread.

        Its socket does not block: receive when epoll says it is readable. A send waits only
        for a message larger than the socket's buffer (shared memory turned off), a link
        having one message in flight at a time.
        """
        if self._idle:
            return self._idle.pop()
        link = Link(self.socket_path, self.shm_min_bytes, self._largest)
        link.sock.setblocking(False)
        return link

    def forget_idle(self) -> None:
        """Close the idle links: the host they reach went away (a send on one of them failed)."""
        idle, self._idle = self._idle, []
        for link in idle:
            link.close()

    def release(self, link: Link) -> None:
        """Give back a link whose answer was read in full."""
        self._idle.append(link)
