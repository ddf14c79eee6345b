"""The Flask application every frontend worker runs: routes, limits, codecs, IPC calls.

No ML framework is imported here; tensors are numpy arrays decoded from the body and sent to
the model host that owns the model.
"""

from __future__ import annotations

import json
import logging
import time

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serving import codecs
from serving.errors import BadRequest, NotFound, PayloadTooLarge, ServingError, from_status
from serving.http.routing import HostRouter
from serving.settings import Settings
from serving.types import RawRequest

log = logging.getLogger("onebox.http")

DEFAULT_MODEL = "model"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
TIMEOUT_HEADER = "X-Onebox-Timeout-Ms"


def create_app(settings: Settings, router: HostRouter) -> Flask:
    """The WSGI app for one frontend worker."""
    app = Flask("onebox")

    @app.get("/ping")
    def ping():
        if router.ready():
            return Response(b"", status=200, content_type="text/plain")
        return _error_response(router.not_ready_error())

    @app.post("/invocations")
    def invocations():
        return _invoke(DEFAULT_MODEL)

    @app.get("/execution-parameters")
    def execution_parameters():
        strategy = settings.batch_strategy
        payload_mb = (settings.max_payload_bytes or 0) // (1024 * 1024)
        return {
            "MaxConcurrentTransforms": settings.max_concurrent_transforms,
            "BatchStrategy": strategy,
            "MaxPayloadInMB": payload_mb,
        }

    def _invoke(model: str) -> Response:
        deadline = _deadline(settings)
        body = _read_body(settings.max_payload_bytes)
        if not body:
            raise BadRequest("the request body is empty")
        content_type = request.headers.get("Content-Type")
        info = router.describe(model, deadline)
        if info["raw"]:
            return _invoke_raw(model, body, content_type or "", deadline)
        media = codecs.parse_media_type(content_type)
        accept = codecs.negotiate(request.headers.get("Accept"), settings.default_accept)
        inputs = codecs.decode(body, media, router.input_specs(model))
        outputs = router.infer(model, inputs, deadline)
        return Response(codecs.encode(outputs, accept), status=200, content_type=accept)

    def _invoke_raw(model: str, body: bytes, content_type: str, deadline: float) -> Response:
        accept = request.headers.get("Accept") or ""
        if not accept or accept.strip() == "*/*":
            accept = settings.default_accept
        raw = RawRequest(body, content_type, accept, request.headers.get(CUSTOM_ATTRIBUTES))
        answer = router.invoke(model, raw, deadline)
        response = Response(answer.body, status=200, content_type=answer.content_type)
        if answer.custom_attributes is not None:
            response.headers[CUSTOM_ATTRIBUTES] = answer.custom_attributes
        return response

    @app.errorhandler(ServingError)
    def serving_error(err: ServingError):
        if int(err.status) >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, int(err.status), err.message)
        return _error_response(err)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        if err.code == 404:
            return _error_response(NotFound(f"no route {request.method} {request.path}"))
        response = _error_response(_from_http_exception(err))
        if err.code == 405 and hasattr(err, "valid_methods") and err.valid_methods:
            response.headers["Allow"] = ", ".join(err.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(err: Exception):  # a bug: the traceback goes to the log, never to the client
        log.exception("unhandled error on %s %s", request.method, request.path)
        return Response(b'{"error": {"type": "InternalError", "message": "internal server error"}}',
                        status=500, content_type="application/json")  # fmt: skip

    return app


def _read_body(limit: int | None) -> bytes:
    """The whole body, refusing more than ``limit`` bytes also when it arrives chunked."""
    # gunicorn's input ends at Content-Length or at the last chunk; werkzeug's limited stream
    # would silently truncate a chunked body at the limit instead of refusing it
    stream = request.environ["wsgi.input"]
    if limit is None:
        return stream.read()
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    return body


def _deadline(settings: Settings) -> float:
    timeout = settings.timeout_s
    asked = request.headers.get(TIMEOUT_HEADER)
    if asked:
        try:
            timeout = min(timeout, max(float(asked), 1.0) / 1000.0)
        except ValueError:
            raise BadRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
    return time.time() + timeout


def _from_http_exception(err: HTTPException) -> ServingError:
    return from_status(err.code or 500, err.description or err.name)


def _error_response(err: ServingError) -> Response:
    response = Response(json.dumps(err.to_dict()), status=int(err.status), content_type="application/json")
    for key, value in err.headers.items():
        response.headers[key] = value
    return response
