"""The Flask application every frontend worker runs: routes, limits, codecs, IPC calls.

No ML framework is imported here; tensors are numpy arrays decoded from the body and sent to
the model host that owns the model.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from serving import codecs
from serving.errors import BadRequest, NotFound, PayloadTooLarge, ServingError, from_status
from serving.http.models import add_model_routes
from serving.http.routing import HostRouter
from serving.ipc.client import check_reply, infer_message, infer_result, invoke_message, invoke_result
from serving.metrics.emf import EmfWriter
from serving.metrics.exposition import scrape
from serving.metrics.tally import LockedTally
from serving.settings import Settings
from serving.types import RawRequest

log = logging.getLogger("onebox.http")

DEFAULT_MODEL = "model"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
TIMEOUT_HEADER = "X-Onebox-Timeout-Ms"
# the same headers as WSGI environ keys
CUSTOM_ATTRIBUTES_ENVIRON = "HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES"
TIMEOUT_ENVIRON = "HTTP_X_ONEBOX_TIMEOUT_MS"
INTERNAL_ERROR = b'{"error": {"type": "InternalError", "message": "internal server error"}}'


def create_app(settings: Settings, router: HostRouter) -> Flask:
    """The WSGI app for one frontend worker.

    ``POST /invocations`` is answered by :class:`Invocations` straight from the WSGI environ,
    ahead of Flask's request machinery (a middleware on ``app.wsgi_app``): on a GPU host the
    frontends' CPU per request decides how many images/s reach the device, and Flask's context,
    routing and response objects were ~15% of it. Every other route is a Flask view.
    """
    app = Flask("onebox")
    invocations_ = Invocations(settings, router)
    app.wsgi_app = invocations_.middleware(app.wsgi_app)
    app.extensions["onebox.invocations"] = invocations_  # the event-loop worker's fast path

    if settings.multi_model:
        add_model_routes(app, settings, router, invocations_, _read_body)

    @app.get("/ping")
    def ping():
        # a multi-model endpoint is up once its hosts answer, with or without models
        if router.ready(models=not settings.multi_model):
            return Response(b"", status=200, content_type="text/plain")
        return _error_response(router.not_ready_error())

    @app.post("/invocations")
    def invocations():
        # reached only when the middleware is bypassed; kept so that other methods get 405 + Allow
        status, headers, body = invocations_.answer(request.environ)
        return Response(body, status=status, headers=headers)

    @app.get("/metrics")
    def metrics():
        # this worker's own counts first; the others' are at most a second old (serving.metrics.tally)
        if not invocations_.tally_on_loop:
            invocations_.tally.flush()
        body, content_type = scrape(settings.metrics_dir)
        return Response(body, status=200, content_type=content_type)

    @app.get("/execution-parameters")
    def execution_parameters():
        strategy = settings.batch_strategy
        payload_mb = (settings.max_payload_bytes or 0) // (1024 * 1024)
        return {
            "MaxConcurrentTransforms": settings.max_concurrent_transforms,
            "BatchStrategy": strategy,
            "MaxPayloadInMB": payload_mb,
        }

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
        return Response(INTERNAL_ERROR, status=500, content_type="application/json")

    return app


class Invocations:
    """``POST /invocations`` over the WSGI environ: read, decode, call a host, encode, or an error."""

    def __init__(self, settings: Settings, router: HostRouter, model: str = DEFAULT_MODEL):
        self.settings = settings
        self.router = router
        self.model = model
        # the worker's invocations, counted in memory and published once a second; the loop
        # worker puts its own (one-thread) tally here and routes ``record`` to its loop
        self.tally = LockedTally(emf_writer(settings))
        self.record = self.tally.record  # (model, status, seconds, host call seconds | None)
        self.tally_on_loop = False

    def middleware(self, app: Callable) -> Callable:
        """A WSGI app that answers ``POST /invocations`` itself and passes the rest to ``app``."""

        def wsgi(environ: dict, start_response: Callable):
            if environ.get("PATH_INFO") != "/invocations" or environ.get("REQUEST_METHOD") != "POST":
                return app(environ, start_response)
            status, headers, body = self.answer(environ)
            start_response(_status_line(status), headers)
            return [body]

        return wsgi

    def answer(self, environ: dict, model: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body for one invocation of ``model`` (default: the single model);
        errors become their JSON answers."""
        started = time.perf_counter()
        model = model or self.model
        model_seconds = None
        try:
            deadline = self.deadline(environ)
            body = _read_body(environ, self.settings.max_payload_bytes)
            prepared = self.prepare(environ, body, self.router.describe(model, deadline), deadline, model)
            called = time.perf_counter()
            try:
                reply = self.router.call(prepared.header, prepared.buffers, deadline)
            finally:
                model_seconds = time.perf_counter() - called
            answer = prepared.finish(*reply)
        except NotFound as err:  # unloaded meanwhile: the next request asks the host again
            self.router.forget(model)
            answer = self.failed(err)
        except Exception as err:  # every failure becomes an answer
            answer = self.failed(err)
        self.record(model, answer[0], time.perf_counter() - started, model_seconds)
        return answer

    def failed(self, err: Exception) -> tuple[int, list[tuple[str, str]], bytes]:
        """The answer to an invocation that raised ``err``: its JSON error, or a bare 500 for a bug
        (the traceback goes to the log, never to the client)."""
        if isinstance(err, ServingError):
            if int(err.status) >= 500:
                log.warning("POST /invocations -> %d: %s", int(err.status), err.message)
            return _error_parts(err)
        log.error("unhandled error on POST /invocations", exc_info=err)
        return 500, _headers("application/json", INTERNAL_ERROR), INTERNAL_ERROR

    def deadline(self, environ: dict) -> float:
        """When the request's answer is due (``time.time()``), from the settings and its header."""
        return _deadline(self.settings, environ.get(TIMEOUT_ENVIRON))

    def prepare(
        self, environ: dict, body: bytes, info: dict, deadline: float, model: str | None = None
    ) -> Prepared:
        """Everything before the host call: the checks, the decoding and the message to send,
        for ``model`` (default: the single model) as the host described it (``info``); and how
        its answer turns into the response."""
        model = model or self.model
        if not body:
            raise BadRequest("the request body is empty")
        content_type = environ.get("CONTENT_TYPE")
        if info["raw"]:
            accept = environ.get("HTTP_ACCEPT") or ""
            if not accept or accept.strip() == "*/*":
                accept = self.settings.default_accept
            raw = RawRequest(body, content_type or "", accept, environ.get(CUSTOM_ATTRIBUTES_ENVIRON))
            return Prepared(*invoke_message(model, raw), _finish_raw)
        media = codecs.parse_media_type(content_type)
        accept = codecs.negotiate(environ.get("HTTP_ACCEPT"), self.settings.default_accept)
        inputs = codecs.decode(body, media, self.router.input_specs(model))
        return Prepared(*infer_message(model, inputs), functools.partial(_finish_tensors, accept))


