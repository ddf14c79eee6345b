"""Exceptions that carry their HTTP status.

Every error a client can see is a ``ServingError``. The HTTP layer renders it as
``{"error": {"type": ..., "message": ...}}``; the IPC layer sends only its status and
message, and the receiving side rebuilds the matching class with :func:`from_status`.
No web framework is imported here.
"""

from __future__ import annotations

from http import HTTPStatus


class ServingError(Exception):
    """Base class: an error with an HTTP status and a message safe to show a client."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    @property
    def type_name(self) -> str:
        """The short name shown to clients, e.g. ``BadRequest``."""
        return type(self).__name__

    def to_dict(self) -> dict:
        """The JSON error body."""
        return {"error": {"type": self.type_name, "message": self.message}}


class BadRequest(ServingError):
    status = HTTPStatus.BAD_REQUEST


class NotFound(ServingError):
    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(ServingError):
    status = HTTPStatus.METHOD_NOT_ALLOWED


class NotAcceptable(ServingError):
    status = HTTPStatus.NOT_ACCEPTABLE


class Conflict(ServingError):
    status = HTTPStatus.CONFLICT


class PayloadTooLarge(ServingError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(ServingError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class QueueFull(ServingError):
    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str, *, retry_after: int = 1, headers: dict[str, str] | None = None):
        super().__init__(message, headers={"Retry-After": str(retry_after), **(headers or {})})


class ModelError(ServingError):
    """The model (or the user's script) raised while handling the request."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class NotReady(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class DeadlineExceeded(ServingError):
    status = HTTPStatus.GATEWAY_TIMEOUT


class InsufficientMemory(ServingError):
    status = HTTPStatus.INSUFFICIENT_STORAGE


class ConfigError(Exception):
    """A setting or model configuration is invalid; start-up stops with exit code 2."""


class UserCodeError(ServingError):
    """An error raised by user code with its own status (inference-toolkit style)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = HTTPStatus(status) if status in HTTPStatus._value2member_map_ else status  # type: ignore[assignment]


_BY_STATUS: dict[int, type[ServingError]] = {
    cls.status.value: cls
    for cls in (
        BadRequest,
        NotFound,
        MethodNotAllowed,
        NotAcceptable,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        QueueFull,
        ModelError,
        NotReady,
        DeadlineExceeded,
        InsufficientMemory,
    )
}


def from_status(status: int, message: str, headers: dict[str, str] | None = None) -> ServingError:
    """Rebuild an error received over IPC: the class for a known status, else ``UserCodeError``."""
    cls = _BY_STATUS.get(int(status))
    if cls is None:
        return UserCodeError(int(status), message)
    err = cls.__new__(cls)
    ServingError.__init__(err, message, headers=headers)
    return err


def status_code(err: ServingError) -> int:
    """The integer status of an error (works for non-standard user statuses too)."""
    return int(err.status)
