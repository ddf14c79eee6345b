"""The host side of the IPC: accept frontend connections and answer their messages.

One thread per connection: a frontend thread holds one connection and sends one message at a
time, so a connection thread simply blocks in ``dispatch`` until its answer is ready (the
batcher lets many such threads share one batch).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from serving.errors import ModelError, ServingError
from serving.ipc.protocol import ConnectionClosed, recv_message, send_message

log = logging.getLogger(__name__)

Dispatch = Callable[[dict, list], tuple[dict, list]]


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
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    header, buffers = recv_message(conn)
                except ConnectionClosed:
                    return
                except (ConnectionError, OSError, ValueError) as exc:
                    log.debug("dropping IPC connection: %s", exc)
                    return
                reply, out = self._answer(header, buffers)
                try:
                    send_message(conn, reply, out)
                except OSError:
                    return  # the frontend gave up (deadline) and closed the socket

    def _answer(self, header: dict, buffers: list) -> tuple[dict, list]:
        try:
            reply, out = self.dispatch(header, buffers)
            return {"ok": True, **reply}, out
        except ServingError as err:
            return error_reply(err), []
        except Exception:  # a bug in the host: log the traceback, tell the client only that it failed
            log.exception("unexpected error handling IPC op %r", header.get("op"))
            return error_reply(ModelError("internal error in the model host")), []

    def close(self) -> None:
        """Stop accepting; existing connections finish their current message."""
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
