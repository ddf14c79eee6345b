"""The host side of the IPC: accept frontend connections and answer their messages.

One thread per connection: a frontend thread holds one connection and sends one message at a
time. A connection thread answers most messages itself; for model calls the dispatch returns a
:class:`Pending` and the batcher thread that finishes the batch sends the reply, while the
connection thread goes back to reading.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future

from serving.errors import ModelError, ServingError
from serving.ipc.protocol import ConnectionClosed, recv_message, send_message, tune

log = logging.getLogger(__name__)

Dispatch = Callable[[dict, list], "tuple[dict, list] | Pending"]


def error_reply(err: ServingError) -> dict:
    """The header a host sends back for an error: status and message, never the class."""
    return {"ok": False, "status": int(err.status), "message": err.message, "headers": err.headers}


class IPCServer:
    """Serves ``dispatch(header, buffers) -> (header, buffers)`` on a Unix socket."""

    def __init__(self, path: str, dispatch: Dispatch):
        self.path = path
        self.dispatch = dispatch
        if os.path.exists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(1024)
        self._closed = threading.Event()

    def serve_forever(self) -> None:
        """Accept connections until :meth:`close`."""
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                raise
            threading.Thread(target=self._serve_connection, args=(tune(conn),), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        link = _Link(conn)
        try:
            while True:
                try:
                    header, buffers = recv_message(conn)
                except ConnectionClosed:
                    return
                except (ConnectionError, OSError, ValueError) as exc:
                    log.debug("dropping IPC connection: %s", exc)
                    return
                answer = self._answer(header, buffers)
                if isinstance(answer, Pending):
                    link.send_when_done(answer, header.get("op"))
                elif not link.send(*answer):
                    return  # the frontend gave up (deadline) and closed the socket
        finally:
            link.close()

    def _answer(self, header: dict, buffers: list) -> tuple[dict, list] | Pending:
        try:
            answer = self.dispatch(header, buffers)
        except Exception as exc:
            return _failure(exc, header.get("op"))
        if isinstance(answer, Pending):
            return answer
        reply, out = answer
        return {"ok": True, **reply}, out

    def close(self) -> None:
        """Stop accepting; existing connections finish their current message."""
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


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
    """One frontend connection; replies may be sent by another thread than the reading one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._pending = False
        self._closing = False

    def send(self, header: dict, buffers: list) -> bool:
        try:
            send_message(self.sock, header, buffers)
            return True
        except OSError:
            return False

    def send_when_done(self, pending: Pending, op: str | None) -> None:
        # the frontend sends its next message only after this reply, so one is pending at most
        with self._lock:
            self._pending = True
        pending.future.add_done_callback(lambda future: self._finish(pending, future, op))

    def _finish(self, pending: Pending, future: Future, op: str | None) -> None:
        try:
            reply, out = pending.finish(future.result())
            answer = {"ok": True, **reply}, out
        except Exception as exc:
            answer = _failure(exc, op)
        with self._lock:
            self._pending = False
            if not self._closing:
                self.send(*answer)
                return
        self.sock.close()  # the reading thread left while this reply was being computed

    def close(self) -> None:
        """Close now, or after the pending reply when one is being computed."""
        with self._lock:
            self._closing = True
            if self._pending:
                return
        self.sock.close()


def _failure(exc: Exception, op: str | None) -> tuple[dict, list]:
    if isinstance(exc, ServingError):
        return error_reply(exc), []
    # a bug in the host: log the traceback, tell the client only that it failed
    log.error("unexpected error handling IPC op %r", op, exc_info=exc)
    return error_reply(ModelError("internal error in the model host")), []
