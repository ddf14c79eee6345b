"""The multi-model endpoint's API (``SAGEMAKER_MULTI_MODEL=true``): load, list, describe, unload, invoke.

SageMaker extracts each model to ``$SAGEMAKER_BASE_DIR/models/<name>/model`` and then calls:

- ``POST /models`` ``{"model_name", "url"}``: 200 once the model serves on every host; 409 when
  the name is loaded; 507 when it does not fit (SageMaker then unloads another and retries);
  400 for a malformed request or a ``url`` outside the models directory; 404 when ``url`` holds
  no model directory;
- ``GET /models`` (paginated with ``next_page_token`` and ``limit``, as MMS does) and
  ``GET /models/<name>``: ``{"modelName", "modelUrl"}``;
- ``DELETE /models/<name>``: 200 once the model's queued requests are answered and it is gone;
- ``POST /models/<name>/invoke``: as ``/invocations`` for that model.

The models live in the hosts' registries, so every frontend worker sees the same ones (no
per-process dict that breaks 409 and 404 across gunicorn workers).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask, Response, request

from serving.errors import BadRequest, NotFound
from serving.http.routing import HostRouter
from serving.settings import Settings

#: a load request is a small JSON object; more than this is refused (413), also when chunked
LOAD_BODY_LIMIT = 64 * 1024
PAGE_LIMIT = 100  # models per page of GET /models, the most a page may hold (as MMS)
NAME_LIMIT = 1024
#: never loaded from, wherever the models directory is (as Triton's SageMaker front refuses)
SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def add_model_routes(
    app: Flask, settings: Settings, router: HostRouter, invocations, read_body: Callable
) -> None:
    """The ``/models`` routes on ``app``; ``invocations`` (app.Invocations) answers ``invoke``,
    ``read_body(environ, limit)`` reads a body (refusing one over the limit, also chunked)."""

    def deadline() -> float:
        return time.time() + settings.model_load_timeout_s

    @app.post("/models")
    def load_model():
        name, url = load_request(read_body(request.environ, LOAD_BODY_LIMIT), settings.models_dir)
        router.load(name, url, deadline())
        return {"modelName": name, "modelUrl": url}

    @app.get("/models")
    def list_models():
        start, limit = page(request.args)
        models = router.loaded(deadline())
        shown = [listed(m) for m in models[start : start + limit]]
        reply: dict = {"models": shown}
        if start + limit < len(models):
            reply["nextPageToken"] = str(start + limit)
        return reply

    @app.get("/models/<name>")
    def get_model(name: str):
        for model in router.loaded(deadline()):
            if model["name"] == name:
                return listed(model)
        raise NotFound(f"model {name!r} is not loaded")

    @app.delete("/models/<name>")
    def unload_model(name: str):
        router.unload(name, deadline())
        return {"status": f"model {name!r} unloaded"}

    @app.post("/models/<name>/invoke")
    def invoke_model(name: str):
        status, headers, body = invocations.answer(request.environ, name)
        return Response(body, status=status, headers=headers)


def load_request(body: bytes, models_dir: Path) -> tuple[str, str]:
    """``(model_name, url)`` from a load request's body, or BadRequest saying what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest('a load request is a JSON object {"model_name": ..., "url": ...}') from None
    if not isinstance(payload, dict):
        raise BadRequest('a load request is a JSON object {"model_name": ..., "url": ...}')
    name, url = payload.get("model_name"), payload.get("url")
    if not isinstance(name, str) or not name:
        raise BadRequest("the load request has no model_name (a non-empty string)")
    check_name(name)
    if not isinstance(url, str) or not url:
        raise BadRequest("the load request has no url (the model's directory)")
    check_url(url, models_dir)
    return name, url


def check_name(name: str) -> None:
    """A model name must fit in a URL path segment: no ``/``, no control characters."""
    if len(name) > NAME_LIMIT:
        raise BadRequest(f"model_name is longer than {NAME_LIMIT} characters")
    if "/" in name or not name.isprintable():
        raise BadRequest("model_name may not hold '/' or control characters")


def check_url(url: str, models_dir: Path) -> None:
    """A model is loaded only from a directory under ``models_dir``, links followed."""
    if not os.path.isabs(url):
        raise BadRequest(f"url must be an absolute path under {models_dir}, not {url!r}")
    real = os.path.realpath(url)
    if any(real == top or real.startswith(top + "/") for top in SYSTEM_DIRS):
        raise BadRequest(f"url {url!r} is a system directory")
    root = os.path.realpath(models_dir)
    if not real.startswith(root.rstrip("/") + "/"):
        raise BadRequest(f"url {url!r} is not under the models directory {models_dir}")


def page(args) -> tuple[int, int]:
    """Where a page of ``GET /models`` starts and how many it holds, from its query."""
    try:
        start = int(args.get("next_page_token") or 0)
        limit = int(args.get("limit") or PAGE_LIMIT)
    except ValueError:
        raise BadRequest("next_page_token and limit must be whole numbers") from None
    if start < 0 or limit < 1:
        raise BadRequest("next_page_token must be 0 or more and limit 1 or more")
    return start, min(limit, PAGE_LIMIT)


def listed(model: dict) -> dict:
    """A model as ``GET /models`` shows it: its name and the url it was loaded from."""
    return {"modelName": model["name"], "modelUrl": model["path"]}
