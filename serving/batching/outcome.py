"""The result of one queued request: what ``concurrent.futures.Future`` offers, made lighter.

A busy GPU host settles thousands of these a second. ``Future`` builds a ``Condition`` (an
RLock and a waiter list) for each one and takes it three times on the way from the batcher to
the reply; an :class:`Outcome` holds one plain lock and makes an ``Event`` only when a thread
actually blocks on the result, which on the I/O thread's path none does.

Same contract as ``Future`` for what the server uses: ``set_running_or_notify_cancel``,
``cancel``, ``cancelled``, ``done``, ``set_result``, ``set_exception``, ``add_done_callback``,
``result`` and ``exception`` (with the same ``CancelledError``, ``TimeoutError`` and
``InvalidStateError``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, InvalidStateError

log = logging.getLogger(__name__)

_PENDING, _RUNNING, _CANCELLED, _DONE = range(4)


class Outcome:
    """A one-shot result or error, settled by one thread and read by any."""

    __slots__ = ("_state", "_result", "_error", "_callbacks", "_waiter", "_lock")

    def __init__(self):
        self._state = _PENDING
        self._result = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Outcome], object]] | None = None
        self._waiter: threading.Event | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Outcome {('pending', 'running', 'cancelled', 'done')[self._state]}>"

    # -- the batcher's side --------------------------------------------------------------
    def set_running_or_notify_cancel(self) -> bool:
        """Mark it running: False when it was cancelled first (it must not run then)."""
        with self._lock:
            if self._state == _CANCELLED:
                return False
            if self._state != _PENDING:
                raise RuntimeError(f"outcome already {self!r}")
            self._state = _RUNNING
            return True

    def set_result(self, result: object) -> None:
        self._settle(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, result: object, error: BaseException | None) -> None:
        with self._lock:
            if self._state in (_CANCELLED, _DONE):
                raise InvalidStateError(f"{self!r} is already settled")
            self._result, self._error, self._state = result, error, _DONE
            callbacks, self._callbacks = self._callbacks, None
            if self._waiter is not None:
                self._waiter.set()
        self._run(callbacks)

    # -- the caller's side ---------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel unless it already runs or ran; True when it is cancelled."""
        with self._lock:
            if self._state in (_RUNNING, _DONE):
                return False
            if self._state == _CANCELLED:
                return True
            self._state = _CANCELLED
            callbacks, self._callbacks = self._callbacks, None
            if self._waiter is not None:
                self._waiter.set()
        self._run(callbacks)
        return True

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def done(self) -> bool:
        return self._state in (_CANCELLED, _DONE)

    def add_done_callback(self, fn: Callable[[Outcome], object]) -> None:
        """Call ``fn(self)`` once settled: at once when it already is, else on the settling thread."""
        with self._lock:
            if self._state not in (_CANCELLED, _DONE):
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._run([fn])

    def result(self, timeout: float | None = None) -> object:
        """The result, raising the error it settled with; TimeoutError after ``timeout`` seconds."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error it settled with, or None."""
        self._wait(timeout)
        return self._error

    def _wait(self, timeout: float | None) -> None:
        if self._state != _DONE:
            with self._lock:
                if self._state not in (_CANCELLED, _DONE) and self._waiter is None:
                    self._waiter = threading.Event()
                waiter = self._waiter
            if waiter is not None:
                waiter.wait(timeout)
            if self._state == _CANCELLED:
                raise CancelledError()
            if self._state != _DONE:
                raise TimeoutError()

    def _run(self, callbacks: list | None) -> None:
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:
                log.exception("a callback of %r failed", self)