class Prepared:
    """An invocation ready to go to a host: its message, and ``finish(reply, buffers)``, which
    checks the host's reply (raising its error) and returns status, headers and body."""

    __slots__ = ("header", "buffers", "_finish")

    def __init__(self, header: dict, buffers: list, finish: Callable):
        self.header, self.buffers, self._finish = header, buffers, finish

    def finish(self, reply: dict, buffers: list) -> tuple[int, list[tuple[str, str]], bytes]:
        return self._finish(check_reply(reply), buffers)


def _finish_tensors(accept: str, reply: dict, buffers: list) -> tuple[int, list[tuple[str, str]], bytes]:
    payload = codecs.encode(infer_result(reply, buffers), accept)
    return 200, _headers(accept, payload), payload


def _finish_raw(reply: dict, buffers: list) -> tuple[int, list[tuple[str, str]], bytes]:
    answer = invoke_result(reply, buffers)
    headers = _headers(answer.content_type, answer.body)
    if answer.custom_attributes is not None:
        headers.append((CUSTOM_ATTRIBUTES, answer.custom_attributes))
    return 200, headers, answer.body


def emf_writer(settings: Settings) -> EmfWriter | None:
    """The worker's CloudWatch EMF writer when ``ONEBOX_CLOUDWATCH_EMF`` is on."""
    if not settings.cloudwatch_emf:
        return None
    return EmfWriter(settings.cloudwatch_emf_namespace, settings.cloudwatch_emf_interval_s)


def _read_body(environ: dict, limit: int | None) -> bytes:
    """The whole body, refusing more than ``limit`` bytes also when it arrives chunked."""
    # gunicorn's input ends at Content-Length or at the last chunk; werkzeug's limited stream
    # would silently truncate a chunked body at the limit instead of refusing it
    stream = environ["wsgi.input"]
    if limit is None:
        return stream.read()
    declared = environ.get("CONTENT_LENGTH")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    return body


def _deadline(settings: Settings, asked: str | None) -> float:
    timeout = settings.timeout_s
    if asked:
        try:
            timeout = min(timeout, max(float(asked), 1.0) / 1000.0)
        except ValueError:
            raise BadRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
    return time.time() + timeout


def _headers(content_type: str, body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", content_type), ("Content-Length", str(len(body)))]


@functools.cache
def _status_line(status: int) -> str:
    return f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"


def _from_http_exception(err: HTTPException) -> ServingError:
    return from_status(err.code or 500, err.description or err.name)


def _error_parts(err: ServingError) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps(err.to_dict()).encode()
    return int(err.status), [*_headers("application/json", body), *err.headers.items()], body


def _error_response(err: ServingError) -> Response:
    status, headers, body = _error_parts(err)
    return Response(body, status=status, headers=headers)
