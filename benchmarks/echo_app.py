"""The baseline for ``overhead.py``: a bare Flask app that echoes the body, under the same gunicorn.

It runs through onebox's own :class:`FrontendApplication` with only the WSGI app swapped, so the
bind address, worker class, workers, threads and keep-alive are exactly those ``onebox serve``
uses (read from the same environment variables). Run: ``python benchmarks/echo_app.py``.
"""

from __future__ import annotations

from flask import Flask, Response, request

from serving.http.server import FrontendApplication
from serving.settings import Settings


def create_echo_app() -> Flask:
    """``POST /invocations`` answers the request body back; ``GET /ping`` answers 200."""
    app = Flask("echo")

    @app.get("/ping")
    def ping():
        return Response(b"", status=200, content_type="text/plain")

    @app.post("/invocations")
    def invocations():
        body = request.get_data()
        return Response(
            body, status=200, content_type=request.headers.get("Content-Type", "application/json")
        )

    return app


class EchoApplication(FrontendApplication):
    """onebox's gunicorn configuration serving the echo app."""

    def load(self):
        return create_echo_app()


if __name__ == "__main__":
    EchoApplication(Settings.from_env(), hosts=[]).run()
