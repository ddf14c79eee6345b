"""The load generator against a real local HTTP server: counts, errors by kind, verification, CLI."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.bench import run_load
from serving.bench.cli import main
from serving.bench.loadgen import build_request, parse_response


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless an answer says otherwise

    def do_POST(self):
        if self.path == "/stall-first" and self.server.stall_once():
            time.sleep(1.5)  # this connection's body stays unread in the socket meanwhile
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.count()
        if self.path.startswith("/status/"):
            self._answer(int(self.path.rsplit("/", 1)[1]), b'{"error": "asked for"}')
        elif self.path == "/close":
            self._answer(200, body, close=True)
        elif self.path == "/unframed":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self._answer(200, body)

    def _answer(self, status: int, body: bytes, close: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.handled = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stalled = False

    def count(self):
        with self._lock:
            self.handled += 1

    def stall_once(self) -> bool:
        """True for the first request that asks, False after."""
        with self._lock:
            first, self._stalled = not self._stalled, True
            return first

    def handle_error(self, request, client_address):
        pass  # the load generator closes its connections at the end of a run: resets are expected

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(server, path="/echo"):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _load(url, **kw):
    options = {"body": b"[[1, 2]]", "concurrency": 4, "duration_s": 0.5, "warmup_s": 0.0, "timeout_s": 5.0}
    return run_load(url, **{**options, **kw})


def test_counted_answers_match_what_the_server_handled(server):
    result = _load(_url(server), concurrency=4)
    assert result.requests > 0
    assert result.errors == {}
    # each client may have one last answer that arrived after the window closed
    assert server.handled - 4 <= result.requests <= server.handled
    assert server.connections == 4  # keep-alive: one connection per client
    assert result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms


def test_warmup_answers_are_not_counted(server):
    result = _load(_url(server), concurrency=2, warmup_s=0.4, duration_s=0.3)
    assert 0 < result.requests < server.handled - 2


def test_error_answers_are_counted_by_status(server):
    result = _load(_url(server, "/status/503"), concurrency=3)
    assert result.requests > 0
    assert result.errors == {"503": result.requests}
    assert result.error_count == result.requests


def test_every_sampled_answer_is_verified(server):
    seen = []

    def verify(status, body):
        seen.append((status, body))
        return None

    result = _load(_url(server), verify=verify, verify_every=1)
    assert result.verified == result.requests == len(seen)
    assert result.verify_failures == 0
    assert set(seen) == {(200, b"[[1, 2]]")}


def test_failed_verification_is_counted_with_its_message(server):
    result = _load(_url(server), verify=lambda status, body: f"bad {body!r}", verify_every=10)
    assert result.verified == len(range(1, result.requests + 1, 10))
    assert result.verify_failures == result.verified
    assert result.first_failure == "bad b'[[1, 2]]'"


def test_clients_spread_over_processes_add_up(server):
    result = _load(_url(server), concurrency=6, processes=2, verify=lambda s, b: None, verify_every=1)
    assert result.errors == {}
    assert server.handled - 6 <= result.requests <= server.handled
    assert result.verified == result.requests  # samples from both processes reach the result
    assert server.connections == 6


def test_a_request_the_server_does_not_read_holds_up_only_its_own_client(server):
    # 8 MB does not fit a socket buffer: the stalled connection's request stays half sent
    # for 1.5 s, longer than the whole run, while the other client of the same process goes on
    body = bytes(8 << 20)
    result = _load(_url(server, "/stall-first"), body=body, concurrency=2, processes=1, duration_s=1.0)
    assert result.errors == {}
    assert result.requests >= 3


def test_answers_that_close_the_connection_are_followed_by_a_reconnect(server):
    result = _load(_url(server, "/close"), concurrency=2)
    assert result.requests > 2
    assert result.errors == {}
    assert server.connections >= result.requests


def test_answer_without_content_length_is_a_protocol_error(server):
    result = _load(_url(server, "/unframed"), concurrency=1)
    assert result.requests == 0
    assert result.errors.get("protocol", 0) + result.errors.get("closed", 0) > 0


def test_refused_connections_count_as_connect_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        result = _load(f"http://127.0.0.1:{port}/x", concurrency=2, duration_s=0.3)
    assert result.requests == 0
    assert result.errors["connect"] > 0


def test_non_http_url_is_refused():
    with pytest.raises(ValueError, match="http://"):
        run_load("https://example.com/", concurrency=1, duration_s=0.1)


def test_request_bytes_carry_body_and_length():
    raw = build_request("POST", "h", 80, "/p", b"abc", {"Content-Type": "text/csv"})
    assert raw == b"POST /p HTTP/1.1\r\nHost: h:80\r\nContent-Type: text/csv\r\nContent-Length: 3\r\n\r\nabc"


def test_response_head_is_parsed_only_when_complete():
    assert parse_response(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")) is None
    head = b"HTTP/1.1 404 NOT FOUND\r\ncontent-length: 2\r\nConnection: close\r\n\r\n"
    assert parse_response(bytearray(head + b"{}")) == (404, len(head), False, 2)
    assert parse_response(bytearray(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"))[2] is False
    with pytest.raises(ValueError):
        parse_response(bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))


def test_cli_prints_one_row_per_concurrency(server, capsys):
    code = main([_url(server), "--body", "[1]", "-c", "1,3", "-d", "0.3", "-w", "0"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:2] == ["conc", "req/s"]
    assert [line.split()[0] for line in out[1:]] == ["1", "3"]


def test_cli_exits_1_when_requests_fail(server, capsys):
    assert main([_url(server, "/status/500"), "--body", "x", "-c", "1", "-d", "0.2", "-w", "0"]) == 1
    assert "'500'" in capsys.readouterr().out


def test_cli_rejects_bad_concurrency(capsys):
    assert main(["http://127.0.0.1:1/", "-c", "two"]) == 2
