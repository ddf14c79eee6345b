"""HTTP/1.1 bytes for the event-loop worker's fast path: read a request head, write a response head.

Only the shape the fast path answers itself is read here: ``POST /invocations`` (or a
multi-model endpoint's ``POST /models/<name>/invoke``, the name in URL-safe characters) with a
``Content-Length``, plain header lines, nothing to negotiate about the connection but
keep-alive. Anything else (chunked bodies, ``Expect``, ``Upgrade``, duplicate or malformed
headers, odd characters, another route) reads as None, and the worker hands the request to
gunicorn's own parser, whose answers and errors it then keeps.
"""

from __future__ import annotations

import functools
import re
import time
from email.utils import formatdate

from werkzeug.http import HTTP_STATUS_CODES

#: the head of one request may not exceed gunicorn's request-line + 100 fields defaults
HEAD_MAX = 64 * 1024
_FIELD_MAX = 8190
_FIELDS_MAX = 100
#: control characters other than tab, anywhere once the CRLF line ends are taken out (so a
#: bare CR or LF is caught too)
_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: headers the invocation reads, as the WSGI environ keys gunicorn gives them
_ENVIRON = {
    b"content-type": "CONTENT_TYPE",
    b"accept": "HTTP_ACCEPT",
    b"x-onebox-timeout-ms": "HTTP_X_ONEBOX_TIMEOUT_MS",
    b"x-amzn-sagemaker-custom-attributes": "HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES",
}
#: a multi-model invocation whose name needs no decoding (others go to Flask, which decodes it)
_MODEL_PATH = re.compile(rb"/models/([A-Za-z0-9._~-]{1,1024})/invoke")
#: headers whose handling is gunicorn's (interim answers, other framings, protocol switches)
_NOT_HERE = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"))


class Head:
    """A ``POST /invocations`` (or ``/models/<name>/invoke``) head the fast path can answer."""

    __slots__ = ("version", "length", "keep_alive", "environ", "model")

    def __init__(
        self, version: str, length: int, keep_alive: bool, environ: dict[str, str], model: str | None = None
    ):
        self.version = version
        self.length = length  # Content-Length
        self.keep_alive = keep_alive
        self.environ = environ  # the invocation's headers under their WSGI keys
        self.model = model  # the model named by /models/<name>/invoke; None for /invocations


def parse_head(head: bytes, models: bool = False) -> Head | None:
    """The request head (up to, without, the blank line) if the fast path answers it, else None;
    with ``models``, ``POST /models/<name>/invoke`` too."""
    lines = head.split(b"\r\n")
    if _BAD.search(b"".join(lines)) or len(lines) > _FIELDS_MAX + 1:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    model = None
    if parts[1] != b"/invocations":
        named = _MODEL_PATH.fullmatch(parts[1]) if models else None
        if named is None:
            return None
        model = named.group(1).decode()
    length = None
    connection = b""
    environ: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or len(line) > _FIELD_MAX or not _TOKEN.fullmatch(name):
            return None
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"connection":
            connection = value.lower()
        elif name in _NOT_HERE:
            return None
        elif (key := _ENVIRON.get(name)) is not None:
            if key in environ:  # repeated: gunicorn's joining rules apply
                return None
            environ[key] = value.decode("latin-1")
    if length is None:
        return None
    tokens = {t.strip() for t in connection.split(b",")}
    if parts[2] == b"HTTP/1.1":
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens
    return Head(parts[2].decode(), length, keep_alive, environ, model)


def response_head(version: str, status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
    """The status line and headers of an answer, with Date, Server and Connection."""
    lines = [
        f"{version} {_reason(status)}",
        "Server: onebox",
        f"Date: {_date()}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
        *[f"{name}: {value}" for name, value in headers],
        "\r\n",
    ]
    return "\r\n".join(lines).encode("latin-1")


@functools.cache
def _reason(status: int) -> str:
    return f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown')}"


_dated = [0, ""]


def _date() -> str:
    now = int(time.time())
    if now != _dated[0]:
        _dated[:] = now, formatdate(now, usegmt=True)
    return _dated[1]
