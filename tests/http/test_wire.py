"""The fast path's reading of request heads: what it answers itself, and what it leaves to gunicorn."""

from __future__ import annotations

import pytest

from serving.http.wire import parse_head, response_head

HEAD = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
        b"Accept: application/json\r\nContent-Length: 150656\r\nX-Onebox-Timeout-Ms: 250\r\n"
        b"X-Amzn-SageMaker-Custom-Attributes: a=1\r\nUser-Agent: t")  # fmt: skip


def test_an_invocation_head_gives_its_length_keep_alive_and_the_headers_under_wsgi_keys():
    head = parse_head(HEAD)
    assert (head.version, head.length, head.keep_alive) == ("HTTP/1.1", 150656, True)
    assert head.environ == {
        "CONTENT_TYPE": "application/x-npy",
        "HTTP_ACCEPT": "application/json",
        "HTTP_X_ONEBOX_TIMEOUT_MS": "250",
        "HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES": "a=1",
    }


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [("1.1", None, True), ("1.1", "close", False), ("1.1", "Keep-Alive, Close", False),
     ("1.0", None, False), ("1.0", "keep-alive", True)],
)  # fmt: skip
def test_keep_alive_follows_the_version_and_the_connection_header(version, connection, keep_alive):
    head = f"POST /invocations HTTP/{version}\r\nContent-Length: 3".encode()
    if connection:
        head += f"\r\nConnection: {connection}".encode()
    assert parse_head(head).keep_alive is keep_alive


@pytest.mark.parametrize(
    "head",
    [
        b"GET /invocations HTTP/1.1\r\nContent-Length: 3",
        b"POST /ping HTTP/1.1\r\nContent-Length: 3",
        b"POST /invocations?x=1 HTTP/1.1\r\nContent-Length: 3",
        b"POST /invocations HTTP/2.0\r\nContent-Length: 3",
        b"POST  /invocations HTTP/1.1\r\nContent-Length: 3",
        b"POST /invocations HTTP/1.1",  # no length: gunicorn decides what an absent body is
        b"POST /invocations HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nUpgrade: h2c",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3",
        b"POST /invocations HTTP/1.1\r\nContent-Length: +3",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nAccept: a\r\nAccept: b",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\nX: bare line feed",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nX: a\rb",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nX: nul\x00",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\n folded: line",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nBad Name: x",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nno colon",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nX: " + b"a" * 9000,
        b"POST /invocations HTTP/1.1\r\nContent-Length: 3" + b"\r\nX: 1" * 101,
    ],
)
def test_anything_but_a_plain_invocation_is_left_to_gunicorn(head):
    assert parse_head(head) is None


@pytest.mark.parametrize(
    ("target", "model"),
    [
        (b"/models/m1/invoke", "m1"),
        (b"/models/sm.model-1_v~2/invoke", "sm.model-1_v~2"),
        (b"/invocations", None),
    ],
)
def test_a_multi_model_endpoint_answers_invocations_of_named_models_too(target, model):
    head = b"POST " + target + b" HTTP/1.1\r\nContent-Length: 3"
    assert parse_head(head, models=True).model == model
    if model is not None:  # not a route of a single-model endpoint
        assert parse_head(head) is None


@pytest.mark.parametrize(
    "target",
    [
        b"/models/a%20b/invoke",
        b"/models//invoke",
        b"/models/m1/invoke/",
        b"/models/m1",
        b"/models/a/b/invoke",
    ],
)
def test_a_model_name_to_decode_or_another_models_route_is_left_to_flask(target):
    assert parse_head(b"POST " + target + b" HTTP/1.1\r\nContent-Length: 3", models=True) is None


def test_an_answer_head_carries_status_date_connection_and_the_given_headers():
    raw = response_head("HTTP/1.1", 429, [("Content-Length", "2"), ("Retry-After", "1")], keep_alive=False)
    lines = raw.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    assert "Connection: close" in lines and "Retry-After: 1" in lines and "Content-Length: 2" in lines
    assert any(line.startswith("Date: ") and line.endswith(" GMT") for line in lines)
    assert raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n\r\n") == 1
