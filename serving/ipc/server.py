"""The host side of the IPC: accept frontend connections and answer their messages.

One I/O thread reads every connection through ``epoll``: frames are assembled as bytes arrive,
and a model call is handed to its batcher without leaving that thread (``nowait``). The reply
is sent by whichever thread finishes the work — the batcher thread for a model call (see
:class:`Pending`), a worker thread for calls that may block (loading, user scripts, a model
timeout shorter than the request's). A frontend thread holds one connection and sends one
message at a time, so each connection has at most one message in progress.

Why not a thread per connection: with a few hundred frontend threads, every received request
woke its own host thread, which then queued for the GIL behind the batch being formed and the
replies being sent; the H100 served 2.3-2.8k img/s with the GPU 20% busy and the host using
1.5 of 16 cores (benchmarks/RESULTS.md). One reader keeps the GIL hand-offs per request at one.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from serving.errors import ModelError, NotReady, ServingError
from serving.ipc.protocol import (
    ConnectionClosed,
    FrameReader,
    map_region,
    region_buffers,
    send_message,
    tune,
)

log = logging.getLogger(__name__)

Dispatch = Callable[[dict, list], "tuple[dict, list] | Pending"]
#: answers a message without blocking (a Pending), or None when it must go to a worker thread
NoWait = Callable[[dict, list], "Pending | None"]
#: told of each shared region the host maps; returns what to call once no message reads it any
#: more (its connection closed, or a larger region replaced it), or None
OnRegion = Callable[[mmap.mmap], "Callable[[], None] | None"]

#: how long a reply may wait for room in a frontend's socket before the connection is dropped
SEND_TIMEOUT_S = 60.0


def error_reply(err: ServingError) -> dict:
    """The header a host sends back for an error: status and message, never the class."""
    return {"ok": False, "status": int(err.status), "message": err.message, "headers": err.headers}


class IPCServer:
    """Serves ``dispatch(header, buffers) -> (header, buffers)`` on a Unix socket.

    ``nowait(header, buffers)``, when given, is tried first on the I/O thread; it returns a
    :class:`Pending` or None, and must never block. Everything else runs on worker threads.
    ``on_region(mapping)`` is told of each frontend region mapped (a CUDA host registers it:
    handlers.host_memory); the function it returns is called once no message reads it any more.
    """

    def __init__(
        self,
        path: str,
        dispatch: Dispatch,
        nowait: NoWait | None = None,
        workers: int = 1024,
        on_region: OnRegion | None = None,
    ):
        self.path = path
        self.dispatch = dispatch
        self.nowait = nowait
        self.on_region = on_region
        if os.path.exists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(1024)
        self._sock.setblocking(False)
        self._closed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ipc-worker")

    def serve_forever(self) -> None:
        """Read and answer connections until :meth:`close`."""
        poller = select.epoll()
        links: dict[int, tuple[_Link, FrameReader]] = {}  # by file descriptor
        try:
            listen_fd = self._sock.fileno()
            poller.register(listen_fd, select.EPOLLIN)
            poller.register(self._wake_r.fileno(), select.EPOLLIN)
        except (ValueError, OSError):
            poller.close()
            if self._closed.is_set():
                return  # closed before it started
            raise
        try:
            while not self._closed.is_set():
                for fd, _ in poller.poll():
                    entry = links.get(fd)
                    if entry is not None:
                        self._on_readable(poller, links, fd, *entry)
                    elif fd == listen_fd:
                        self._accept(poller, links)
        finally:
            for link, _ in links.values():
                link.close()
            poller.close()
            self._wake_r.close()

    def _accept(self, poller: select.epoll, links: dict) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if self._closed.is_set():
                return
            raise
        # timeout mode: reads happen only when epoll says so; sends from other threads wait
        # for room in the socket, up to SEND_TIMEOUT_S
        conn.settimeout(SEND_TIMEOUT_S)
        fd = tune(conn).fileno()
        links[fd] = (_Link(conn, self.on_region), FrameReader())
        poller.register(fd, select.EPOLLIN)

    def _on_readable(
        self, poller: select.epoll, links: dict, fd: int, link: _Link, reader: FrameReader
    ) -> None:
        try:
            message = reader.receive_with_fds(link.sock)
            if message is not None:
                message = link.resolve(*message, reader)
        except (ConnectionError, OSError) as exc:
            if not isinstance(exc, ConnectionClosed):
                log.debug("dropping IPC connection: %s", exc)
            for extra in reader.fds:
                os.close(extra)
            reader.fds.clear()
            # forgotten before the socket closes: its descriptor number may be reused at once
            poller.unregister(fd)
            del links[fd]
            link.close()
            return
        if message is not None:
            self._answer(link, *message)

    def _answer(self, link: _Link, header: dict, buffers: list) -> None:
        op = header.get("op")
        if self.nowait is not None:
            try:
                pending = self.nowait(header, buffers)
            except Exception as exc:
                link.send(*_failure(exc, op))
                return
            if pending is not None:
                link.send_when_done(pending, op)
                return
        link.hold()
        try:
            self._pool.submit(self._answer_blocking, link, header, buffers)
        except RuntimeError:  # closing: the worker pool takes no more work
            link.deliver(_failure(NotReady("the model host is shutting down"), op))

    def _answer_blocking(self, link: _Link, header: dict, buffers: list) -> None:
        op = header.get("op")
        try:
            answer = self.dispatch(header, buffers)
        except Exception as exc:
            link.deliver(_failure(exc, op))
            return
        if isinstance(answer, Pending):
            link.send_held_when_done(answer, op)  # still owed: the batcher's thread sends it
            return
        reply, out = answer
        link.deliver(({"ok": True, **reply}, out))

    def close(self) -> None:
        """Stop reading; replies being computed are still sent."""
        self._closed.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._wake_w.close()
        self._sock.close()
        self._pool.shutdown(wait=False)


class Pending:
    """A reply that is not ready yet: ``finish(future.result())`` gives its ``(header, buffers)``.

    A dispatch returns one so that the thread completing ``future`` (a batcher) sends the reply
    itself: the connection's thread is not woken just to pass the answer on, which on a busy
    machine costs as much as the rest of the host's work for a small request.
    """

    __slots__ = ("future", "finish")

    def __init__(self, future: Future, finish: Callable[[object], tuple[dict, list]]):
        self.future = future
        self.finish = finish


class _Link:
    """One frontend connection; replies are sent by whichever thread finishes the work."""

    def __init__(self, sock: socket.socket, on_region: OnRegion | None = None):
        self.sock = sock
        self._lock = threading.Lock()  # guards _pending and _closing, never held across a send
        self._pending = 0  # replies owed: the last one's send may still be returning
        self._closing = False
        self._region = None  # the frontend's shared memory (protocol.SharedRegion), mapped
        self._on_region = on_region
        self._release: Callable[[], None] | None = None  # what on_region returned for _region

    def resolve(self, header: dict, buffers: list, reader: FrameReader) -> tuple[dict, list]:
        """The message with its buffers: from the socket, or views of the connection's region."""
        fds, reader.fds = reader.fds, []
        if fds:  # a new (or larger) region for this connection; the old mapping goes with its views
            for extra in fds[:-1]:
                os.close(extra)
            self._region = map_region(fds[-1])
            # the previous message's reply was sent before this one came: nothing reads the old
            # region any more
            self._release_region()
            if self._on_region is not None:
                try:
                    self._release = self._on_region(self._region)
                except Exception:  # the region is read as it is, unregistered
                    log.exception("registering a shared region failed")
        if "shm" in header:
            buffers = region_buffers(self._region, header.pop("shm"))
        return header, buffers

    def send(self, header: dict, buffers: list) -> bool:
        try:
            send_message(self.sock, header, buffers)
            return True
        except OSError:
            return False

    def hold(self) -> None:
        """A reply is being computed: a close now waits for it (see :meth:`deliver`)."""
        with self._lock:
            self._pending += 1

    def deliver(self, answer: tuple[dict, list]) -> None:
        """Send the owed reply, or drop it if the frontend left while it was computed; the last
        owed reply after a close closes the socket.

        The send is made outside the lock: the frontend's next message can come as soon as the
        reply's bytes are in the kernel, before ``sendmsg`` has returned here, and the reader
        holding it must not wait for this thread (a py-spy ``--gil`` profile had the reader
        spending a sixth of its time in :meth:`hold`). Two sends never overlap on one socket: the
        frontend sends a message only after the whole previous reply has reached it.
        """
        with self._lock:
            closing = self._closing
        if not closing:
            self.send(*answer)
        with self._lock:
            self._pending -= 1
            if self._pending or not self._closing:
                return
        self.sock.close()
        self._release_region()

    def send_when_done(self, pending: Pending, op: str | None) -> None:
        """Owe a reply and send it when ``pending`` finishes."""
        self.hold()
        self.send_held_when_done(pending, op)

    def send_held_when_done(self, pending: Pending, op: str | None) -> None:
        """Send the reply already owed (:meth:`hold`) when ``pending`` finishes."""
        pending.future.add_done_callback(partial(self._finish, pending, op))

    def _finish(self, pending: Pending, op: str | None, future: Future) -> None:
        try:
            reply, out = pending.finish(future.result())
            answer = {"ok": True, **reply}, out
        except Exception as exc:
            answer = _failure(exc, op)
        self.deliver(answer)

    def close(self) -> None:
        """Close now, or after the pending reply when one is being computed."""
        with self._lock:
            self._closing = True
            if self._pending:
                return
        self.sock.close()
        self._release_region()

    def _release_region(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            try:
                release()
            except Exception:  # the region stays registered: a leak, never a crash
                log.exception("releasing a shared region failed")


def _failure(exc: Exception, op: str | None) -> tuple[dict, list]:
    if isinstance(exc, ServingError):
        return error_reply(exc), []
    # a bug in the host: log the traceback, tell the client only that it failed
    log.error("unexpected error handling IPC op %r", op, exc_info=exc)
    return error_reply(ModelError("internal error in the model host")), []
